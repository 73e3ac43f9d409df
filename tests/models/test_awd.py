"""AWD-LSTM's techniques, each by its defining behaviour: locked dropout, embedding dropout, weight drop, AR/TAR,
layer sizes, and the adaptive softmax head."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from neurallm.config import ModelConfig
from neurallm.models import build_model
from neurallm.models.adaptive import AdaptiveSoftmaxHead
from neurallm.models.awd import AWDLSTMLanguageModel, layer_sizes
from neurallm.models.head import SoftmaxHead
from neurallm.models.dropouts import LockedDropout, embedding_dropout
from neurallm.models.weight_drop import WeightDropLSTM


def _awd(**settings) -> AWDLSTMLanguageModel:
    base = dict(model="AWD_LSTM", vocab_size=40, emsize=8, nhid=12, nlayers=3)
    return build_model(ModelConfig(**{**base, **settings}))


def test_locked_dropout_uses_one_mask_for_every_time_step():
    drop = LockedDropout().train()
    out = drop(torch.ones(50, 4, 16), 0.5)
    zeros = out == 0
    assert zeros.any() and not zeros.all()
    assert torch.equal(zeros, zeros[:1].expand_as(zeros))  # the same units dropped at every step
    assert set(out.unique().tolist()) <= {0.0, 2.0}  # kept units scaled by 1/(1-p)
    assert torch.equal(drop.eval()(torch.ones(5, 2, 3), 0.5), torch.ones(5, 2, 3))


def test_embedding_dropout_drops_whole_words_everywhere_they_occur():
    torch.manual_seed(0)
    embed = nn.Embedding(20, 6)
    ids = torch.arange(20).repeat(3).view(3, 20)  # every word three times
    out = embedding_dropout(embed, ids, 0.5, training=True)
    dropped = (out == 0).all(-1)  # (3, 20): a word's whole vector is zero
    assert dropped.any() and not dropped.all()
    assert torch.equal(dropped, dropped[:1].expand_as(dropped))  # a dropped word is dropped in every occurrence
    assert torch.allclose(out[~dropped], (embed(ids) * 2)[~dropped])
    assert torch.equal(embedding_dropout(embed, ids, 0.5, training=False), embed(ids))


def test_weight_drop_masks_hidden_to_hidden_weights_and_leaves_the_parameter_intact():
    torch.manual_seed(0)
    layer = WeightDropLSTM(4, 6, weight_drop=1.0).train()  # every recurrent weight dropped
    raw = layer.lstm.weight_hh_l0.detach().clone()
    x, state = torch.randn(10, 2, 4), (torch.randn(1, 2, 6), torch.randn(1, 2, 6))
    without_recurrence = nn.LSTM(4, 6)
    without_recurrence.load_state_dict(layer.lstm.state_dict())
    with torch.no_grad():
        without_recurrence.weight_hh_l0.zero_()
    assert torch.allclose(layer(x, state)[0], without_recurrence(x, state)[0], atol=1e-6)
    assert torch.equal(layer.lstm.weight_hh_l0, raw)  # the parameter itself is never modified
    assert torch.allclose(layer.eval()(x, state)[0], layer.lstm(x, state)[0])  # evaluation: the full weights


def test_weight_drop_draws_a_fresh_mask_each_call():
    layer = WeightDropLSTM(4, 6, weight_drop=0.5).train()
    x, state = torch.randn(10, 2, 4), (torch.zeros(1, 2, 6), torch.zeros(1, 2, 6))
    assert not torch.allclose(layer(x, state)[0], layer(x, state)[0])


def test_weight_drop_gradient_reaches_the_raw_weight():
    layer = WeightDropLSTM(4, 6, weight_drop=0.5).train()
    out, _ = layer(torch.randn(5, 2, 4), (torch.zeros(1, 2, 6), torch.zeros(1, 2, 6)))
    out.sum().backward()
    grad = layer.lstm.weight_hh_l0.grad
    assert grad is not None and (grad == 0).any() and (grad != 0).any()  # dropped weights get no gradient


def test_last_layer_is_emsize_wide_when_tied_so_no_projection_is_needed():
    tied = ModelConfig(model="AWD_LSTM", vocab_size=40, emsize=8, nhid=12, nlayers=3, tied=True)
    assert layer_sizes(tied) == [(8, 12), (12, 12), (12, 8)]
    model = build_model(tied)
    assert model.head.weight is model.encoder.weight
    untied = ModelConfig(model="AWD_LSTM", vocab_size=40, emsize=8, nhid=12, nlayers=2)
    assert layer_sizes(untied) == [(8, 12), (12, 12)]


def test_ar_and_tar_are_added_to_the_loss_but_not_to_the_nll():
    ids = torch.randint(0, 40, (6, 3))
    targets = torch.randint(0, 40, (6, 3))
    plain = _awd(dropout=0.3).train()
    regularised = _awd(dropout=0.3, alpha=2.0, beta=1.0).train()
    regularised.load_state_dict(plain.state_dict())
    torch.manual_seed(1)
    out_plain = plain(ids, plain.init_state(3), targets)
    torch.manual_seed(1)
    out_reg = regularised(ids, regularised.init_state(3), targets)
    assert torch.equal(out_plain.loss, out_plain.nll)
    assert torch.allclose(out_reg.nll, out_plain.nll)
    assert out_reg.loss > out_reg.nll + 1e-6


def test_every_regulariser_is_off_in_eval_mode():
    model = _awd(dropouti=0.5, dropouth=0.5, dropoute=0.5, wdrop=0.5, dropout=0.5).eval()
    ids = torch.randint(0, 40, (7, 2))
    first, _ = model.features(ids, model.init_state(2))
    second, _ = model.features(ids, model.init_state(2))
    assert torch.equal(first, second)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_adaptive_softmax_loss_matches_its_own_log_probs(reduction):
    torch.manual_seed(0)
    head = AdaptiveSoftmaxHead(32, 50, (10, 30))
    features, targets = torch.randn(4, 3, 32), torch.randint(0, 50, (4, 3))
    log_probs = head.log_probs(features)  # (4, 3, 50)
    assert torch.allclose(log_probs.exp().sum(-1), torch.ones(4, 3), atol=1e-5)
    expected = -log_probs.gather(-1, targets.unsqueeze(-1)).reshape(-1)
    want = {"mean": expected.mean(), "sum": expected.sum(), "none": expected}[reduction]
    assert torch.allclose(head.loss(features, targets, reduction=reduction), want, atol=1e-5)


def test_adaptive_softmax_keeps_only_cutoffs_below_the_vocabulary():
    head = AdaptiveSoftmaxHead(32, 25, (10, 30))  # 30 is past the vocabulary: one tail cluster
    assert head.adaptive.cutoffs == [10, 25]
    # no cutoff fits a 5-token vocabulary: a full softmax instead
    small = build_model(ModelConfig(model="LSTM", vocab_size=5, emsize=8, nhid=8, adaptive_softmax=True, cutoffs=(10, 30)))
    assert isinstance(small.head, SoftmaxHead)

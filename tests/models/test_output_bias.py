"""--no-output-bias: an output layer without a bias (what Hugging Face's causal LMs have; see export --hf)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from neurallm.config import ModelConfig
from neurallm.run_config import RunConfig
from neurallm.models import build_model


def test_without_output_bias_the_head_has_no_bias_and_the_loss_is_plain_cross_entropy():
    model = build_model(ModelConfig(model="Transformer", vocab_size=50, emsize=16, nhid=32, nhead=2, output_bias=False))
    assert model.head.bias is None and "head.bias" not in model.state_dict()
    features = torch.randn(6, 3, 16, requires_grad=True)
    targets = torch.randint(0, 50, (6, 3))
    loss = model.head.loss(features, targets)  # the chunked CPU path
    expected = F.cross_entropy(F.linear(features, model.head.weight).reshape(-1, 50), targets.reshape(-1))
    torch.testing.assert_close(loss, expected)
    loss.backward()  # gradients reach the features and the weight
    assert features.grad is not None and model.head.weight.grad is not None


def test_by_default_a_transformer_has_no_output_bias_and_an_rnn_has_one():
    transformer = ModelConfig(model="Transformer", vocab_size=50, emsize=16, nhead=2)
    assert transformer.output_bias is False and transformer.to_dict()["output_bias"] is False  # config.json says so
    assert build_model(transformer).head.bias is None
    lstm = ModelConfig(model="LSTM", vocab_size=50)
    assert lstm.output_bias is True and build_model(lstm).head.bias is not None
    assert ModelConfig(model="Transformer", vocab_size=50, emsize=16, nhead=2, output_bias=True).output_bias is True


def test_a_run_saved_before_the_setting_existed_reads_as_having_a_bias():
    saved = RunConfig.from_dict({
        "source": {"data": "x"}, "tokenizer": {}, "vocab": {}, "train": {},
        "model": {"model": "Transformer", "vocab_size": 50, "emsize": 16, "nhead": 2},
    })
    assert saved.model.output_bias is True  # although a new Transformer has none by default
    without = RunConfig.from_dict({**saved.to_dict(), "model": {**saved.model.to_dict(), "output_bias": False}})
    assert without.model.output_bias is False

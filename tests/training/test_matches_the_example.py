"""neurallm's training step is the PyTorch word-language-model example's step (benchmarks/baseline.py re-implements
the example from its documented behaviour): without dropout, the same weights trained on the same windows stay the
same weights, so a difference in perplexity between the two programs comes from their random draws alone."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from neurallm.config import ModelConfig, TrainConfig
from neurallm.models import build_model
from neurallm.training.optim import build_optimizer
from neurallm.training.step import training_step

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import baseline  # noqa: E402


def test_thirty_windows_of_clipped_sgd_at_lr_20_give_the_examples_weights():
    torch.manual_seed(0)
    vocab, batch, bptt, windows, clip = 300, 4, 12, 30, 0.1  # this model's gradient norms are 0.15-0.2: all clipped
    example = baseline.RNNModel(vocab, 16, 16, 2, dropout=0.0)
    ours = build_model(ModelConfig(vocab_size=vocab, emsize=16, nhid=16, nlayers=2, dropout=0.0))
    ours.load_state_dict({name.replace("decoder.", "head."): w for name, w in example.state_dict().items()})
    optimizer = build_optimizer(ours, TrainConfig(lr=20.0))
    ids = torch.randint(0, vocab, (bptt * windows + 1, batch))
    state, hidden = ours.init_state(batch), example.init_hidden(batch)
    for w in range(windows):
        inputs, targets = ids[w * bptt : (w + 1) * bptt], ids[w * bptt + 1 : (w + 1) * bptt + 1]
        outcome = training_step(ours, optimizer, inputs, targets, state, clip=clip)
        state = outcome.state
        # the example's loop: repackage the hidden state, zero the gradients, NLLLoss, clip, p -= lr * grad
        hidden = baseline.repackage_hidden(hidden)
        example.zero_grad()
        log_probs, hidden = example(inputs, hidden)
        loss = torch.nn.NLLLoss()(log_probs, targets.reshape(-1))
        loss.backward()
        assert torch.nn.utils.clip_grad_norm_(example.parameters(), clip) > clip
        for param in example.parameters():
            param.data.add_(param.grad, alpha=-20.0)
        assert abs(outcome.nll.item() - loss.item()) < 1e-4, f"window {w}"
    trained = ours.state_dict()
    for name, weight in example.state_dict().items():
        torch.testing.assert_close(trained[name.replace("decoder.", "head.")], weight, rtol=1e-4, atol=1e-5)

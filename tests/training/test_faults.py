"""A non-finite loss or gradient stops the step, restores the last good state and lowers the LR once;
a second one stops training with the last good checkpoints intact.

Faults are injected by wrapping the output layer's loss during training steps only (validation runs the model
in eval mode and is left alone): ``nan`` makes the loss non-finite, ``inf-grad`` keeps the loss finite but
makes its gradient infinite, which the clipped gradient norm reveals.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import neurallm
from neurallm.cli import main
from neurallm.models.head import SoftmaxHead
from neurallm.training.loop import FAULT_LR_FACTOR, Trainer

from conftest import TINY_MODEL, write_patterned_corpus

SETTINGS = {**TINY_MODEL, "eval_context": 8, "epochs": 2}


class _InfiniteGradient(torch.autograd.Function):
    """Identity forward, infinite gradient backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * math.inf


def inject_faults(monkeypatch, at_steps: set[int], kind: str = "nan") -> dict:
    """Make the training loss of the given 1-based training steps non-finite (or its gradient infinite)."""
    original = SoftmaxHead.loss
    calls = {"n": 0}

    def faulty_loss(self, features, targets, reduction="mean"):
        loss = original(self, features, targets, reduction)
        if not self.training:
            return loss
        calls["n"] += 1
        if calls["n"] not in at_steps:
            return loss
        return loss * math.nan if kind == "nan" else _InfiniteGradient.apply(loss)

    monkeypatch.setattr(SoftmaxHead, "loss", faulty_loss)
    return calls


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_patterned_corpus(tmp_path_factory.mktemp("faults") / "corpus", lines=60)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def training_state(run: Path) -> dict:
    with safe_open(str(run / "last.safetensors"), "pt") as f:
        return json.loads(f.metadata()["neurallm_state"])


@pytest.mark.parametrize("clip", [0.25, 0.0], ids=["clip", "no-clip"])
@pytest.mark.parametrize("kind", ["nan", "inf-grad"])
def test_one_fault_restores_lowers_the_lr_once_and_training_completes(kind, clip, corpus, tmp_path, monkeypatch, caplog):
    settings = {**SETTINGS, "clip": clip}
    clean = tmp_path / "clean"
    neurallm.train(corpus, clean, **settings)
    faulty = tmp_path / "faulty"
    calls = inject_faults(monkeypatch, {5}, kind)
    with caplog.at_level(logging.INFO, logger="neurallm"):
        result = neurallm.train(corpus, faulty, **settings)
    messages = caplog.messages
    assert calls["n"] > 5  # the fault was injected and training went on
    assert result.stopped_by == "epochs" and result.epochs_completed == 2
    warnings = [m for m in messages if m.startswith("warning: non-finite loss")]
    assert warnings == [f"warning: non-finite loss at epoch 1, batch 5: restored the last good weights and lowered "
                        f"the learning rate to {SETTINGS['lr'] * FAULT_LR_FACTOR:g}"]
    assert [r["lr"] for r in metrics(faulty)] == [r["lr"] * FAULT_LR_FACTOR for r in metrics(clean)]
    assert all(math.isfinite(r["train_loss"]) and math.isfinite(r["valid_loss"]) for r in metrics(faulty))
    assert training_state(faulty)["faults"] == 1
    for name in ("model.safetensors", "last.safetensors"):
        assert all(torch.isfinite(t).all() for t in load_file(faulty / name).values() if t.is_floating_point())


def test_the_fault_restores_the_weights_of_the_last_checkpoint(corpus, tmp_path, monkeypatch):
    """Checkpoints only at epoch ends: a fault at step 5 of epoch 2 throws away steps 1-4 of that epoch."""
    run = tmp_path / "run"
    neurallm.train(corpus, run, **{**SETTINGS, "epochs": 1})
    end_of_epoch_1 = load_file(run / "last.safetensors")
    seen = []
    original = Trainer.restore_last

    def spy(self, *, full):
        before = {k: v.clone() for k, v in self.model.state_dict().items()}
        original(self, full=full)
        seen.append((full, before, {k: v.clone() for k, v in self.model.state_dict().items()}))

    monkeypatch.setattr(Trainer, "restore_last", spy)
    inject_faults(monkeypatch, {5})
    neurallm.train(None, run, resume=True, epochs=2)
    assert [full for full, _, _ in seen] == [True, False]  # the resume itself, then the fault
    _, before, after = seen[1]
    assert any(not torch.equal(before[name], end_of_epoch_1[f"model.{name}"]) for name in before)  # 4 steps moved it
    for name, tensor in after.items():
        assert torch.equal(tensor, end_of_epoch_1[f"model.{name}"]), name


def test_a_second_fault_stops_training_with_the_checkpoints_intact(corpus, tmp_path, monkeypatch):
    run = tmp_path / "run"
    inject_faults(monkeypatch, {5, 30})  # 30: in epoch 2, after the epoch-1 checkpoints were written
    with pytest.raises(neurallm.TrainingError, match="non-finite loss again at epoch 2.*intact: lower --lr or --clip"):
        neurallm.train(corpus, run, **SETTINGS)
    monkeypatch.undo()
    assert [r["epoch"] for r in metrics(run)] == [1]
    for checkpoint in ("best", "last"):
        loaded = neurallm.load_run(run, checkpoint=checkpoint)
        assert all(torch.isfinite(p).all() for p in loaded.model.parameters())
        assert math.isfinite(loaded.evaluate(split="valid").loss)


def test_the_cli_reports_a_second_fault_in_one_line_and_eval_still_works(corpus, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    inject_faults(monkeypatch, {2, 3})
    argv = ["train", "--data", str(corpus), "--out", str(run), "--no-progress", "--emsize", "16", "--nhid", "16",
            "--nlayers", "1", "--bptt", "8", "--batch-size", "4", "--eval-batch-size", "2", "--context", "8", "--epochs", "1"]
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert "warning: non-finite loss at epoch 1, batch 2" in captured.out
    # besides the warnings about the tiny corpus's splits, one line: the error
    errors = [line for line in captured.err.splitlines() if not line.startswith("warning: ")]
    assert len(errors) == 1 and "Traceback" not in captured.err
    assert errors[0].startswith("neurallm train: error: non-finite loss again at epoch 1, batch 3")
    monkeypatch.undo()
    assert main(["eval", str(run), "--json"]) == 0
    assert main(["eval", str(run), "--checkpoint", "last", "--json"]) == 0
    assert main(["generate", str(run), "--tokens", "5"]) == 0


def test_a_fault_while_averaging_restores_the_nt_asgd_average_of_the_last_checkpoint(corpus, tmp_path, monkeypatch):
    """The steps a fault throws away are taken out of NT-ASGD's running average too."""
    from neurallm.training.ntasgd import PREFIX
    from neurallm.training.optim import Schedule

    run = tmp_path / "run"
    original_after_validation = Schedule.after_validation

    def average_from_the_first_epoch(self, valid_loss):
        original_after_validation(self, valid_loss)
        self.averaging = True

    monkeypatch.setattr(Schedule, "after_validation", average_from_the_first_epoch)
    neurallm.train(corpus, run, **{**SETTINGS, "epochs": 1, "optimizer": "ntasgd", "lr": 1.0})
    saved = load_file(run / "last.safetensors")
    assert training_state(run)["average"]["count"] == 1  # averaging began at the end of epoch 1
    seen = []
    original_restore = Trainer.restore_last

    def spy(self, *, full):
        original_restore(self, full=full)
        seen.append((full, self.average.count, {k: v.clone() for k, v in self.average.means.items()}))

    monkeypatch.setattr(Trainer, "restore_last", spy)
    inject_faults(monkeypatch, {5})
    neurallm.train(None, run, resume=True, epochs=2)
    full, count, means = seen[1]  # the fault's restore (4 steps of epoch 2 had been averaged in)
    assert not full and count == 1
    for name, mean in means.items():
        assert torch.equal(mean, saved[PREFIX + name]), name


def test_eval_of_the_last_checkpoint_scores_the_nt_asgd_average(corpus, tmp_path, monkeypatch):
    """Validation scores the averaged weights once NT-ASGD averages; so does load_run(checkpoint="last")."""
    from neurallm.training.optim import Schedule

    original_after_validation = Schedule.after_validation

    def average_from_the_first_epoch(self, valid_loss):
        original_after_validation(self, valid_loss)
        self.averaging = True

    monkeypatch.setattr(Schedule, "after_validation", average_from_the_first_epoch)
    run = tmp_path / "run"
    neurallm.train(corpus, run, **{**SETTINGS, "epochs": 3, "optimizer": "ntasgd", "lr": 1.0})
    last_valid = metrics(run)[-1]["valid_loss"]
    scored = neurallm.load_run(run, checkpoint="last").evaluate(split="valid", context=SETTINGS["eval_context"])
    assert scored.loss == pytest.approx(last_valid, rel=1e-4)  # the same weights; batch sizes may differ

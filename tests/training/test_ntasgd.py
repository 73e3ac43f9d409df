"""NT-ASGD: the non-monotone trigger, the average of every parameter (output layer included), validation and the
best checkpoint on the averaged weights, and an exact resume while averaging."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import neurallm
from neurallm.training.ntasgd import ParameterAverage
from neurallm.training.optim import Schedule

from conftest import TINY_MODEL, write_patterned_corpus
from training.test_resume import SimulatedCrash, crash_at_step, losses

NTASGD = {**TINY_MODEL, "optimizer": "ntasgd", "weight_decay": 1e-4, "epochs": 4, "eval_context": 16}


@pytest.fixture(scope="module")
def trigger_after_epoch_2():
    """Whether a tiny run's validation stalls is up to chance; the trigger itself is tested on its own above, so
    the runs here start averaging after epoch 2 for certain."""
    original = Schedule.after_validation

    def after_validation(self, valid_loss):
        original(self, valid_loss)
        self.averaging = self.averaging or len(self.valid_history) >= 2

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Schedule, "after_validation", after_validation)
        yield


def test_the_trigger_is_non_monotone():
    schedule = Schedule("ntasgd", 30.0, 0, 100, nonmono=2)
    for loss in (5.0, 4.0, 3.0, 3.5):  # worse than the last one, but not than the best before the last two
        schedule.after_validation(loss)
        assert not schedule.averaging
    schedule.after_validation(4.5)  # worse than min(5.0, 4.0): the best before the last two epochs
    assert schedule.averaging
    assert schedule.lr == 30.0  # NT-ASGD never lowers the learning rate


def test_the_average_is_the_mean_of_the_iterates_of_every_parameter():
    model = torch.nn.Linear(3, 2)
    average = ParameterAverage(model)
    iterates = []
    for step in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(float(step + 1))
        if step == 0:
            average.start()
        else:
            average.update()
        iterates.append({n: p.detach().clone() for n, p in model.named_parameters()})
    raw = {n: p.detach().clone() for n, p in model.named_parameters()}
    with average.applied():
        for name, p in model.named_parameters():
            assert torch.allclose(p, torch.stack([it[name] for it in iterates]).mean(0))
    for name, p in model.named_parameters():
        assert torch.equal(p, raw[name])  # the model's own weights are back after the block


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_patterned_corpus(tmp_path_factory.mktemp("ntasgd") / "corpus", lines=60)


@pytest.fixture(scope="module")
def averaged_run(corpus, tmp_path_factory, trigger_after_epoch_2) -> tuple[Path, list[str]]:
    run = tmp_path_factory.mktemp("ntasgd-run") / "run"
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("neurallm")
    logger.addHandler(handler)
    previous_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        neurallm.train(corpus, run, **NTASGD)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous_level)
    return run, messages


def test_averaging_starts_and_covers_the_output_layer(averaged_run):
    run, messages = averaged_run
    assert any(m.startswith("NT-ASGD: validation stalled") for m in messages)
    saved = load_file(run / "last.safetensors")
    averaged = {k.removeprefix("average.") for k in saved if k.startswith("average.")}
    weights = {k.removeprefix("model.") for k in load_file(run / "model.safetensors")}
    assert averaged == weights  # every trained parameter, the output layer's weight and bias included
    assert {"head.weight", "head.bias"} <= averaged


def test_the_best_checkpoint_holds_the_averaged_weights(averaged_run):
    run, _ = averaged_run
    saved = load_file(run / "last.safetensors")
    best = load_file(run / "model.safetensors")
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    if min(m["valid_loss"] for m in metrics) != metrics[-1]["valid_loss"]:
        pytest.skip("the last epoch was not the best one")
    for key in best:
        name = key.removeprefix("model.")
        if "average." + name in saved:
            assert torch.equal(best[key], saved["average." + name]), name


@pytest.mark.usefixtures("trigger_after_epoch_2")
def test_a_crash_while_averaging_resumes_exactly(corpus, averaged_run, tmp_path, monkeypatch):
    reference, _ = averaged_run
    run = tmp_path / "run"
    tokens = sum(len(line.split()) + 1 for line in (corpus / "train.txt").read_text().splitlines())
    windows = len(range(0, tokens // NTASGD["batch_size"] - 1, NTASGD["bptt"]))
    with monkeypatch.context() as patch:
        crash_at_step(patch, 3 * windows + windows // 2)  # in the last epoch, after averaging began
        with pytest.raises(SimulatedCrash):
            neurallm.train(corpus, run, save_every=0.0, **NTASGD)
    neurallm.train(None, run, resume=True)
    assert losses(run) == losses(reference)
    ref, got = load_file(reference / "last.safetensors"), load_file(run / "last.safetensors")
    for key in ref:
        if key.startswith(("model.", "average.")):
            assert torch.equal(ref[key], got[key]), key

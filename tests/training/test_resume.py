"""A resumed run continues exactly as if it had never stopped.

``last.safetensors`` holds the weights, the optimizer moments, the learning-rate schedule, the Python, NumPy
and torch RNG states, the position in the epoch (window), the carried state (LSTM hidden state, Transformer-XL
memory) and the train loss of the epoch so far. Restoring all of it makes the resumed run's metrics and weights
*equal* (``==``, ``torch.equal``) to an uninterrupted run on CPU, whether it stopped at an epoch boundary or in
the middle of an epoch. Dropout 0.3 makes the RNG matter, AdamW the optimizer moments and schedule, the
Transformer's memory and the LSTM's state the carried state.

A ``--max-time`` stop in mid-epoch validates the partial epoch (the user gets a model evaluated at that time),
but only whole epochs drive the learning-rate schedule (SGD's lr ÷ 4 on a plateau), so extending such a run is
exact too.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import neurallm
from neurallm.errors import ConfigError, RunDirError
from neurallm.training.loop import Trainer

from conftest import TINY_MODEL, write_patterned_corpus

SETTINGS = {**TINY_MODEL, "dropout": 0.3, "eval_context": 16, "epochs": 2}
VARIANTS = {
    "lstm-sgd": {},
    "lstm-adamw": {"optimizer": "adamw", "lr": 3e-3, "warmup": 4},
    "awd-variable-bptt": {"model": "AWD_LSTM", "variable_bptt": True, "optimizer": "ntasgd", "nonmono": 1, "wdrop": 0.3,
                          "dropoute": 0.1, "dropouti": 0.2, "alpha": 1.0, "beta": 1.0},
    "transformer-memory": {"model": "Transformer", "memory": 4, "nhead": 2},
}


class SimulatedCrash(BaseException):
    """Stands for a `kill -9`: nothing after it runs, no cleanup saves anything."""


def crash_at_step(monkeypatch, step: int) -> None:
    """Make the ``step``-th optimisation step (1-based, over the whole run) die before doing anything."""
    original = Trainer._step
    calls = {"n": 0}

    def step_or_crash(self, inputs, targets):
        calls["n"] += 1
        if calls["n"] == step:
            raise SimulatedCrash
        return original(self, inputs, targets)

    monkeypatch.setattr(Trainer, "_step", step_or_crash)


def losses(run: Path) -> list[tuple[float, float, bool]]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["train_loss"], r["valid_loss"], r["complete"]) for r in records]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return {k.removeprefix("model."): v for k, v in load_file(path).items() if not k.startswith(("optim.", "rng.", "carry."))}


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_patterned_corpus(tmp_path_factory.mktemp("resume") / "corpus", lines=60)


@pytest.fixture(scope="module")
def windows_per_epoch(corpus) -> int:
    tokens = sum(len(line.split()) + 1 for line in (corpus / "train.txt").read_text().splitlines())
    rows = tokens // SETTINGS["batch_size"]
    return len(range(0, rows - 1, SETTINGS["bptt"]))


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory) -> dict[str, Path]:
    """Each variant trained for 2 epochs in one go: the reference every resumed run must equal."""
    root = tmp_path_factory.mktemp("uninterrupted")
    runs = {}
    for name, extra in VARIANTS.items():
        neurallm.train(corpus, root / name, **{**SETTINGS, **extra})
        runs[name] = root / name
    return runs


def test_extending_epochs_equals_an_uninterrupted_run(corpus, uninterrupted, tmp_path):
    run = tmp_path / "run"
    neurallm.train(corpus, run, **{**SETTINGS, "epochs": 1})
    assert len(losses(run)) == 1
    result = neurallm.train(None, run, resume=True, epochs=2)
    assert result.epochs_completed == 2
    assert losses(run) == losses(uninterrupted["lstm-sgd"])
    assert_same_weights(run / "last.safetensors", uninterrupted["lstm-sgd"] / "last.safetensors")
    assert_same_weights(run / "model.safetensors", uninterrupted["lstm-sgd"] / "model.safetensors")
    assert json.loads((run / "config.json").read_text())["train"]["epochs"] == 2


@pytest.mark.parametrize("where", ["after-epoch-1", "mid-epoch-2"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_crashed_run_resumes_exactly(variant, where, corpus, uninterrupted, windows_per_epoch, tmp_path, monkeypatch,
                                     caplog):
    run = tmp_path / "run"
    settings = {**SETTINGS, **VARIANTS[variant]}
    if where == "after-epoch-1":
        # checkpoints only at epoch ends: the crash in the first step of epoch 2 falls back to the end of epoch 1
        crash_step, save_every = windows_per_epoch + 1, 300.0
    else:
        # a checkpoint after every step: the crash loses nothing, the run resumes in the middle of epoch 2
        crash_step, save_every = windows_per_epoch + windows_per_epoch // 2, 0.0
    with monkeypatch.context() as patch:
        crash_at_step(patch, crash_step)
        with pytest.raises(SimulatedCrash):
            neurallm.train(corpus, run, save_every=save_every, **settings)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="neurallm"):
        neurallm.train(None, run, resume=True)
    messages = caplog.messages
    expected_window = 0 if where == "after-epoch-1" else crash_step - 1 - windows_per_epoch
    assert messages[0] == f"resuming {run} at epoch 2, batch {expected_window}"
    reference = uninterrupted[variant]
    assert losses(run) == losses(reference)
    assert_same_weights(run / "last.safetensors", reference / "last.safetensors")
    assert_same_weights(run / "model.safetensors", reference / "model.safetensors")


def test_ctrl_c_mid_epoch_then_resume_equals_an_uninterrupted_run(corpus, uninterrupted, windows_per_epoch, tmp_path,
                                                                  monkeypatch, caplog):
    """Ctrl-C finishes the step, saves the state and stops; --resume picks up at the next window."""
    original = Trainer._step
    calls = {"n": 0}

    def step_then_ctrl_c(self, inputs, targets):
        calls["n"] += 1
        loss = original(self, inputs, targets)
        if calls["n"] == windows_per_epoch + 3:
            signal.raise_signal(signal.SIGINT)  # handled by the trainer: no KeyboardInterrupt here
        return loss

    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "_step", step_then_ctrl_c)
        stopped = neurallm.train(corpus, run, **SETTINGS)
    assert stopped.stopped_by == "interrupt" and stopped.epochs_completed == 1
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="neurallm"):
        neurallm.train(None, run, resume=True)
    messages = caplog.messages
    assert messages[0] == f"resuming {run} at epoch 2, batch 3"
    assert losses(run) == losses(uninterrupted["lstm-sgd"])
    assert_same_weights(run / "last.safetensors", uninterrupted["lstm-sgd"] / "last.safetensors")


@pytest.mark.parametrize("variant", ["lstm-sgd", "lstm-adamw"])
def test_max_time_stop_then_extension_equals_an_uninterrupted_run(corpus, tmp_path, variant):
    settings = {**SETTINGS, **VARIANTS[variant], "max_time": 1000.0}
    reference = tmp_path / "reference"
    neurallm.train(corpus, reference, **settings)
    run = tmp_path / "run"
    stopped = neurallm.train(corpus, run, **{**settings, "max_time": 1e-9})  # stops after the first step
    assert stopped.stopped_by == "max_time" and stopped.epochs_completed == 0
    assert losses(run)[-1][2] is False  # the partial epoch was validated and recorded as incomplete
    result = neurallm.train(None, run, resume=True, max_time=1000.0)
    assert result.stopped_by == "epochs" and result.epochs_completed == 2
    complete = [record for record in losses(run) if record[2]]
    assert complete == losses(reference)  # the completed epochs' train loss covers the whole epoch, both parts
    assert_same_weights(run / "last.safetensors", reference / "last.safetensors")


@pytest.fixture(scope="module")
def finished_run(corpus, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("finished") / "run"
    neurallm.train(corpus, run, **{**SETTINGS, "epochs": 1})
    return run


@pytest.mark.parametrize("change, flag", [
    ({"lr": 5.0}, "--lr 5.0 differs from the run's 2.0"),
    ({"model": "GRU"}, "--model GRU differs from the run's LSTM"),
    ({"bptt": 4}, "--bptt 4 differs from the run's 8"),
    ({"dropout": 0.1}, "--dropout 0.1 differs from the run's 0.3"),
    ({"seed": 8}, "--seed 8 differs"),
    ({"optimizer": "adamw"}, "--optimizer adamw differs"),
    ({"level": "char"}, "--level char differs from the run's word"),
    ({"eval_context": 3}, "--context 3 differs"),
], ids=lambda value: next(iter(value)) if isinstance(value, dict) else None)
def test_resume_with_a_changed_setting_is_an_error_naming_the_flag(finished_run, change, flag):
    before = (finished_run / "last.safetensors").read_bytes()
    with pytest.raises(ConfigError, match="only --epochs, --max-time, --device and --compile may change") as error:
        neurallm.train(None, finished_run, resume=True, **change)
    assert flag in str(error.value)
    assert (finished_run / "last.safetensors").read_bytes() == before


def test_resume_with_other_data_is_an_error(finished_run, tmp_path):
    other = write_patterned_corpus(tmp_path / "other", lines=60, seed=1)
    with pytest.raises(ConfigError, match=r"--data .*other differs from the run's"):
        neurallm.train(other, finished_run, resume=True)


def test_resume_with_the_same_settings_repeated_is_accepted(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    result = neurallm.train(None, run, resume=True, lr=SETTINGS["lr"], bptt=SETTINGS["bptt"], model="LSTM")
    assert result.epochs_completed == 1  # nothing left to do: the run already reached its epochs


def test_resume_detects_changed_data_behind_the_same_path(corpus, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(corpus, data)
    run = tmp_path / "run"
    neurallm.train(data, run, **{**SETTINGS, "epochs": 1})
    with open(data / "train.txt", "a", encoding="utf-8") as f:
        f.write("the cat sat on the mat\n")
    with pytest.raises(neurallm.TrainingError, match="resume with the original data"):
        neurallm.train(None, run, resume=True, epochs=2)


def test_resume_of_a_run_without_any_checkpoint_says_to_start_again(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "last.safetensors").unlink()  # as a kill between config.json and the first checkpoint leaves it
    (run / "model.safetensors").unlink()
    with pytest.raises(RunDirError, match="nothing to resume or keep; start it again with .* --force"):
        neurallm.train(None, run, resume=True)


def test_resume_without_last_checkpoint_names_the_weights_left_and_does_not_advise_force(finished_run, tmp_path):
    """--force would delete model.safetensors, the only trained weights left: the advice is to keep them."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "last.safetensors").unlink()
    with pytest.raises(RunDirError) as error:
        neurallm.train(None, run, resume=True)
    message = str(error.value)
    assert "model.safetensors, are still there" in message and "another --out" in message
    assert "start it again" not in message and "--force would delete them" in message
    assert (run / "model.safetensors").is_file()

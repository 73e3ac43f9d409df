"""A run folder has one writer, stops cleanly on SIGTERM, and is never wiped or recreated by mistake.

These run ``neurallm train`` as a real process (a tiny model on many epochs, checkpointing every step) and
act on it while it trains: a second writer, a SIGTERM, the folder deleted under it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TINY_MODEL, write_patterned_corpus
from neurallm.cli import main
from neurallm.locking import LOCK_FILE

FLAGS = [arg for key, value in TINY_MODEL.items() for arg in (f"--{key.replace('_', '-')}", str(value))] + ["--context", "8"]


@pytest.fixture
def corpus(tmp_path) -> Path:
    return write_patterned_corpus(tmp_path / "corpus", lines=60)


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


class Training:
    """``neurallm train`` running in another process until it is stopped."""

    def __init__(self, corpus: Path, out: Path) -> None:
        self.out = out
        argv = [sys.executable, "-m", "neurallm", "train", "--data", str(corpus), "--out", str(out), *FLAGS,
                "--epochs", "100000", "--save-every", "0", "--no-progress"]
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        env={**os.environ, "OMP_NUM_THREADS": "1"})

    def wait_until_training(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not ((self.out / "last.safetensors").is_file() and (self.out / LOCK_FILE).is_file()):
            assert self.process.poll() is None, self.process.communicate()
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.05)
        time.sleep(0.3)  # a few steps in

    def finish(self, timeout: float = 120) -> tuple[int, str, str]:
        """Exit code, standard output (the log) and standard error (errors) once the process ends."""
        try:
            out, err = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            _, err = self.process.communicate()
            pytest.fail(f"training did not stop: {err}")
        return self.process.returncode, out, err

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.communicate()


@pytest.fixture
def training(corpus, tmp_path):
    running = Training(corpus, tmp_path / "run")
    running.wait_until_training()
    yield running
    running.stop()


@pytest.mark.integration
def test_a_second_writer_is_refused_with_the_pid_and_the_run_is_left_alone(training, corpus, capsys):
    out, pid = training.out, training.process.pid
    stray = out / ".last.safetensors.from-the-live-run.tmp"  # stands for the live process's half-written checkpoint
    stray.write_bytes(b"half a checkpoint")
    assert main(["train", "--data", str(corpus), "--out", str(out), *FLAGS, "--no-progress", "--force"]) == 1
    assert f"is in use by another neurallm process (PID {pid}, writing a training run)" in _one_line(capsys)
    assert main(["train", "--out", str(out), "--resume", "--max-time", "0.01", "--no-progress"]) == 1
    assert f"PID {pid}" in _one_line(capsys)
    assert stray.exists()  # the refused --resume cleaned up nothing
    # readers take no lock: eval reads whole files while the run trains
    assert main(["eval", str(out), "--json"]) == 0
    assert training.process.poll() is None


@pytest.mark.integration
def test_sigterm_finishes_the_step_saves_and_exits_cleanly(training, capsys):
    training.process.send_signal(signal.SIGTERM)
    code, log, err = training.finish()
    assert code == 0, err
    assert "interrupted (SIGTERM): saving the current state" in log
    results = json.loads((training.out / "results.json").read_text())
    assert results["stopped_by"] == "interrupt"
    assert not (training.out / LOCK_FILE).exists()  # released on the way out
    assert main(["train", "--out", str(training.out), "--resume", "--max-time", "0.01", "--no-progress"]) == 0


@pytest.mark.integration
def test_a_run_folder_deleted_while_training_is_not_recreated(training):
    for _ in range(50):  # the trainer may be writing a temp file while the folder goes: delete until gone
        shutil.rmtree(training.out, ignore_errors=True)
        if not training.out.exists():
            break
    code, _, err = training.finish()
    assert code == 1, err
    errors = [line for line in err.strip().splitlines() if not line.startswith("warning: ")]  # the tiny corpus's
    assert len(errors) == 1 and "Traceback" not in err, err
    assert "while training" in err and ("was deleted or moved" in err or "was the run folder deleted or moved?" in err)
    assert not training.out.exists()


# --- --force deletes only provable runs ------------------------------------------------------------------


def _run(corpus: Path, out: Path) -> Path:
    assert main(["train", "--data", str(corpus), "--out", str(out), *FLAGS, "--no-progress"]) == 0
    return out


@pytest.mark.parametrize("intruder", ["thesis.tex", "src/"])
def test_force_refuses_a_run_folder_holding_anything_a_run_does_not_write(corpus, tmp_path, capsys, intruder):
    out = _run(corpus, tmp_path / "run")
    if intruder.endswith("/"):
        (out / intruder).mkdir()
    else:
        (out / intruder).write_text("four years of work")
    before = sorted(p.name for p in out.iterdir())
    capsys.readouterr()
    assert main(["train", "--data", str(corpus), "--out", str(out), *FLAGS, "--no-progress", "--force"]) == 1
    assert f"it holds {intruder.rstrip('/')}, which a run does not write" in _one_line(capsys)
    assert sorted(p.name for p in out.iterdir()) == before


def test_force_refuses_a_folder_whose_config_is_not_a_runs(corpus, tmp_path, capsys):
    model = tmp_path / "hf-model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "n_layer": 12}))
    (model / "model.safetensors").write_bytes(b"weights someone downloaded")
    assert main(["train", "--data", str(corpus), "--out", str(model), *FLAGS, "--no-progress", "--force"]) == 1
    assert "its config.json is not a neurallm run's" in _one_line(capsys)
    assert (model / "model.safetensors").read_bytes() == b"weights someone downloaded"


@pytest.mark.integration
def test_force_replaces_a_run_with_its_leftover_temp_files(corpus, tmp_path, capsys):
    out = _run(corpus, tmp_path / "run")
    (out / ".model.safetensors.abc123.tmp").write_bytes(b"left by a kill")
    (out / LOCK_FILE).write_text("999999999 a training run\n")  # left by a kill -9: nobody holds it
    assert main(["train", "--data", str(corpus), "--out", str(out), *FLAGS, "--no-progress", "--force"]) == 0
    assert not (out / ".model.safetensors.abc123.tmp").exists() and not (out / LOCK_FILE).exists()


# --- validate before touching the folder ---------------------------------------------------------------------


def test_a_seed_beyond_the_window_shuffles_product_trains(corpus, tmp_path):
    """--shuffle-windows multiplies the seed; the largest 64-bit seed used to overflow after the folder was made."""
    out = tmp_path / "run"
    assert main(["train", "--data", str(corpus), "--out", str(out), *FLAGS, "--no-progress", "--shuffle-windows",
                 "--seed", str(2**64 - 1)]) == 0
    assert json.loads((out / "results.json").read_text())["stopped_by"] == "epochs"

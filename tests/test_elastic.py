"""torchrun's restarts and failures, the parts one process can check: which folder a restarted attempt resumes,
how a collective's failure is read, and the --ddp-timeout setting. The real processes are in
tests/training/test_torchrun_failures.py."""

from __future__ import annotations

import json
import math

import pytest
import torch

import neurallm
from neurallm.distributed import SINGLE, Ranks, as_peer_lost, peer_failure
from neurallm.elastic import LAUNCH_FILE
from neurallm.errors import ConfigError, PeerLostError, RunDirError

from tests.conftest import TINY_MODEL

GLOO_DIED = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
             "[127.0.0.1]:30945. This is typically caused by a remote worker crashing. GLHF!")
GLOO_RESET = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:18846: "
              "Connection reset by peer. This is typically caused by a remote worker hanging")
GLOO_STALLED = "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 5000ms for recv operation to complete"


@pytest.fixture
def restartable(monkeypatch):
    """The environment torchrun --max-restarts 2 gives its workers' first attempt (one process)."""
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "launch-1")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    return monkeypatch


def _restarted(monkeypatch, count: int = 1) -> None:
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", str(count))


def test_a_restarted_attempt_resumes_the_run_its_own_command_started(tiny_corpus, tmp_path, restartable):
    run = tmp_path / "run"
    settings = {**TINY_MODEL, "epochs": 2}
    neurallm.train(tiny_corpus, run, progress=False, **settings)
    assert json.loads((run / LAUNCH_FILE).read_text())["run_id"] == "launch-1"
    before = (run / "config.json").read_text()
    _restarted(restartable)
    result = neurallm.train(tiny_corpus, run, progress=False, **settings)  # no resume=True: torchrun cannot add it
    assert result.epochs_completed == 2 and math.isfinite(result.test.loss)
    assert (run / "config.json").read_text() == before
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2  # continued, not started again


@pytest.mark.parametrize("change", ["another setting", "another launch", "no launch record"])
def test_a_restarted_attempt_never_takes_over_a_run_another_command_started(tiny_corpus, tmp_path, restartable, change):
    run = tmp_path / "run"
    neurallm.train(tiny_corpus, run, progress=False, **TINY_MODEL)
    settings = dict(TINY_MODEL)
    if change == "another setting":
        settings["lr"] = 1.0
    elif change == "another launch":
        restartable.setenv("TORCHELASTIC_RUN_ID", "launch-2")
    else:
        (run / LAUNCH_FILE).unlink()
    before = (run / "last.safetensors").read_bytes()
    _restarted(restartable)
    with pytest.raises(RunDirError, match="already exists and is not empty; use --resume to continue it or --force"):
        neurallm.train(tiny_corpus, run, progress=False, **settings)
    assert (run / "last.safetensors").read_bytes() == before


def test_a_restarted_attempt_starts_again_when_the_first_died_before_its_first_checkpoint(tiny_corpus, tmp_path, restartable):
    run = tmp_path / "run"
    neurallm.train(tiny_corpus, run, progress=False, **TINY_MODEL)
    for name in ("last.safetensors", "model.safetensors", "metrics.jsonl", "results.json", "curves.png"):
        (run / name).unlink(missing_ok=True)  # as the folder is between claiming it and the first checkpoint
    _restarted(restartable)
    result = neurallm.train(tiny_corpus, run, progress=False, **TINY_MODEL)
    assert result.epochs_completed == 1 and (run / "last.safetensors").is_file() and (run / LAUNCH_FILE).is_file()


def test_without_max_restarts_no_launch_record_is_written(tiny_corpus, tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_MAX_RESTARTS", raising=False)
    neurallm.train(tiny_corpus, tmp_path / "run", progress=False, **TINY_MODEL)
    assert not (tmp_path / "run" / LAUNCH_FILE).exists()


@pytest.mark.parametrize("seconds", [0, -5, math.nan, math.inf])
def test_ddp_timeout_must_be_a_positive_number_of_seconds(tiny_corpus, tmp_path, seconds):
    with pytest.raises(ConfigError, match="--ddp-timeout must be a positive number of seconds"):
        neurallm.train(tiny_corpus, tmp_path / "run", ddp_timeout=seconds, progress=False, **TINY_MODEL)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("exc, kind", [
    (RuntimeError(GLOO_DIED), "died"),
    (RuntimeError(GLOO_RESET), "died"),
    (RuntimeError(GLOO_STALLED), "stalled"),
    (torch.distributed.DistNetworkError("Connection reset by peer"), "died"),
    (torch.distributed.DistStoreError("wait timeout after 5000ms"), "stalled"),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), None),  # a bug keeps its own traceback
    (ValueError("Connection closed by peer gloo/"), None),
])
def test_a_collective_that_failed_because_of_a_peer_is_told_from_other_errors(exc, kind):
    assert peer_failure(exc) == kind


def test_a_lost_peer_becomes_one_line_naming_the_rank_the_run_and_what_to_do():
    error = as_peer_lost(RuntimeError(GLOO_DIED), Ranks(1, 4), 600.0, "runs/a")
    assert isinstance(error, PeerLostError) and "\n" not in str(error)
    assert str(error).startswith("rank 1 of 4: another process died (Connection closed by peer [127.0.0.1]:30945). "
                                 "The last checkpoint in runs/a is intact")
    assert "--max-restarts" in str(error) and "--resume" in str(error)
    stalled = as_peer_lost(RuntimeError(GLOO_STALLED), Ranks(0, 2), 90.0, "runs/a")
    assert "sent nothing for --ddp-timeout 90s" in str(stalled)
    other = RuntimeError("mat1 and mat2 shapes cannot be multiplied")
    assert as_peer_lost(other, Ranks(0, 2), 600.0, "runs/a") is other
    assert as_peer_lost(RuntimeError(GLOO_DIED), SINGLE, 600.0, "runs/a").__class__ is RuntimeError  # no peers, no peer lost

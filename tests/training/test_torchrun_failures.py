"""A rank that dies or stalls under torchrun: one line on the survivors, and a restarted group that resumes.

Real processes on the CPU (gloo): two ranks started by hand (``env://`` on 127.0.0.1), torchrun ``--standalone``,
and two torchrun "nodes" on 127.0.0.1 (``--nnodes 2``, a c10d rendezvous). A rank is killed with SIGKILL (or
stopped with SIGSTOP) once the first epoch's checkpoint is on disk, so the restarted group has something to
resume and work to redo.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import write_patterned_corpus

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
# A tiny LSTM with dropout (so the ranks' RNG states matter to the resumed weights), 3 epochs of 39 windows.
FLAGS = ["--emsize", "16", "--nhid", "16", "--nlayers", "1", "--dropout", "0.1", "--batch-size", "4", "--bptt", "8",
         "--lr", "2", "--eval-batch-size", "2", "--seed", "7", "--no-progress", "--log-interval", "1000"]
EPOCHS = "3"
LAUNCH_LIMIT = 300  # seconds: generous for two CPU cores shared with other work; a healthy launch takes ~30 s


def _environment(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "OMP_NUM_THREADS": "1", **extra}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(condition: Callable[[], bool], what: str, processes: list[subprocess.Popen], limit: float = LAUNCH_LIMIT) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        if any(p.poll() is not None for p in processes):
            pytest.fail(f"a process ended before {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} after {limit}s")
        time.sleep(0.05)


def _first_epoch_saved(run: Path) -> Callable[[], bool]:
    """True once epoch 1 is checkpointed: metrics.jsonl is written right after last.safetensors."""
    return lambda: (run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").stat().st_size > 0


def _worker_of(launcher: subprocess.Popen, rank: int) -> int | None:
    """The PID of the process with RANK=rank among the launcher's children (None if it has none yet)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0") if parent == launcher.pid else []
        except (OSError, IndexError, ValueError):
            continue
        if f"RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


def _stop_all(processes: list[subprocess.Popen]) -> None:
    for p in processes:
        if p.poll() is None:
            p.kill()
        p.wait()


def _torchrun(*launch: str, train: list[str], log_dir: Path, cwd: Path, **env: str) -> subprocess.Popen:
    """torchrun with each worker's stdout and stderr in its own file under ``log_dir`` (``--redirects 3``)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "torch.distributed.run", *launch, "--log-dir", str(log_dir), "--redirects", "3",
               "-m", "neurallm", "train", *train]
    with open(log_dir / "torchrun.out", "w") as out, open(log_dir / "torchrun.err", "w") as err:
        return subprocess.Popen(command, cwd=cwd, env=_environment(**env), stdout=out, stderr=err)


def _without_corpus_warnings(text: str) -> list[str]:
    """The lines of a worker's stderr but the warnings that the tiny test corpus's splits are too small to trust."""
    return [line for line in text.splitlines() if not (line.startswith("warning: the ") and "split has only" in line)]


def _worker_log(log_dir: Path, attempt: int, stream: str) -> str:
    """What the workers of one attempt wrote to ``stream`` (stdout or stderr), all local ranks together."""
    return "".join(p.read_text() for p in sorted(log_dir.glob(f"*/attempt_{attempt}/*/{stream}.log")))


def _assert_same_final_weights(run: Path, reference: Path) -> None:
    expected, actual = load_file(str(reference / "last.safetensors")), load_file(str(run / "last.safetensors"))
    compared = [name for name in expected if name.startswith(("model.", "optim."))]
    assert compared
    for name in compared:
        assert torch.equal(expected[name], actual[name]), name
    results, reference_results = (json.loads((r / "results.json").read_text()) for r in (run, reference))
    assert results["epochs_completed"] == reference_results["epochs_completed"] == int(EPOCHS)
    assert results["test"]["loss"] == reference_results["test"]["loss"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_patterned_corpus(tmp_path_factory.mktemp("failures") / "corpus", lines=100)


@pytest.fixture(scope="module")
def uninterrupted(corpus) -> Path:
    """The run that the interrupted ones must end exactly as: the same command, never killed."""
    root = corpus.parent
    launcher = _torchrun("--standalone", "--nproc_per_node=2", train=["--data", str(corpus), "--out", "straight",
                         "--epochs", EPOCHS, *FLAGS], log_dir=root / "straight-logs", cwd=root)
    assert launcher.wait(timeout=LAUNCH_LIMIT) == 0, (root / "straight-logs" / "torchrun.err").read_text()[-3000:]
    return root / "straight"


# --- a dead or stalled peer: one line on the survivor ---------------------------------------------------------

@pytest.mark.parametrize("victim, sig", [(1, signal.SIGKILL), (0, signal.SIGKILL), (1, signal.SIGSTOP)],
                         ids=["rank 1 killed", "rank 0 killed", "rank 1 stopped"])
def test_a_dead_or_stalled_peer_leaves_one_line_on_the_survivor_and_exit_1(corpus, tmp_path, victim, sig):
    """Two ranks started as torchrun would (env:// on 127.0.0.1), so each survivor's own output is seen alone."""
    port, run = _free_port(), tmp_path / "run"
    command = [sys.executable, "-m", "neurallm", "train", "--data", str(corpus), "--out", str(run), "--epochs", "100",
               "--ddp-timeout", "5", *FLAGS]
    processes = []
    for rank in (0, 1):
        env = _environment(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
        with open(tmp_path / f"rank{rank}.out", "w") as out, open(tmp_path / f"rank{rank}.err", "w") as err:
            processes.append(subprocess.Popen(command, cwd=tmp_path, env=env, stdout=out, stderr=err))
    survivor = 1 - victim
    try:
        _wait_for(_first_epoch_saved(run), "first epoch", processes)
        os.kill(processes[victim].pid, sig)
        returncode = processes[survivor].wait(timeout=120)
    finally:
        _stop_all(processes)  # SIGKILL ends a stopped process too
    lines = _without_corpus_warnings((tmp_path / f"rank{survivor}.err").read_text())
    assert returncode == 1
    assert len(lines) == 1, lines  # no gloo traceback, nothing around the one line
    assert lines[0].startswith(f"neurallm train: error: rank {survivor} of 2: ")
    if sig == signal.SIGSTOP:
        assert "another process sent nothing for --ddp-timeout 5s" in lines[0]
    else:
        assert "another process died (" in lines[0]
    assert f"The last checkpoint in {run} is intact" in lines[0]
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["epoch"] == 1


# --- torchrun --max-restarts: the restarted group resumes -----------------------------------------------------

def test_torchrun_max_restarts_resumes_a_killed_run_to_the_weights_of_an_uninterrupted_one(corpus, uninterrupted, tmp_path):
    logs, run = tmp_path / "logs", tmp_path / "run"
    launcher = _torchrun("--standalone", "--nproc_per_node=2", "--max-restarts=1",
                         train=["--data", str(corpus), "--out", str(run), "--epochs", EPOCHS, *FLAGS], log_dir=logs, cwd=tmp_path)
    try:
        _wait_for(_first_epoch_saved(run), "first epoch", [launcher])
        os.kill(_worker_of(launcher, rank=1), signal.SIGKILL)
        assert launcher.wait(timeout=LAUNCH_LIMIT) == 0, (logs / "torchrun.err").read_text()[-3000:]
    finally:
        _stop_all([launcher])
    # the first attempt's survivor said one line; the second attempt resumed the run without --resume
    survivor_lines = _without_corpus_warnings(_worker_log(logs, 0, "stderr"))
    assert len(survivor_lines) == 1 and "rank 0 of 2: another process died" in survivor_lines[0], survivor_lines
    resumed = _worker_log(logs, 1, "stdout")
    assert "torchrun restarted the processes" in resumed and "resuming" in resumed and "end of training" in resumed
    _assert_same_final_weights(run, uninterrupted)


def test_two_nodes_on_127_0_0_1_restart_together_and_resume_to_the_uninterrupted_weights(corpus, uninterrupted, tmp_path):
    """Two torchrun agents ("nodes", one process each) meeting at a c10d rendezvous on 127.0.0.1. The node whose
    rank dies restarts by --max-restarts; the other restarts because its peer left; rank 0 resumes the run."""
    endpoint, run = f"127.0.0.1:{_free_port()}", tmp_path / "run"
    launch = ("--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}",
              f"--rdzv-id=test-{os.getpid()}", "--max-restarts=1")
    train = ["--data", str(corpus), "--out", str(run), "--epochs", EPOCHS, *FLAGS]
    nodes = [_torchrun(*launch, train=train, log_dir=tmp_path / f"node{i}", cwd=tmp_path) for i in (0, 1)]
    try:
        _wait_for(_first_epoch_saved(run), "first epoch", nodes)
        victims = [pid for pid in (_worker_of(node, rank=1) for node in nodes) if pid is not None]
        assert len(victims) == 1
        os.kill(victims[0], signal.SIGKILL)
        for i, node in enumerate(nodes):
            assert node.wait(timeout=LAUNCH_LIMIT) == 0, (tmp_path / f"node{i}" / "torchrun.err").read_text()[-3000:]
    finally:
        _stop_all(nodes)
    resumed = "".join(_worker_log(tmp_path / f"node{i}", attempt, "stdout") for i in (0, 1) for attempt in (0, 1))
    assert resumed.count("torchrun restarted the processes") == 1 and "end of training" in resumed
    _assert_same_final_weights(run, uninterrupted)


@pytest.mark.slow
def test_torchrun_max_restarts_resumes_after_a_stalled_rank_is_given_up(corpus, uninterrupted, tmp_path):
    """A stopped rank: rank 0 gives up after --ddp-timeout, torchrun kills the stopped one (SIGKILL, after its
    30-second grace for SIGTERM, which a stopped process cannot act on) and the restarted group resumes."""
    logs, run = tmp_path / "logs", tmp_path / "run"
    launcher = _torchrun("--standalone", "--nproc_per_node=2", "--max-restarts=1",
                         train=["--data", str(corpus), "--out", str(run), "--epochs", EPOCHS, "--ddp-timeout", "5", *FLAGS],
                         log_dir=logs, cwd=tmp_path)
    try:
        _wait_for(_first_epoch_saved(run), "first epoch", [launcher])
        os.kill(_worker_of(launcher, rank=1), signal.SIGSTOP)
        assert launcher.wait(timeout=LAUNCH_LIMIT) == 0, (logs / "torchrun.err").read_text()[-3000:]
    finally:
        _stop_all([launcher])
    survivor_lines = _without_corpus_warnings(_worker_log(logs, 0, "stderr"))
    assert len(survivor_lines) == 1 and "rank 0 of 2: another process sent nothing for --ddp-timeout 5s" in survivor_lines[0]
    assert "torchrun restarted the processes" in _worker_log(logs, 1, "stdout")
    _assert_same_final_weights(run, uninterrupted)

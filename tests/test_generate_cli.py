"""`neurallm generate` streams its text: Ctrl-C keeps what was made, on the terminal and in --out files."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.integration  # each test runs `neurallm generate` in a subprocess and interrupts it


def _start(*argv: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "neurallm", "generate", *argv, "--tokens", "1000000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _interrupt_when(process: subprocess.Popen, ready, timeout: float = 120) -> tuple[bytes, str]:
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130
    return out, err.decode()


def test_ctrl_c_keeps_the_text_printed_so_far(trained_run):
    process = _start(str(trained_run))
    # text arrives while the million tokens are still being made
    readable, _, _ = select.select([process.stdout], [], [], 60)
    assert readable, "no text after 60 s: the output is not streamed"
    first = os.read(process.stdout.fileno(), 200)
    out, err = _interrupt_when(process, lambda: True)
    assert first.strip()
    assert err.count("\n") == 1 and "interrupted; wrote the" in err and "Traceback" not in err


def test_ctrl_c_keeps_what_was_made_in_the_out_file(trained_run, tmp_path):
    target = tmp_path / "sample.txt"
    process = _start(str(trained_run), "--out", str(target))
    temp_files = lambda: [p for p in tmp_path.iterdir() if p.name.startswith(".sample.txt.") and p.stat().st_size > 200]
    _, err = _interrupt_when(process, lambda: bool(temp_files()))
    made = int(err.split("wrote the ")[1].split(" tokens")[0].replace(",", ""))
    text = target.read_text(encoding="utf-8")
    assert made > 0 and abs(len(text.split()) + text.count("\n") - made) <= 1  # a word or a line break per token
    assert [p.name for p in tmp_path.iterdir()] == ["sample.txt"]

"""Bytes that are not UTF-8 in `--prompt`/`--text`, as a shell passes them (issue 21.3): read as U+FFFD with a note,
never a UnicodeEncodeError or TypeError traceback, at word and BPE level, in `generate` and `score`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY_MODEL, write_patterned_corpus

REPO = Path(__file__).resolve().parents[1]
BAD = b"the cat \xff\xfe sat \xc3"  # two stray bytes and a cut two-byte character


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory) -> Path:
    import neurallm

    root = tmp_path_factory.mktemp("bpe-run")
    corpus = write_patterned_corpus(root / "corpus", lines=120)
    neurallm.train(corpus, root / "run", progress=False, level="bpe", bpe_vocab_size=300, **TINY_MODEL)
    return root / "run"


def _neurallm(*argv: bytes | str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "LC_ALL": "C.UTF-8"}
    args = [a if isinstance(a, bytes) else a.encode() for a in argv]
    return subprocess.run([sys.executable.encode(), b"-m", b"neurallm", *args], capture_output=True, env=env, timeout=300)


@pytest.mark.parametrize("level", ["word", "bpe"])
def test_raw_bytes_in_prompt_and_text_are_read_as_replacement_characters(level, trained_run, bpe_run):
    run = str(trained_run if level == "word" else bpe_run)
    scored = _neurallm("score", run, "--text", BAD, "--json")
    assert scored.returncode == 0, scored.stderr.decode()
    assert b"Traceback" not in scored.stderr
    assert "the cat \ufffd\ufffd sat \ufffd" in scored.stdout.decode("utf-8")
    assert b"--text held 3 byte(s) that are not UTF-8" in scored.stderr
    generated = _neurallm("generate", run, "--prompt", BAD, "--tokens", "5")
    assert generated.returncode == 0, generated.stderr.decode()
    assert b"Traceback" not in generated.stderr
    assert b"--prompt held 3 byte(s) that are not UTF-8" in generated.stderr

"""Runtime helpers: device choice and the allocator setting the CLI applies."""

from __future__ import annotations

import sys

import pytest

from neurallm.errors import ConfigError
from neurallm.runtime import keep_freed_memory, pick_device


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning applies on Linux only")
def test_glibc_keeps_freed_memory_for_reuse():
    assert keep_freed_memory() is True


def test_auto_device_falls_back_to_cpu_and_absent_devices_are_errors():
    import torch

    if not torch.cuda.is_available():
        assert pick_device("auto").type in ("cpu", "mps")
        with pytest.raises(ConfigError, match="--device cuda"):
            pick_device("cuda")
    assert pick_device("cpu").type == "cpu"


class _RecordingLibc:
    """Stands in for glibc: records mallopt calls instead of changing the process."""

    def __init__(self, calls: list) -> None:
        self.calls = calls

    def mallopt(self, option: int, value: int) -> int:
        self.calls.append((option, value))
        return 1


def _record_mallopt(monkeypatch) -> list:
    import ctypes

    calls: list = []
    real_cdll = ctypes.CDLL
    monkeypatch.setattr(ctypes, "CDLL", lambda name, *a, **k: _RecordingLibc(calls) if "libc" in str(name) else real_cdll(name, *a, **k))
    return calls


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning applies on Linux only")
def test_the_library_leaves_the_allocator_alone_and_the_cli_sets_it(tmp_path, monkeypatch):
    import neurallm
    from conftest import TINY_MODEL, write_patterned_corpus
    from neurallm.cli import main

    corpus = write_patterned_corpus(tmp_path / "corpus", lines=40)
    calls = _record_mallopt(monkeypatch)
    neurallm.train(corpus, tmp_path / "api-run", progress=False, **TINY_MODEL)
    assert calls == []  # a process-wide setting: only the caller decides
    main(["train", "--data", str(corpus), "--out", str(tmp_path / "cli-run"), "--no-progress", "--epochs", "1",
          "--emsize", "16", "--nhid", "16", "--nlayers", "1", "--batch-size", "4", "--bptt", "8"])
    assert len(calls) == 3  # the command owns its process and applies it
    neurallm.keep_freed_memory()  # and an API user may, explicitly
    assert len(calls) == 6

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

"""Device choice, seeding, the random-number state a resumed run must restore, and the process's allocator.

torch and numpy are imported inside the functions that need them, so that importing this module (the CLI does,
for :func:`keep_freed_memory`) costs nothing for commands that never touch a model.
"""

from __future__ import annotations

import ctypes
import random
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from neurallm.errors import ConfigError

if TYPE_CHECKING:
    import torch


def pick_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA if present, else Apple MPS, else CPU; an explicit device that is absent is an error."""
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA GPU is visible to PyTorch; use --device cpu or auto")
    if name == "mps" and not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
        raise ConfigError("--device mps: Apple MPS is not available here; use --device cpu or auto")
    return torch.device(name)


def bf16_supported(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 in hardware: a CUDA GPU that says so, or a CPU with AVX-512 BF16 or AMX
    (oneDNN's check). Elsewhere PyTorch emulates bfloat16 products in float32 at a fraction of float32's speed."""
    import torch

    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def amp_dtype_for(mode: str, device: torch.device, flag: str = "--amp") -> torch.dtype | None:
    """The dtype of the matrix products that ``--amp MODE`` asks for on ``device`` (None: float32).

    ``bf16`` on a device without bfloat16 hardware is refused (its products would be slower than float32's, and
    the user asked for speed); ``auto`` takes bfloat16 where the hardware has it and float32 elsewhere.
    """
    import torch

    if mode == "none":
        return None
    supported = bf16_supported(device)
    if mode == "auto":
        return torch.bfloat16 if supported else None
    if mode != "bf16":
        raise ConfigError(f"{flag} must be one of none, bf16, auto, got {mode!r}")
    if not supported:
        raise ConfigError(f"{flag} bf16: this {device.type.upper()} has no bfloat16 hardware (a CPU needs AVX-512 BF16 "
                          f"or AMX; a GPU, Ampere or newer), so bfloat16 would be slower than float32; use {flag} none "
                          "or auto")
    return torch.bfloat16


def precision_name(amp_dtype: torch.dtype | None) -> str:
    """``bfloat16`` or ``float32``: the precision of the products, as ``eval --json`` and metrics record it."""
    return "float32" if amp_dtype is None else str(amp_dtype).removeprefix("torch.")


@contextmanager
def cuda_matmul_precision(device: torch.device, *, tf32: bool) -> Iterator[None]:
    """Float32 products on CUDA for the duration: TF32 tensor cores (``tf32``: training, the setting every
    large-model trainer uses: 10-bit mantissa products, float32 accumulation) or full float32 (evaluation, whose
    perplexity must not depend on the GPU's precision mode; cuDNN's RNNs otherwise use TF32 by default).

    The caller's settings come back afterwards: the library changes no process-wide setting for good. Nothing
    changes on other devices.
    """
    if device.type != "cuda":
        yield
        return
    import torch

    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    torch.backends.cudnn.allow_tf32 = tf32
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.allow_tf32 = saved[1]


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    """Python/NumPy RNG state as JSON-able data, and torch RNG states as tensors."""
    import numpy as np
    import torch

    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    json_state = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_name, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
    }
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    return json_state, tensors


def restore_rng_state(json_state: dict, tensors: dict[str, torch.Tensor]) -> None:
    import numpy as np
    import torch

    py_version, py_state, py_gauss = json_state["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = json_state["numpy"]
    np.random.set_state((np_name, np.asarray(np_keys, dtype=np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(tensors["rng.torch"])
    cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse instead of returning it to the OS at once.

    Every training step allocates and frees buffers of tens of megabytes (the logits of a window). By default
    glibc serves those with mmap and gives them back with munmap, so each step pays page faults on fresh
    memory: measured on 2 CPU cores, an LSTM 64/64 epoch on wt2-lite spent 36 s in the kernel and ran at 7,700
    tokens/s, against 14,400 tokens/s with the settings below (identical losses). Returns whether it applied
    (glibc on Linux only; elsewhere nothing changes).

    It changes the whole process (the memory stays with it until it exits), so the library never calls it on
    its own: the ``neurallm`` command does, and a program that trains through the Python API may call it once
    at start-up to get the same speed.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    applied = libc.mallopt(m_mmap_threshold, 32 * 2**20)  # the largest value glibc accepts on 64-bit
    applied &= libc.mallopt(m_trim_threshold, 2**30)
    applied &= libc.mallopt(m_top_pad, 256 * 2**20)
    return bool(applied)

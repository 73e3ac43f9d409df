"""Trained weights in safetensors files: checked against the run's config before anything is built, then loaded.

Inference (``eval``, ``generate``, ``score``, ``serve``, ``export``) reads a run's weights through this module;
writing them, with the training state beside them, is :mod:`neurallm.training.checkpoint`'s job.

A checkpoint may have been crafted or damaged, so its header (8-byte length + JSON, capped in bytes and tensors)
is read from a regular file alone and compared with the shapes ``config.json`` implies *before* the model is
allocated: ``nhid`` 20000 in a config costs a comparison, not gigabytes. Nothing here unpickles.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from neurallm.config import ModelConfig
from neurallm.errors import RunDirError
from neurallm.models import build_model

# A checkpoint header is about 150 bytes a tensor (a run has tens): these caps are far beyond any real one.
MAX_HEADER_BYTES = 16 << 20
MAX_TENSORS = 100_000
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
# NT-ASGD's running averages of the weights, saved in last.safetensors beside the raw weights
AVERAGE_PREFIX = "average."


# What torch.compile (``_orig_mod.``) and DistributedDataParallel (``module.``) put in front of the wrapped
# model's parameter names: a checkpoint names the model's own parameters, loadable without either wrapper.
WRAPPER_PREFIXES = ("_orig_mod.", "module.")


def plain_name(name: str) -> str:
    """A parameter name without the prefixes of the wrappers around the model (``_orig_mod.module.x`` → ``x``)."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix):], True
    return name


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict on the CPU with shared tensors (tied weights) kept once, as safetensors requires,
    and the names of the model itself even when ``model`` is a compiled or DDP wrapper of it."""
    seen: set[tuple] = set()
    tensors = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype)
        if key in seen:
            continue
        seen.add(key)
        tensors[plain_name(name)] = tensor.detach().contiguous().cpu()
    return tensors


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The weight names and shapes ``config`` implies, as :func:`model_tensors` would save them.

    Built on the meta device: no memory is allocated, so a crafted config costs nothing here.
    """
    with torch.device("meta"):
        model = build_model(config)
    seen: set[int] = set()
    shapes = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:  # tied weights: saved once, under their first name (as model_tensors does)
            continue
        seen.add(id(tensor))
        shapes[name] = tuple(tensor.shape)
    return shapes


@dataclass
class TensorInfo:
    """One entry of a safetensors header."""

    dtype: str
    shape: tuple[int, ...]


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """The tensor entries and metadata of a safetensors file, read from its header alone (8-byte length + JSON).

    Capped at MAX_HEADER_BYTES and MAX_TENSORS, so a crafted header cannot take memory or time.
    """
    path = Path(path)
    if not os.path.lexists(path):
        raise RunDirError(f"{path} is missing; the run has no checkpoint yet (train it, or --resume it)")
    damaged = f"{path} is not a readable safetensors file"
    try:
        # O_NONBLOCK: a FIFO planted under the name must not hang the open
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise RunDirError(f"{damaged} (not a regular file); the run directory is damaged")
            prefix = f.read(8)
            size = int.from_bytes(prefix, "little")
            if len(prefix) < 8 or size > MAX_HEADER_BYTES:
                raise RunDirError(f"{damaged} (header length {size:,} bytes); the run directory is damaged")
            raw = f.read(size)
    except OSError as exc:
        raise RunDirError(f"{damaged} ({exc.strerror or exc}); the run directory is damaged") from None
    try:
        header = json.loads(raw)
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or len(header) > MAX_TENSORS:
            raise ValueError(f"{len(header):,} tensors" if len(header) > MAX_TENSORS else "bad metadata")
        entries = {}
        for name, entry in header.items():
            shape = tuple(entry["shape"])
            if not isinstance(entry["dtype"], str) or not all(isinstance(n, int) and n >= 0 for n in shape):
                raise ValueError(f"bad entry {name}")
            entries[name] = TensorInfo(entry["dtype"], shape)
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError, UnicodeDecodeError) as exc:
        raise RunDirError(f"{damaged} (header: {exc}); the run directory is damaged") from None
    return entries, metadata


def check_weights_fit(path: Path, config: ModelConfig) -> None:
    """Refuse a checkpoint whose header does not match ``config`` (names, shapes, float dtypes), before any
    model is built or any tensor read."""
    entries, _ = read_safetensors_header(path)
    weights = {k[len("model."):]: v for k, v in entries.items() if k.startswith("model.")} or entries
    expected = expected_shapes(config)
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise RunDirError(f"{path} lacks weights {', '.join(missing[:3])}; it does not belong to this run's config.json")
    for name, shape in expected.items():
        if weights[name].shape != shape:
            raise RunDirError(
                f"{path}: weight {name} has shape {weights[name].shape} but config.json implies "
                f"{shape} (vocabulary or layer sizes differ); the checkpoint and config do not match"
            )
        if weights[name].dtype not in FLOAT_DTYPES:
            raise RunDirError(f"{path}: weight {name} has type {weights[name].dtype}, not a floating-point type; "
                              "the checkpoint is damaged")


def load_model_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Load weights into ``model`` after checking they match its configuration and are finite, naming ``source`` if not."""
    expected = model_tensors(model)
    weights = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")} or tensors
    weights = {plain_name(k): v for k, v in weights.items()}
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise RunDirError(f"{source} lacks weights {', '.join(missing[:3])}; it does not belong to this run's config.json")
    for name, tensor in expected.items():
        if tuple(weights[name].shape) != tuple(tensor.shape):
            raise RunDirError(
                f"{source}: weight {name} has shape {tuple(weights[name].shape)} but config.json implies "
                f"{tuple(tensor.shape)} (vocabulary or layer sizes differ); the checkpoint and config do not match"
            )
        if not weights[name].is_floating_point():
            raise RunDirError(f"{source}: weight {name} has type {weights[name].dtype}, not a floating-point type; "
                              "the checkpoint is damaged")
        if not torch.isfinite(weights[name]).all():
            raise RunDirError(f"{source}: weight {name} holds NaN or infinite values; the checkpoint is damaged "
                              "(evaluating it would only give ppl nan)")
    target = getattr(model, "_orig_mod", model)  # a compiled model loads into the module it wraps
    target = getattr(target, "module", target)  # and so does DDP
    target.load_state_dict({k: weights[k] for k in expected}, strict=False)


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file, or a RunDirError naming it (header checked first)."""
    _, metadata = read_safetensors_header(path)
    try:
        return load_file(str(path)), metadata
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise RunDirError(f"{path} is not a readable safetensors file ({exc}); the run directory is damaged") from None


def apply_saved_average(model: nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Put the NT-ASGD averages saved in last.safetensors into ``model``'s weights (a run that has begun averaging
    is scored, like its validation, with them); no averages: the weights stay."""
    averages = {name[len(AVERAGE_PREFIX):]: t for name, t in tensors.items() if name.startswith(AVERAGE_PREFIX)}
    if not averages:
        return
    params = dict(model.named_parameters())
    if set(averages) != set(params) or any(averages[n].shape != p.shape for n, p in params.items()):
        raise RunDirError(f"{path}: its NT-ASGD averages do not match the model's parameters; the file is damaged")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(averages[name])

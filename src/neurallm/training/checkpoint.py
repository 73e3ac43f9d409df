"""The run directory: what a training run leaves behind and how it is read back.

::

    RUN/
      config.json        all settings (data, tokenizer, vocabulary, model, training)
      vocab.json         the vocabulary
      tokenizer.json     the trained BPE (--tokenizer bpe only; the tokenizers library's format)
      model.safetensors  weights with the best validation loss so far
      last.safetensors   latest weights + optimizer, schedule, RNG states, data position, carried state
      metrics.jsonl      one JSON line per epoch
      results.json       test-set evaluation of the best model at the end of training

Every file is written to a temp file in RUN, fsynced and renamed, so a `kill -9` at any moment leaves either
the previous or the new version of each. ``last.safetensors`` is one file on purpose: weights, optimizer and
data position can never come from two different moments. Nothing here unpickles: weights are safetensors,
everything else is JSON (a planted pickle in RUN is never opened).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from neurallm.config import RunConfig
from neurallm.data.bpe import TOKENIZER_FILE, load_bpe_beside
from neurallm.data.vocab import Vocab
from neurallm.errors import ConfigError, RunDirError
from neurallm.fileio import atomic_write, atomic_write_json, atomic_write_text, is_temp_file

CONFIG_FILE = "config.json"
VOCAB_FILE = "vocab.json"
BEST_FILE = "model.safetensors"
LAST_FILE = "last.safetensors"
METRICS_FILE = "metrics.jsonl"
RESULTS_FILE = "results.json"


def is_run_dir(folder: Path) -> bool:
    return (Path(folder) / CONFIG_FILE).is_file()


def check_new_run_dir(folder: Path, force: bool) -> None:
    """Raise unless ``folder`` can hold a new run: absent, empty, or (with ``force``) an old run to replace.

    Only checks; :func:`prepare_new_run_dir` deletes, once everything else about the new run has been checked.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise RunDirError(f"--out {folder} is a file; name a folder for the run")
    if not (folder.is_dir() and any(folder.iterdir())):
        return
    if not is_run_dir(folder) and not (folder / LAST_FILE).exists():
        # --force replaces runs, not arbitrary folders a typo could point at (a home directory, say).
        if force:
            raise RunDirError(f"--out {folder} is a non-empty folder that is not a neurallm run; refusing to delete it even with --force")
        raise RunDirError(f"--out {folder} is a non-empty folder that is not a neurallm run; name a new or empty folder for the run")
    if not force:
        raise RunDirError(f"--out {folder} already exists and is not empty; use --resume to continue it or --force to replace it")


def prepare_new_run_dir(folder: Path, force: bool) -> None:
    """Create an empty run directory, replacing an old run only with ``force``."""
    folder = Path(folder)
    check_new_run_dir(folder, force)
    if folder.is_dir() and any(folder.iterdir()):
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)


def remove_stale_temp_files(folder: Path) -> None:
    """Delete the temp files a killed process left in a run directory."""
    for path in Path(folder).iterdir():
        if path.is_file() and is_temp_file(path.name):
            path.unlink(missing_ok=True)


def write_run_files(folder: Path, config: RunConfig, vocab: Vocab) -> None:
    atomic_write_text(Path(folder) / VOCAB_FILE, vocab.to_json())
    if vocab.bpe is not None:
        atomic_write_text(Path(folder) / TOKENIZER_FILE, vocab.bpe.to_json())
    atomic_write_json(Path(folder) / CONFIG_FILE, config.to_dict())


def read_run_config(folder: Path) -> RunConfig:
    folder = Path(folder)
    if not folder.exists():
        raise RunDirError(f"{folder}: no such run directory; train one with `neurallm train --out {folder}`")
    if not is_run_dir(folder):
        raise RunDirError(f"{folder} is not a neurallm run directory (no {CONFIG_FILE}); give the --out folder of `neurallm train`")
    try:
        data = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunDirError(f"{folder / CONFIG_FILE} cannot be read as JSON ({exc}); the run directory is damaged") from None
    try:
        return RunConfig.from_dict(data, str(folder / CONFIG_FILE))
    except ConfigError as exc:
        raise RunDirError(str(exc)) from None


def read_vocab(folder: Path) -> Vocab:
    path = Path(folder) / VOCAB_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RunDirError(f"{path} cannot be read ({exc}); the run directory is incomplete") from None
    vocab = Vocab.from_json(text, path)
    vocab.bpe = load_bpe_beside(folder)
    return vocab


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


def load_model_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Load weights into ``model`` after checking they match its configuration, naming ``source`` if not."""
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
    target = getattr(model, "_orig_mod", model)  # a compiled model loads into the module it wraps
    target = getattr(target, "module", target)  # and so does DDP
    target.load_state_dict({k: weights[k] for k in expected}, strict=False)


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file, or a RunDirError naming it."""
    if not path.is_file():
        raise RunDirError(f"{path} is missing; the run has no checkpoint yet (train it, or --resume it)")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        return load_file(str(path)), metadata
    except (SafetensorError, OSError, ValueError) as exc:
        raise RunDirError(f"{path} is not a readable safetensors file ({exc}); the run directory is damaged") from None


def save_weights(path: Path, model: nn.Module, metadata: dict) -> None:
    tensors = model_tensors(model)
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"neurallm": json.dumps(metadata)}))


@dataclass
class TrainingState:
    """Everything besides the weights that a resumed run needs; stored in last.safetensors."""

    info: dict  # JSON: position, schedule, optimizer param groups, RNG, metrics history
    tensors: dict[str, torch.Tensor]  # optimizer moments, RNG states, carried state


def save_last(path: Path, model: nn.Module, state: TrainingState) -> None:
    tensors = {f"model.{k}": v for k, v in model_tensors(model).items()}
    tensors.update({k: v.detach().contiguous().cpu() for k, v in state.tensors.items()})
    metadata = {"neurallm_state": json.dumps(state.info)}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load_last(path: Path) -> tuple[dict[str, torch.Tensor], TrainingState]:
    tensors, metadata = read_safetensors(path)
    try:
        info = json.loads(metadata["neurallm_state"])
    except (KeyError, json.JSONDecodeError):
        raise RunDirError(f"{path} holds no training state; it cannot be resumed (its weights can still be evaluated)") from None
    rest = {k: v for k, v in tensors.items() if not k.startswith("model.")}
    return tensors, TrainingState(info, rest)


def optimizer_to_state(optimizer: torch.optim.Optimizer) -> tuple[dict, dict[str, torch.Tensor]]:
    """Split an optimizer state dict into JSON (param groups, scalars) and tensors (moments)."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for param_id, param_state in sd["state"].items():
        for key, value in param_state.items():
            if torch.is_tensor(value):
                tensors[f"optim.{param_id}.{key}"] = value
            else:
                scalars[f"{param_id}.{key}"] = value
    return {"param_groups": sd["param_groups"], "scalars": scalars}, tensors


def optimizer_from_state(optimizer: torch.optim.Optimizer, info: dict, tensors: dict[str, torch.Tensor]) -> None:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, param_id, key = name.split(".", 2)
            state.setdefault(int(param_id), {})[key] = value
    for name, value in info["scalars"].items():
        param_id, key = name.split(".", 1)
        state.setdefault(int(param_id), {})[key] = value
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in info["param_groups"]]
    # how the update runs (a fused CUDA kernel, say) belongs to this machine, not to the checkpoint
    here = optimizer.param_groups[0]
    for group in groups:
        group.update({key: here[key] for key in ("fused", "foreach", "capturable", "differentiable") if key in here})
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def write_metrics(folder: Path, records: list[dict]) -> None:
    """Rewrite metrics.jsonl from the records kept in the checkpoint, so the two always agree."""
    atomic_write_text(Path(folder) / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in records))


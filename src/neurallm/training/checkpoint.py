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
      .neurallm.lock     while a process writes the run: its PID (see :mod:`neurallm.locking`)

Every file is written to a temp file in RUN, fsynced and renamed, so a `kill -9` at any moment leaves either
the previous or the new version of each. ``last.safetensors`` is one file on purpose: weights, optimizer and
data position can never come from two different moments. Nothing here unpickles: weights are safetensors,
everything else is JSON (a planted pickle in RUN is never opened).

A run folder may have been crafted or damaged, so reading one is bounded before anything is built: JSON files
are read up to a size cap (``vocab.json`` as a symlink to ``/dev/zero`` fails at once), and a checkpoint's
header (8-byte length + JSON, capped in bytes and tensors) is compared with the shapes ``config.json`` implies
*before* the model is allocated, so ``nhid`` 20000 in a config costs a comparison, not gigabytes.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from neurallm.config import ModelConfig
from neurallm.data.bpe import TOKENIZER_FILE, load_bpe_beside
from neurallm.data.vocab import Vocab
from neurallm.errors import ConfigError, RunDirError, TrainingError
from neurallm.fileio import atomic_write, atomic_write_json, atomic_write_text, is_temp_file
from neurallm.locking import LOCK_FILE, FolderLock, check_not_locked, lock_folder
from neurallm.models import build_model
from neurallm.run_config import RunConfig
from neurallm.training.optim import Optimizer

CONFIG_FILE = "config.json"
VOCAB_FILE = "vocab.json"
BEST_FILE = "model.safetensors"
LAST_FILE = "last.safetensors"
METRICS_FILE = "metrics.jsonl"
RESULTS_FILE = "results.json"
CURVES_FILE = "curves.png"
TOKENIZER_FILE = "tokenizer.json"
# Every file a run writes: the ONE list `--force` checks, so a folder holding anything else is never deleted.
# A feature that adds a file to runs adds its name here.
RUN_FILES = (CONFIG_FILE, VOCAB_FILE, BEST_FILE, LAST_FILE, METRICS_FILE, RESULTS_FILE, CURVES_FILE, TOKENIZER_FILE,
             LOCK_FILE)
# --tensorboard's folder: the one folder a run writes, holding nothing but TensorBoard's event files
TENSORBOARD_DIR = "tensorboard"
TENSORBOARD_EVENTS_PREFIX = "events.out.tfevents."

# Size caps for reading a possibly crafted run folder. config.json is a few KB; vocab.json about 20 bytes a
# token (wikitext-103's 267k tokens: ~5 MB); a checkpoint header about 150 bytes a tensor (a run has tens).
MAX_CONFIG_BYTES = 1 << 20
MAX_VOCAB_BYTES = 256 << 20
MAX_HEADER_BYTES = 16 << 20
MAX_TENSORS = 100_000
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
_WHAT = "a training run"


def is_run_dir(folder: Path) -> bool:
    return (Path(folder) / CONFIG_FILE).is_file()


def read_bounded_text(path: Path, max_bytes: int, what: str) -> str:
    """The UTF-8 text of the regular file ``path``, refused with one line if larger than ``max_bytes``."""
    path = Path(path)
    try:
        # O_NONBLOCK: a FIFO planted under the name must not hang the open
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise RunDirError(f"{path} cannot be read: not a regular file; {what}")
            data = f.read(max_bytes + 1)
    except OSError as exc:
        raise RunDirError(f"{path} cannot be read ({exc.strerror or exc}); {what}") from None
    if len(data) > max_bytes:
        raise RunDirError(f"{path} cannot be read: larger than {max_bytes:,} bytes, far more than neurallm writes; {what}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RunDirError(f"{path} cannot be read: not UTF-8 text ({exc.reason} at byte {exc.start}); {what}") from None


def foreign_entries(folder: Path) -> list[str]:
    """Names in ``folder`` that a run does not write (anything but RUN_FILES and temp files, or not a plain file)."""
    foreign = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.name == TENSORBOARD_DIR and _is_tensorboard_dir(Path(entry.path)):
            continue
        known = entry.name in RUN_FILES or is_temp_file(entry.name)
        if not known or not entry.is_file(follow_symlinks=False):
            foreign.append(entry.name)
    return foreign


def _is_tensorboard_dir(path: Path) -> bool:
    """A real folder (no symlink) holding only TensorBoard event files, as --tensorboard writes it."""
    if path.is_symlink() or not path.is_dir():
        return False
    return all(e.name.startswith(TENSORBOARD_EVENTS_PREFIX) and e.is_file(follow_symlinks=False) for e in os.scandir(path))


def _why_not_a_run(folder: Path) -> str | None:
    """None if ``folder`` is provably a neurallm run (config parses, nothing foreign in it); else the reason."""
    if not is_run_dir(folder):
        return f"it has no {CONFIG_FILE}"
    try:
        read_run_config(folder)
    except RunDirError as exc:
        return f"its {CONFIG_FILE} is not a neurallm run's ({exc})"
    foreign = foreign_entries(folder)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        return f"it holds {shown}, which a run does not write"
    return None


def check_new_run_dir(folder: Path, force: bool, *, holding_lock: bool = False) -> None:
    """Raise unless ``folder`` can hold a new run: absent, empty, or (with ``force``) an old run to replace.

    Only checks; :func:`claim_new_run_dir` deletes, once everything else about the new run has been checked.
    ``--force`` deletes only a folder that is provably a neurallm run: its config.json parses as one and it
    holds nothing but files a run writes (RUN_FILES and temp files), so a typo cannot wipe a source tree.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise RunDirError(f"--out {folder} is a file; name a folder for the run")
    if not folder.is_dir():
        return
    if not holding_lock:
        check_not_locked(folder)
    if not any(entry.name != LOCK_FILE for entry in os.scandir(folder)):
        return
    reason = _why_not_a_run(folder)
    if reason is not None:
        if force:
            raise RunDirError(f"--out {folder} is not a neurallm run ({reason}); refusing to delete it even with --force: "
                              "name a new or empty folder for the run")
        raise RunDirError(f"--out {folder} is a non-empty folder that is not a neurallm run ({reason}); "
                          "name a new or empty folder for the run")
    if not force:
        raise RunDirError(f"--out {folder} already exists and is not empty; use --resume to continue it or --force to replace it")


def claim_new_run_dir(folder: Path, force: bool) -> FolderLock:
    """Create (or, with ``force``, empty) the run directory and return its lock, held for the whole run.

    The checks of :func:`check_new_run_dir` run again under the lock, so a process that started training in
    ``folder`` since they last ran is not overwritten. Only the files a run writes are deleted, one by one.
    """
    folder = Path(folder)
    check_new_run_dir(folder, force)
    folder.mkdir(parents=True, exist_ok=True)
    lock = lock_folder(folder, _WHAT)
    try:
        check_new_run_dir(folder, force, holding_lock=True)
        for name in os.listdir(folder):
            if name == TENSORBOARD_DIR:  # checked above: event files only
                for event_file in (folder / name).iterdir():
                    event_file.unlink()
                (folder / name).rmdir()
            elif name != LOCK_FILE:
                (folder / name).unlink()
    except BaseException:
        lock.release()
        raise
    return lock


def lock_run_dir(folder: Path) -> FolderLock:
    """The exclusive lock of an existing run (for ``--resume``); raises naming the PID of a process holding it."""
    return lock_folder(Path(folder), _WHAT)


def check_run_dir_still_there(folder: Path) -> None:
    """Raise if the run directory was deleted or moved while training, rather than recreate it without its config."""
    if not (Path(folder) / CONFIG_FILE).is_file():
        raise RunDirError(f"{folder} (or its {CONFIG_FILE}) was deleted or moved while training; stopped without writing "
                          "anything, so no half run is recreated there")


def _write_run_file(path: Path, write) -> None:
    """``atomic_write`` into a run directory that must still be there: checked before the write and after it."""
    folder = Path(path).parent
    check_run_dir_still_there(folder)
    try:
        atomic_write(path, write, create_parent=False)
    except FileNotFoundError:
        # only another program deletes files in a locked run folder: most likely the folder is being deleted
        raise RunDirError(f"{folder}: a checkpoint being written was deleted from it while training (was the run folder "
                          "deleted or moved?); stopped without recreating it") from None
    if not (folder / CONFIG_FILE).is_file():
        # deleted during the write, which (making its temp file) created the folder again: undo that
        Path(path).unlink(missing_ok=True)
        try:
            folder.rmdir()
        except OSError:
            pass  # not empty: someone else's files, left alone
        check_run_dir_still_there(folder)


def remove_stale_temp_files(folder: Path) -> None:
    """Delete the temp files a killed process left in a run directory. Call only while holding the run's lock:
    without it, the temp file could be another live process's half-written checkpoint."""
    for path in Path(folder).iterdir():
        if path.is_file() and is_temp_file(path.name):
            path.unlink(missing_ok=True)


def write_run_files(folder: Path, config: RunConfig, vocab: Vocab) -> None:
    # config.json first: from then on the folder parses as a run, so `--force` may replace it after a crash
    atomic_write_json(Path(folder) / CONFIG_FILE, config.to_dict())
    atomic_write_text(Path(folder) / VOCAB_FILE, vocab.to_json())
    if vocab.bpe is not None:
        atomic_write_text(Path(folder) / TOKENIZER_FILE, vocab.bpe.to_json())


def read_run_config(folder: Path) -> RunConfig:
    folder = Path(folder)
    if not folder.exists():
        raise RunDirError(f"{folder}: no such run directory; train one with `neurallm train --out {folder}`")
    if not is_run_dir(folder):
        raise RunDirError(f"{folder} is not a neurallm run directory (no {CONFIG_FILE}); give the --out folder of `neurallm train`")
    path = folder / CONFIG_FILE
    text = read_bounded_text(path, MAX_CONFIG_BYTES, "the run directory is damaged")
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise RunDirError(f"{path} cannot be read as JSON ({exc}); the run directory is damaged") from None
    if not isinstance(data, dict):
        raise RunDirError(f"{path} is not a JSON object; the run directory is damaged")
    try:
        return RunConfig.from_dict(data, str(path))
    except ConfigError as exc:
        raise RunDirError(str(exc)) from None


def read_vocab(folder: Path) -> Vocab:
    path = Path(folder) / VOCAB_FILE
    vocab = Vocab.from_json(read_bounded_text(path, MAX_VOCAB_BYTES, "the run directory is incomplete or damaged"), path)
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
    if not path.is_file():
        raise RunDirError(f"{path} is missing; the run has no checkpoint yet (train it, or --resume it)")
    damaged = f"{path} is not a readable safetensors file"
    try:
        with open(path, "rb") as f:
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


def save_weights(path: Path, model: nn.Module, metadata: dict) -> None:
    tensors = model_tensors(model)
    _write_run_file(path, lambda tmp: _save_file(tensors, tmp, {"neurallm": json.dumps(metadata)}))


def _save_file(tensors: dict[str, torch.Tensor], tmp: Path, metadata: dict[str, str]) -> None:
    """safetensors' writer, its own error type turned into the OSError it stands for.

    safetensors reports an I/O failure as ``SafetensorError("... No space left on device (os error 28) ...")``
    (older versions: ``Os { code: 28, ... }``); the errno is kept,
    so the atomic write that called us sees a full disk (ENOSPC) as it would from Python's own writes.
    """
    try:
        save_file(tensors, str(tmp), metadata=metadata)
    except SafetensorError as exc:
        code = re.search(r"os error (\d+)|code: (\d+)", str(exc))
        errno_code = int(code.group(1) or code.group(2)) if code else errno.EIO
        raise OSError(errno_code, f"{os.strerror(errno_code)} (writing a checkpoint)", str(tmp)) from None


@dataclass
class TrainingState:
    """Everything besides the weights that a resumed run needs; stored in last.safetensors."""

    info: dict  # JSON: position, schedule, optimizer param groups, RNG, metrics history
    tensors: dict[str, torch.Tensor]  # optimizer moments, RNG states, carried state


def save_last(path: Path, model: nn.Module, state: TrainingState) -> None:
    tensors = {f"model.{k}": v for k, v in model_tensors(model).items()}
    tensors.update({k: v.detach().contiguous().cpu() for k, v in state.tensors.items()})
    metadata = {"neurallm_state": json.dumps(state.info)}
    _write_run_file(path, lambda tmp: _save_file(tensors, tmp, metadata))


# The training-state entries a resume reads, with their JSON types (checked before any is used).
_STATE_TYPES = {"epoch": int, "window": int, "elapsed": (int, float), "faults": int, "epoch_loss": list,
                "schedule": dict, "optimizer": dict, "rng": dict, "metrics": list, "data_key": str}


def load_last(path: Path) -> tuple[dict[str, torch.Tensor], TrainingState]:
    tensors, metadata = read_safetensors(path)
    try:
        info = json.loads(metadata["neurallm_state"])
    except (KeyError, TypeError, json.JSONDecodeError, RecursionError):
        raise RunDirError(f"{path} holds no training state; it cannot be resumed (its weights can still be evaluated)") from None
    bad = [key for key, kind in _STATE_TYPES.items() if not isinstance(info, dict) or not isinstance(info.get(key), kind)
           or isinstance(info.get(key), bool)]
    if not bad and (min(info["epoch"], info["window"], info["faults"]) < 0 or not math.isfinite(info["elapsed"])):
        bad = ["epoch/window/faults/elapsed"]
    if bad:
        raise _damaged_state(path, f"entry {bad[0]!r} missing or of the wrong type")
    rest = {k: v for k, v in tensors.items() if not k.startswith("model.")}
    return tensors, TrainingState(info, rest)


def _damaged_state(path: Path, detail: str) -> RunDirError:
    return RunDirError(f"{path}: its training state is damaged ({detail}); it cannot be resumed. Its weights and "
                       f"{BEST_FILE} can still be evaluated; train again into a new --out")


@contextmanager
def reading_training_state(path: Path) -> Iterator[None]:
    """Turn an error while applying last.safetensors' training state (optimizer, schedule, RNG, carried state)
    into one line naming the file: the state was written by neurallm, so any such error means damage."""
    try:
        yield
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as exc:
        raise _damaged_state(Path(path), f"{exc.__class__.__name__}: {exc}") from None


# --- the last checkpoint's training state: what goes into last.safetensors and how it is read back ----------
#
#   info (JSON)                                    tensors
#   epoch, window, elapsed, faults                 optim.<param>.<key>     optimizer moments
#   best_valid_loss (null: none yet)               average.*               NT-ASGD's running average
#   epoch_loss [loss_sum, steps] (rank 0's)        rng.torch, rng.cuda.N   rank 0's torch generators
#   schedule, optimizer, average, rng (rank 0's)   carry.N                 rank 0's carried state (mid-epoch)
#   rank_rng, rank_epoch_loss (ranks 1..)          rankR.rng.*, rankR.carry.N   the same for rank R
#   world_size, metrics, data_key, neurallm_version


@dataclass
class Position:
    """Where a run stands: what a resume continues from, besides weights, optimizer and random streams.

    Attributes:
        epoch: completed epochs.
        window: next window of the current epoch.
        elapsed: seconds of training over all resumes.
        faults: non-finite steps recovered from so far.
        best_valid_loss: validation loss of the weights in model.safetensors (inf: none yet).
        schedule: the learning-rate schedule's state (:meth:`neurallm.training.optim.Schedule.to_dict`).
        metrics: the epoch records so far (metrics.jsonl is rewritten from them).
    """

    epoch: int
    window: int
    elapsed: float
    faults: int
    best_valid_loss: float
    schedule: dict
    metrics: list[dict]


@dataclass
class RankState:
    """One rank's own part of the training state: its random streams, carried state and epoch loss so far.

    Attributes:
        rng: Python and NumPy generator states (JSON, :func:`neurallm.runtime.capture_rng_state`).
        tensors: torch generator states (``rng.*``) and the carried state (``carry.N``), on the CPU.
        epoch_loss: ``[loss_sum, steps]`` of this rank's columns in the current epoch.
    """

    rng: dict
    tensors: dict[str, torch.Tensor]
    epoch_loss: list


def rank_prefix(rank: int) -> str:
    """Key prefix of a rank's RNG and carried state in last.safetensors (rank 0 keeps the single-process keys)."""
    return f"rank{rank}." if rank else ""


def pack_training_state(position: Position, per_rank: list[RankState], *, optimizer: Optimizer,
                        average: tuple[dict, dict[str, torch.Tensor]], data_key: str, version: str) -> TrainingState:
    """The training state :func:`save_last` stores, from the run's position and every rank's own part.

    ``average`` is NT-ASGD's ``(json, tensors)``: the same on every rank, so rank 0's is kept."""
    optim_json, optim_tensors = optimizer_to_state(optimizer)
    average_json, average_tensors = average
    main, *others = per_rank
    rank_tensors = dict(main.tensors)
    for rank, part in enumerate(others, start=1):
        rank_tensors.update({f"{rank_prefix(rank)}{k}": v for k, v in part.tensors.items()})
    info = {
        "neurallm_version": version,
        "epoch": position.epoch,
        "window": position.window,
        "elapsed": position.elapsed,
        "faults": position.faults,
        "best_valid_loss": None if math.isinf(position.best_valid_loss) else position.best_valid_loss,
        "epoch_loss": main.epoch_loss,
        "schedule": position.schedule,
        "optimizer": optim_json,
        "average": average_json,
        "rng": main.rng,
        "rank_rng": [part.rng for part in others],  # ranks 1.. (rank 0's is "rng")
        "rank_epoch_loss": [part.epoch_loss for part in others],  # and "epoch_loss"
        "world_size": len(per_rank),
        "metrics": position.metrics,
        "data_key": data_key,
    }
    return TrainingState(info, {**rank_tensors, **optim_tensors, **average_tensors})


def check_same_run(state: TrainingState, path: Path, *, data_key: str, world_size: int) -> None:
    """Refuse to resume ``path`` on other data or with another number of processes than it was trained with.

    Raises:
        TrainingError: naming the file, what differs and how to resume.
    """
    info = state.info
    if info.get("data_key") != data_key:
        raise TrainingError(
            f"{path} was trained on data prepared as {info.get('data_key')}, but --data now gives "
            f"{data_key} (the text or its settings changed); resume with the original data"
        )
    saved_world = info.get("world_size", 1)
    if saved_world != world_size:
        raise TrainingError(
            f"{path} was trained by {saved_world} process(es) and holds the carried state and random streams of "
            f"that many ranks, but this is {world_size}; resume with the same number "
            f"(torchrun --nproc_per_node {saved_world} …{', or plain neurallm train' if saved_world == 1 else ''})"
        )


def read_position(state: TrainingState) -> Position:
    """The run's position as :func:`pack_training_state` stored it (types checked by :func:`load_last`)."""
    info = state.info
    return Position(epoch=info["epoch"], window=info["window"], elapsed=info["elapsed"], faults=info.get("faults", 0),
                    best_valid_loss=math.inf if info.get("best_valid_loss") is None else info["best_valid_loss"],
                    schedule=info["schedule"], metrics=info["metrics"])


def read_rank_state(state: TrainingState, rank: int) -> RankState:
    """Rank ``rank``'s own part of the training state, its keys without the rank prefix."""
    info, prefix = state.info, rank_prefix(rank)
    own = {k[len(prefix):]: v for k, v in state.tensors.items() if k.startswith(prefix)} if prefix else state.tensors
    if rank == 0:
        return RankState(info["rng"], own, info.get("epoch_loss", [0.0, 0]))
    return RankState(info["rank_rng"][rank - 1], own, info["rank_epoch_loss"][rank - 1])


def carried_state(part: RankState, layers: int) -> list[torch.Tensor]:
    """The carried state saved mid-epoch (``carry.0`` … ``carry.{layers-1}``); empty when none was saved."""
    return [part.tensors[f"carry.{i}"] for i in range(layers) if f"carry.{i}" in part.tensors]


def optimizer_to_state(optimizer: Optimizer) -> tuple[dict, dict[str, torch.Tensor]]:
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


def optimizer_from_state(optimizer: Optimizer, info: dict, tensors: dict[str, torch.Tensor]) -> None:
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


def write_results(folder: Path, results: dict) -> None:
    """Write results.json into a run folder that must still be there (like every checkpoint file)."""
    text = json.dumps(results, indent=2, sort_keys=True) + "\n"
    _write_run_file(Path(folder) / RESULTS_FILE, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_metrics(folder: Path, records: list[dict]) -> None:
    """Rewrite metrics.jsonl from the records kept in the checkpoint, so the two always agree."""
    text = "".join(json.dumps(r) + "\n" for r in records)
    _write_run_file(Path(folder) / METRICS_FILE, lambda tmp: tmp.write_text(text, encoding="utf-8"))


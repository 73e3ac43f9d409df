"""What training writes into a run besides its config: the best weights and ``last.safetensors``, the checkpoint
``--resume`` continues from.

``last.safetensors`` is one file on purpose: weights, optimizer, schedule, RNG states, data position and carried
state can never come from two different moments. Its training state is JSON in the safetensors metadata, checked
entry by entry (types and ranges, the epoch records included) when it is loaded, at the start of ``--resume``,
so a damaged one is one line before any epoch trains rather than a traceback after one.

The run folder itself (file names, claiming and locking, config/vocabulary/metrics/results) is
:mod:`neurallm.runfolder`; reading weights for inference is :mod:`neurallm.weights`: neither needs this package.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn

from neurallm.errors import RunDirError, TrainingError
from neurallm.runfolder import BEST_FILE, check_metric_record, write_run_file
from neurallm.training.optim import Optimizer
from neurallm.weights import model_tensors, read_safetensors, read_safetensors_header

# The training loop's names for the run folder and its weights (it reaches them through this module).
from neurallm.runfolder import LAST_FILE, check_run_dir_still_there, remove_stale_temp_files, write_metrics, write_results  # noqa: E402,F401
from neurallm.weights import load_model_tensors  # noqa: E402,F401


def save_weights(path: Path, model: nn.Module, metadata: dict) -> None:
    tensors = model_tensors(model)
    write_run_file(path, lambda tmp: _save_file(tensors, tmp, {"neurallm": json.dumps(metadata)}))


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
    write_run_file(path, lambda tmp: _save_file(tensors, tmp, metadata))


# The training-state entries a resume reads, with their JSON types (checked before any is used).
_STATE_TYPES = {"epoch": int, "window": int, "elapsed": (int, float), "faults": int, "epoch_loss": list,
                "schedule": dict, "optimizer": dict, "rng": dict, "metrics": list, "data_key": str}
# Entries older checkpoints may lack (the loop has a default for each); when present, of these types.
_OPTIONAL_STATE_TYPES = {"best_valid_loss": (int, float), "average": dict, "rank_rng": list, "rank_epoch_loss": list,
                         "world_size": int}


def load_last(path: Path) -> tuple[dict[str, torch.Tensor], TrainingState]:
    """Weights and training state of ``last.safetensors``, the state checked entry by entry (:func:`check_last`)."""
    tensors, metadata = read_safetensors(path)
    info = _training_state(path, metadata)
    rest = {k: v for k, v in tensors.items() if not k.startswith("model.")}
    return tensors, TrainingState(info, rest)


def check_last(path: Path) -> None:
    """Refuse a ``last.safetensors`` whose training state is missing or damaged, from its header alone: ``--resume``
    calls it before it changes anything or trains, so a damaged state is one line at the start rather than a
    traceback after an epoch."""
    _, metadata = read_safetensors_header(path)
    _training_state(path, metadata)


def _training_state(path: Path, metadata: dict[str, str]) -> dict:
    try:
        info = json.loads(metadata["neurallm_state"])
    except (KeyError, TypeError, json.JSONDecodeError, RecursionError):
        raise RunDirError(f"{path} holds no training state; it cannot be resumed (its weights can still be evaluated)") from None
    problem = _state_problem(info)
    if problem:
        raise _damaged_state(path, problem)
    return info


def _is_kind(value, kind) -> bool:
    return isinstance(value, kind) and not isinstance(value, bool)


def _state_problem(info) -> str | None:
    """What is wrong with a training state read from JSON, or None."""
    if not isinstance(info, dict):
        return "not a JSON object"
    for key, kind in _STATE_TYPES.items():
        if not _is_kind(info.get(key), kind):
            return f"entry {key!r} missing or of the wrong type"
    for key, kind in _OPTIONAL_STATE_TYPES.items():
        if info.get(key) is not None and not _is_kind(info[key], kind):
            return f"entry {key!r} is {json.dumps(info[key])[:40]}, of the wrong type"
    if min(info["epoch"], info["window"], info["faults"]) < 0 or not math.isfinite(info["elapsed"]):
        return "entry 'epoch', 'window', 'faults' or 'elapsed' out of range"
    best = info.get("best_valid_loss")
    if best is not None and not math.isfinite(best):
        return f"entry 'best_valid_loss' is {best}, not a finite number"
    loss = info["epoch_loss"]
    if len(loss) != 2 or not _is_kind(loss[0], (int, float)) or not math.isfinite(loss[0]) or not _is_kind(loss[1], int):
        return "entry 'epoch_loss' is not [loss sum, steps]"
    try:
        for number, record in enumerate(info["metrics"], start=1):
            check_metric_record(record, f"record {number}")
    except RunDirError as exc:
        return f"entry 'metrics', {str(exc).removesuffix('; the run directory is damaged')}"
    return None


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

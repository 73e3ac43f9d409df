"""torchrun's failures: how long a process waits for its peers, and which run a restarted attempt resumes.

``--ddp-timeout`` (:data:`DEFAULT_DDP_TIMEOUT`) bounds every wait for another process; what a survivor says
when a peer dies or stalls is in :mod:`neurallm.distributed`.

``torchrun --max-restarts N`` starts the whole group again (every rank, on every node) when one rank fails, with
the same command line. A restarted ``neurallm train --out RUN`` (no ``--resume``) must then continue RUN from its
last checkpoint rather than refuse it as "already exists", and must never take over a folder that another
command wrote. So a training that may be restarted leaves a launch record, ``RUN/launch.json``, when it claims
RUN::

    {"run_id": "<torchrun's rendezvous id>", "command": "<sha256 of data, out and every setting given>"}

and a restarted attempt (``TORCHELASTIC_RESTART_COUNT`` > 0 on any rank) decides, on rank 0, with
:func:`restart_plan`:

- ``resume``: RUN's record is this command's and RUN has ``last.safetensors``: continue from it, exactly as
  ``--resume`` does (the same weights, optimizer, position, RNG and carried state);
- ``restart``: RUN's record is this command's but the first attempt died before its first checkpoint: there is
  nothing to keep, so RUN is started again;
- ``fresh``: anything else (no record, another command's, another torchrun launch): the ordinary checks apply,
  so an existing folder is refused as it was on the first attempt.

torchrun's ``--standalone`` rendezvous id is a fresh UUID per launch; with ``--rdzv-id`` (several nodes) it is
the job id the user gives, which torchrun's documentation asks to be unique per job.

Nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from neurallm.errors import ConfigError
from neurallm.fileio import atomic_write_json

# Seconds a collective waits for the other processes before this one gives up (--ddp-timeout). Long enough for
# any wait of a healthy run (rank 0 writing a checkpoint, drawing curves.png, preparing a corpus of a few hundred
# MB while the others wait), short enough that a stalled peer is reported before a user suspects a hang.
DEFAULT_DDP_TIMEOUT = 600.0

LAUNCH_FILE = "launch.json"
MAX_LAUNCH_BYTES = 64 << 10


def check_ddp_timeout(seconds: float) -> None:
    if not 0 < seconds < 1e9:  # NaN and inf fail too: datetime.timedelta cannot hold them
        raise ConfigError(f"--ddp-timeout must be a positive number of seconds (default {DEFAULT_DDP_TIMEOUT:g}), got {seconds}")


def restart_count() -> int:
    """How many times torchrun has restarted this worker group (0: the first attempt, or not under torchrun)."""
    return _int_env("TORCHELASTIC_RESTART_COUNT")


def restarts_allowed() -> bool:
    """Whether torchrun may restart this process (``--max-restarts`` above 0)."""
    return _int_env("TORCHELASTIC_MAX_RESTARTS") > 0


def _int_env(name: str) -> int:
    try:
        return int(os.environ.get(name, "0"))
    except ValueError:
        return 0


def launch_record(data: Any, out: Path, settings: dict[str, Any]) -> dict[str, str]:
    """What identifies this command across torchrun's restarts: its rendezvous id and a hash of what it was given."""
    given = {"data": None if data is None else str(data), "out": str(Path(out).resolve()),
             "settings": {k: settings[k] for k in sorted(settings)}}
    digest = hashlib.sha256(json.dumps(given, sort_keys=True, default=str).encode("utf-8")).hexdigest()
    return {"run_id": os.environ.get("TORCHELASTIC_RUN_ID", ""), "command": digest}


def write_launch_record(folder: Path, record: dict[str, str]) -> None:
    atomic_write_json(Path(folder) / LAUNCH_FILE, record)


def read_launch_record(folder: Path) -> dict | None:
    """RUN/launch.json as written by :func:`write_launch_record`; None if absent, not a small regular file, or damaged."""
    path = Path(folder) / LAUNCH_FILE
    try:
        if not path.is_file() or path.is_symlink() or path.stat().st_size > MAX_LAUNCH_BYTES:
            return None
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return record if isinstance(record, dict) else None


def restart_plan(folder: Path, record: dict[str, str], last_file: str) -> str:
    """``resume``, ``restart`` or ``fresh``: what a restarted attempt of the command ``record`` does with ``folder``."""
    folder = Path(folder)
    if not folder.is_dir() or read_launch_record(folder) != record:
        return "fresh"
    return "resume" if (folder / last_file).is_file() else "restart"

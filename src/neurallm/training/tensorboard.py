"""``--tensorboard``: the training scalars as TensorBoard event files in ``RUN/tensorboard/``.

What is written (the x axis is the optimisation step: windows trained over all epochs and resumes)::

    train/loss  train/ppl  train/lr  train/tokens_per_s  train/mfu     every --log-interval windows, as the
                                                                        progress line (loss: mean since the last)
    epoch/train_loss  epoch/valid_loss  epoch/valid_ppl  epoch/lr       each metrics.jsonl record, at the step
    epoch/tokens_per_s  epoch/mfu  epoch/valid_bpc  epoch/valid_bpb     where its epoch (or a --max-time stop) ended

``mfu`` only where it is known (a Transformer on a GPU of known peak), ``valid_bpc`` at char level,
``valid_bpb`` where bytes are known: as in ``metrics.jsonl``.

Resume continues the same curves. Events are flushed with every checkpoint, and a resumed writer starts with
TensorBoard's purge marker at the step after the checkpoint's, so whatever a killed run wrote after its last
checkpoint is dropped by TensorBoard's reader and the steps run on without a doubled stretch. Only rank 0
writes. ``torch.utils.tensorboard`` needs the ``tensorboard`` package (``pip install 'neurallm[tensorboard]'``).
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

from neurallm.errors import ConfigError, RunDirError
from neurallm.runfolder import TENSORBOARD_DIR
from neurallm.training.progress import ProgressPoint

# metrics.jsonl keys written as epoch/<key> (the others are counts and flags: epoch, complete, seconds, valid_tokens)
EPOCH_SCALARS = ("train_loss", "valid_loss", "valid_ppl", "valid_bpc", "valid_bpb", "lr", "tokens_per_s", "mfu")


def check_tensorboard_installed() -> None:
    """Raise one line naming the package and the extra when ``tensorboard`` is missing (before training starts)."""
    if importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("--tensorboard needs the package tensorboard: pip install 'neurallm[tensorboard]' "
                          "(or train without --tensorboard)")


class TensorBoardLog:
    """A SummaryWriter on ``RUN/tensorboard/`` (rank 0 only).

    Args:
        run_dir: the run directory.
        resumed_at: the optimisation step of the checkpoint a resumed run starts from (None: a new run); every
            event at a later step, written before the resume, is dropped by TensorBoard's reader.
    """

    def __init__(self, run_dir: Path, resumed_at: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        folder = Path(run_dir) / TENSORBOARD_DIR
        if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
            # a symlink would send the events (and TensorBoard's purge) somewhere outside the run: never followed
            raise RunDirError(f"{folder} is not a folder of TensorBoard event files (a symlink or a file); move it away "
                              "to resume with --tensorboard")
        self.writer = SummaryWriter(str(folder),
                                    purge_step=None if resumed_at is None else resumed_at + 1)

    def progress(self, step: int, point: ProgressPoint) -> None:
        """The figures of a progress update."""
        self._scalars("train", step, {"loss": point.loss, "ppl": math.exp(min(point.loss, 700.0)), "lr": point.lr,
                                      "tokens_per_s": point.tokens_per_s, "mfu": point.mfu})

    def epoch(self, step: int, record: dict) -> None:
        """A metrics.jsonl record."""
        self._scalars("epoch", step, {key: record.get(key) for key in EPOCH_SCALARS})

    def _scalars(self, group: str, step: int, values: dict[str, float | None]) -> None:
        for name, value in values.items():
            if value is not None:
                self.writer.add_scalar(f"{group}/{name}", value, step)

    def flush(self) -> None:
        """Write the pending events (with every checkpoint, so the curves never lag behind it)."""
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

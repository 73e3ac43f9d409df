"""An epoch's progress: a bar in a terminal; plain lines for logs, CI and pipes, where a bar would be one endless
line or nothing.

One line every ``--log-interval`` batches, in the PyTorch word-language-model example's format, so logs of the
two can be read side by side::

    | epoch   1 |   200/ 2983 batches | lr 20.00 | ms/batch 45.12 | loss  7.63 | ppl  2050.23

As in the example, loss and ms/batch are the means over the batches since the previous line (not since the
start of the epoch), so a line shows where training is now.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

logger = logging.getLogger(__name__)


def format_progress_line(epoch: int, batch: int, batches: int, lr: float, ms_per_batch: float, loss: float) -> str:
    """One progress line (``epoch`` counts from 1; ``loss`` in nats per token)."""
    # The example prints lr with two decimals, which shows AdamW's 0.003 as 0.00; small rates get an exponent.
    lr_text = f"{lr:02.2f}" if lr >= 0.01 else f"{lr:.2e}"
    return (f"| epoch {epoch:3d} | {batch:5d}/{batches:5d} batches | lr {lr_text} | ms/batch {ms_per_batch:5.2f} | "
            f"loss {loss:5.2f} | ppl {math.exp(min(loss, 700.0)):8.2f}")


class IntervalMeter:
    """Mean loss and wall time per batch since the previous progress line.

    Fed the trainer's running totals (sum of step losses, steps) rather than each step's loss, so no step has
    to read its loss back from an accelerator just to print a line.
    """

    def __init__(self, loss_sum: float = 0.0, steps: int = 0) -> None:
        self.loss_sum, self.steps = loss_sum, steps
        self.started = time.perf_counter()

    def line(self, epoch: int, batch: int, batches: int, lr: float, loss_sum: float, steps: int) -> str:
        """The line for the batches since the last one, given the running totals; starts a new interval."""
        now = time.perf_counter()
        counted = max(1, steps - self.steps)
        text = format_progress_line(epoch, batch, batches, lr, (now - self.started) * 1000 / counted,
                                    (loss_sum - self.loss_sum) / counted)
        self.loss_sum, self.steps, self.started = loss_sum, steps, now
        return text


@dataclass(frozen=True)
class ProgressPoint:
    """The training figures at a progress update (every ``--log-interval`` windows, and an epoch's last window).

    Attributes:
        loss: mean training loss of the steps since the previous update (nats per token), as the plain line shows.
        epoch_loss: mean training loss of the epoch so far, as the progress bar shows.
        lr: the learning rate now.
        tokens_per_s: training tokens per second of all ranks since the epoch (or its resumed part) started.
        mfu: model FLOPs utilisation at that rate, or None where the device's peak is unknown.
    """

    loss: float
    epoch_loss: float
    lr: float
    tokens_per_s: float
    mfu: float | None


def _tqdm_class():
    """tqdm's notebook bar where it can draw (Jupyter with ipywidgets), its console bar everywhere else.

    ``tqdm.auto`` in a Jupyter kernel without ipywidgets warns (TqdmWarning / TqdmExperimentalWarning) and draws
    nothing; the console class with ``disable`` set (stderr is no terminal there) lets the plain progress lines
    show instead.
    """
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        from tqdm import tqdm

        return tqdm
    import warnings

    from tqdm import TqdmExperimentalWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TqdmExperimentalWarning)
        from tqdm.auto import tqdm
    return tqdm


class EpochProgress:
    """An epoch's progress: a tqdm bar (a terminal) or a plain line (logs, CI, pipes) every ``log_interval``
    windows, and the figures of each update for whoever records them (TensorBoard).

    Args:
        epoch: the epoch, counting from 0.
        epochs: the run's ``--epochs``.
        total: windows in the epoch.
        done: windows of the epoch already trained (a resumed epoch).
        show_bar: draw the bar; otherwise log the plain line.
        log_interval: windows between updates.
        loss_sum, steps: the epoch's running loss totals at the start (a resumed epoch's).
        world_size: processes training together (each reports its own tokens).
        mfu: model FLOPs utilisation at a rate of tokens per second (all ranks), or None.
    """

    def __init__(self, *, epoch: int, epochs: int, total: int, done: int, show_bar: bool, log_interval: int,
                 loss_sum: float, steps: int, world_size: int, mfu: Callable[[float], float | None]) -> None:
        self.epoch, self.total, self.show_bar, self.log_interval = epoch, total, show_bar, log_interval
        self.world_size, self.mfu = world_size, mfu
        self.started = time.perf_counter()
        self.bar = _tqdm_class()(total=total, initial=done, desc=f"epoch {epoch + 1}/{epochs}", disable=not show_bar,
                                 leave=False, unit="batch", dynamic_ncols=True)
        self.lines = IntervalMeter(loss_sum, steps)
        self._since = (loss_sum, steps)  # totals at the previous update

    def advance(self, window: int, tokens: int, lr: float, loss_sum: float, steps: int) -> ProgressPoint | None:
        """One more window trained (``window`` windows of the epoch done, ``tokens`` of them by this rank since the
        progress began); ``loss_sum`` and ``steps`` are the epoch's totals as last read back. The update's figures
        at an update, else None."""
        self.bar.update(1)
        if not (window % self.log_interval == 0 or window == self.total):
            return None
        rate = tokens * self.world_size / max(1e-9, time.perf_counter() - self.started)  # all ranks
        since_sum, since_steps = self._since
        self._since = (loss_sum, steps)
        epoch_loss = loss_sum / max(1, steps)
        point = ProgressPoint(loss=(loss_sum - since_sum) / max(1, steps - since_steps), epoch_loss=epoch_loss, lr=lr,
                              tokens_per_s=rate, mfu=self.mfu(rate))
        if self.show_bar:
            postfix = dict(loss=f"{epoch_loss:.3f}", ppl=f"{math.exp(min(epoch_loss, 50)):.1f}", lr=f"{lr:.3g}",
                           tok_s=f"{rate:,.0f}")
            if point.mfu is not None:
                postfix["mfu"] = f"{point.mfu:.1%}"
            self.bar.set_postfix(postfix)
        else:  # no terminal (a log, CI, a pipe): the PyTorch example's plain line instead of a bar
            logger.info(self.lines.line(self.epoch + 1, window, self.total, lr, loss_sum, steps))
        return point

    def close(self) -> float:
        """Close the bar; the seconds since the epoch (or its resumed part) started."""
        self.bar.close()
        return time.perf_counter() - self.started

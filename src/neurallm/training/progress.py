"""Plain progress lines for logs, CI and pipes, where a progress bar would be one endless line or nothing.

One line every ``--log-interval`` batches, in the PyTorch word-language-model example's format, so logs of the
two can be read side by side::

    | epoch   1 |   200/ 2983 batches | lr 20.00 | ms/batch 45.12 | loss  7.63 | ppl  2050.23

As in the example, loss and ms/batch are the means over the batches since the previous line (not since the
start of the epoch), so a line shows where training is now.
"""

from __future__ import annotations

import math
import time


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

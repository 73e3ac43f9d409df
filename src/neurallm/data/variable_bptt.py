"""Variable-length BPTT (AWD-LSTM): windows whose length varies around ``--bptt``, so that over the epochs every
token is at some point the first of a window (with fixed windows the same tokens always start one and are
predicted from a cold gradient path).

AWD-LSTM draws each length as ``N(bptt, 5)`` (``N(bptt/2, 5)`` with probability 0.05), at least 5. Here the
lengths of an epoch are drawn up front from ``(seed, epoch)`` and then scaled so that the epoch has exactly as
many windows as fixed ``bptt`` windows would, tiling the stream: ``--bptt`` stays the mean, an epoch's length and
the progress totals do not change, and a resumed run (which skips a number of windows) sees the very same
windows. The trainer scales the learning rate by ``length / bptt`` per window, as AWD-LSTM does, so short
windows do not get the weight of long ones.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from neurallm.data.batching import Stream, get_batch, window_starts

SHORT_SHARE = 0.05  # share of windows drawn around bptt/2
SPREAD = 5.0  # standard deviation of a window's length, in tokens
MIN_LENGTH = 5


def plan_windows(rows: int, bptt: int, seed: int, epoch: int) -> list[tuple[int, int]]:
    """``(start row, length)`` of each window of ``epoch``: contiguous, covering rows ``0 .. rows-1`` exactly."""
    count = len(window_starts(rows, bptt))
    rng = np.random.default_rng([seed, epoch])
    centre = np.where(rng.random(count) < SHORT_SHARE, bptt / 2, bptt)
    lengths = np.maximum(MIN_LENGTH, rng.normal(centre, SPREAD))
    edges = np.round(np.concatenate([[0.0], np.cumsum(lengths)]) * (rows - 1) / lengths.sum()).astype(np.int64)
    # every window at least one token long (rows - 1 >= count, since fixed windows hold at least one each)
    for i in range(1, count + 1):
        edges[i] = max(edges[i], edges[i - 1] + 1)
    for i in range(count - 1, 0, -1):
        edges[i] = min(edges[i], edges[i + 1] - 1)
    return [(int(edges[i]), int(edges[i + 1] - edges[i])) for i in range(count)]


@dataclass
class VariableWindows:
    """Contiguous windows of variable length over a batchified stream (``ContiguousBatches``' interface).

    Attributes:
        stream: ``(rows, batch_size)`` ids from :func:`~neurallm.data.batching.batchify`.
        bptt: the mean window length.
        seed: with the epoch number, fixes the lengths.
        device: where the windows are sent.
    """

    stream: Stream
    bptt: int
    seed: int
    device: torch.device | str | None = None

    carries_state = True

    def __len__(self) -> int:
        return len(window_starts(len(self.stream), self.bptt))

    def epoch(self, epoch: int, start_window: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for row, length in plan_windows(len(self.stream), self.bptt, self.seed, epoch)[start_window:]:
            yield get_batch(self.stream, row, length, self.device)

    def tokens_per_epoch(self) -> int:
        return (len(self.stream) - 1) * self.stream.shape[1]

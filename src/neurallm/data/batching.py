"""From one long id stream to the (input, target) windows a language model trains on.

Contiguous streams (the default, as in the PyTorch example)
------------------------------------------------------------
``batchify`` cuts the stream into ``batch_size`` equal columns, dropping the tail that does not fit.
With the alphabet as the stream and ``batch_size=4``::

    ┌ a g m s ┐
    │ b h n t │
    │ c i o u │
    │ d j p v │
    │ e k q w │
    └ f l r x ┘

Each column is read top to bottom in windows of ``bptt`` rows; the target is the input shifted one row down.
With ``bptt=2`` the first window is input ``[[a g m s], [b h n t]]`` with target ``[[b h n t], [c i o u]]``,
the next starts at row ``c``. The recurrent state left at the end of one window is carried into the next
(so the model has seen ``a b`` when it reads ``c``) but detached from the graph, which truncates
back-propagation through time to one window.

Shuffled windows (``--shuffle-windows``, the news tutorial)
-----------------------------------------------------------
Fixed windows of ``bptt + 1`` tokens, taken in random order each epoch, ``batch_size`` at a time; each window
starts from a fresh state, so nothing is carried between them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from neurallm.data.windows import (  # noqa: F401  (re-exported: the planning half of batching, without torch)
    EvalColumn,
    column_rows,
    plan_eval_columns,
    plan_sliding_windows,
    window_length,
    window_starts,
)
from neurallm.errors import ConfigError


def batchify(ids: torch.Tensor | np.ndarray, batch_size: int) -> torch.Tensor:
    """Arrange a 1-D id stream into ``batch_size`` columns, shape ``(rows, batch_size)``; the tail is dropped."""
    ids = torch.as_tensor(np.asarray(ids, dtype=np.int64)) if isinstance(ids, np.ndarray) else ids.long()
    rows = column_rows(ids.numel(), batch_size)
    # column j holds ids[j*rows : (j+1)*rows]: reshape row-major to (B, rows), then transpose to time-major
    return ids[: rows * batch_size].view(batch_size, rows).t().contiguous()


def get_batch(stream: torch.Tensor, row: int, bptt: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The window of ``stream`` starting at ``row``: input ``(T, B)`` and target ``(T, B)``, ``T <= bptt``."""
    length = window_length(stream.size(0), row, bptt)
    return stream[row : row + length], stream[row + 1 : row + 1 + length]


@dataclass
class ContiguousBatches:
    """Contiguous BPTT windows over a batchified stream, resumable at any window.

    Attributes:
        stream: ``(rows, batch_size)`` ids from :func:`batchify`.
        bptt: window length in tokens.
    """

    stream: torch.Tensor
    bptt: int

    carries_state = True

    def __len__(self) -> int:
        return len(window_starts(self.stream.size(0), self.bptt))

    def epoch(self, epoch: int, start_window: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Windows of one epoch in order, skipping the first ``start_window`` (a resumed run)."""
        for row in window_starts(self.stream.size(0), self.bptt)[start_window:]:
            yield get_batch(self.stream, row, self.bptt)

    def tokens_per_epoch(self) -> int:
        return (self.stream.size(0) - 1) * self.stream.size(1)


@dataclass
class ShuffledWindows:
    """Fixed windows of ``bptt + 1`` tokens in a seeded random order per epoch, ``batch_size`` at a time.

    Attributes:
        ids: the 1-D id stream.
        bptt: input length of a window (each window holds ``bptt + 1`` ids).
        batch_size: windows per batch (the last batch of an epoch may hold fewer).
        seed: with the epoch number, fixes the order; a resumed run sees the same order.
    """

    ids: np.ndarray
    bptt: int
    batch_size: int
    seed: int

    carries_state = False

    def __post_init__(self) -> None:
        self._n_windows = (len(self.ids) - 1) // self.bptt
        if self._n_windows < 1:
            raise ConfigError(f"--bptt {self.bptt} is longer than the {len(self.ids)}-token training split; lower it")

    def __len__(self) -> int:
        return -(-self._n_windows // self.batch_size)

    def epoch(self, epoch: int, start_window: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self._n_windows, generator=generator)
        offsets = torch.arange(self.bptt + 1)
        ids = torch.as_tensor(np.asarray(self.ids, dtype=np.int64))
        for b in range(start_window, len(self)):
            starts = order[b * self.batch_size : (b + 1) * self.batch_size] * self.bptt
            windows = ids[starts[:, None] + offsets].t()  # (bptt + 1, b)
            yield windows[:-1], windows[1:]

    def tokens_per_epoch(self) -> int:
        return self._n_windows * self.bptt

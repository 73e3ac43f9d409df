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

A memory-mapped stream is arranged as a view of the file (no copy, its own small dtype); only the window being
trained on is converted to int64 and moved to the device.

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
    sliding_window,
    sliding_window_targets,
    window_length,
    window_starts,
)
from neurallm.errors import ConfigError


Stream = torch.Tensor | np.ndarray
"""A batchified ``(rows, batch_size)`` stream: an int64 tensor, or a view of a memory-mapped id array."""


def batchify(ids: torch.Tensor | np.ndarray, batch_size: int) -> Stream:
    """Arrange a 1-D id stream into ``batch_size`` columns, shape ``(rows, batch_size)``; the tail is dropped.

    A tensor gives an int64 tensor. A NumPy array (a memory-mapped split) gives a *view* of it in its own dtype:
    nothing is read or copied until a window is taken with :func:`get_batch`.
    """
    rows = column_rows(len(ids), batch_size)
    # column j holds ids[j*rows : (j+1)*rows]: reshape row-major to (B, rows), then transpose to time-major
    if isinstance(ids, np.ndarray):
        return ids[: rows * batch_size].reshape(batch_size, rows).T
    return ids.long()[: rows * batch_size].view(batch_size, rows).t().contiguous()


def to_ids_tensor(ids: Stream, device: torch.device | str | None = None) -> torch.Tensor:
    """An int64 tensor of ``ids`` on ``device``: a NumPy slice is converted here, and only that slice."""
    if isinstance(ids, np.ndarray):
        ids = torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64))
    if device is None:
        return ids
    if torch.device(device).type == "cuda" and ids.device.type == "cpu":
        # from page-locked memory the copy runs asynchronously: the GPU does not wait for the host between windows
        ids = ids.pin_memory()
    return ids.to(device, non_blocking=True)


def get_batch(stream: Stream, row: int, bptt: int, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The window of ``stream`` starting at ``row``: input ``(T, B)`` and target ``(T, B)``, ``T <= bptt``."""
    length = window_length(len(stream), row, bptt)
    rows = to_ids_tensor(stream[row : row + 1 + length], device)  # input and target rows, converted once
    return rows[:length], rows[1:]


@dataclass
class ContiguousBatches:
    """Contiguous BPTT windows over a batchified stream, resumable at any window.

    Attributes:
        stream: ``(rows, batch_size)`` ids from :func:`batchify` (a tensor or a memory-mapped view).
        bptt: window length in tokens.
        device: where the windows are sent (None: left where the stream is, on the CPU for a view).
    """

    stream: Stream
    bptt: int
    device: torch.device | str | None = None

    carries_state = True

    def __len__(self) -> int:
        return len(window_starts(len(self.stream), self.bptt))

    def epoch(self, epoch: int, start_window: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Windows of one epoch in order, skipping the first ``start_window`` (a resumed run)."""
        for row in window_starts(len(self.stream), self.bptt)[start_window:]:
            yield get_batch(self.stream, row, self.bptt, self.device)

    def tokens_per_epoch(self) -> int:
        return (len(self.stream) - 1) * self.stream.shape[1]


@dataclass
class ShuffledWindows:
    """Fixed windows of ``bptt + 1`` tokens in a seeded random order per epoch, ``batch_size`` at a time.

    Attributes:
        ids: the 1-D id stream (memory-mapped: each batch reads only its own windows).
        bptt: input length of a window (each window holds ``bptt + 1`` ids).
        batch_size: windows per batch (the last batch of an epoch may hold fewer).
        seed: with the epoch number, fixes the order; a resumed run sees the same order.
        device: where the windows are sent (the model's device).
        rank, world_size: under torchrun, every rank draws the same order and takes its own contiguous share of
            each batch, so the ranks together see each window of the epoch exactly once.
    """

    ids: np.ndarray
    bptt: int
    batch_size: int
    seed: int
    device: torch.device | str | None = None
    rank: int = 0
    world_size: int = 1

    carries_state = False

    def __post_init__(self) -> None:
        self._n_windows = (len(self.ids) - 1) // self.bptt
        if self._n_windows < 1:
            raise ConfigError(f"--bptt {self.bptt} is longer than the {len(self.ids)}-token training split; lower it")

    def __len__(self) -> int:
        full, rest = divmod(self._n_windows, self.batch_size)
        # a last batch with fewer windows than ranks is dropped: a rank with nothing to train on cannot take part
        return full + (1 if rest >= self.world_size else 0)

    def epoch(self, epoch: int, start_window: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self._n_windows, generator=generator).numpy()
        offsets = np.arange(self.bptt + 1)
        for b in range(start_window, len(self)):
            batch = order[b * self.batch_size : (b + 1) * self.batch_size]
            starts = np.array_split(batch, self.world_size)[self.rank] * self.bptt
            windows = to_ids_tensor(np.asarray(self.ids)[starts[:, None] + offsets].T, self.device)  # (bptt + 1, b)
            yield windows[:-1], windows[1:]

    def tokens_per_epoch(self) -> int:
        return self._n_windows * self.bptt

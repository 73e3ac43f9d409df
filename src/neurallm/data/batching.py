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

from neurallm.errors import ConfigError


def batchify(ids: torch.Tensor | np.ndarray, batch_size: int) -> torch.Tensor:
    """Arrange a 1-D id stream into ``batch_size`` columns, shape ``(rows, batch_size)``; the tail is dropped."""
    ids = torch.as_tensor(np.asarray(ids, dtype=np.int64)) if isinstance(ids, np.ndarray) else ids.long()
    rows = ids.numel() // batch_size
    if rows < 2:
        raise ConfigError(
            f"--batch-size {batch_size} leaves fewer than 2 tokens per column of a {ids.numel()}-token stream; lower it"
        )
    # column j holds ids[j*rows : (j+1)*rows]: reshape row-major to (B, rows), then transpose to time-major
    return ids[: rows * batch_size].view(batch_size, rows).t().contiguous()


def get_batch(stream: torch.Tensor, row: int, bptt: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The window of ``stream`` starting at ``row``: input ``(T, B)`` and target ``(T, B)``, ``T <= bptt``."""
    length = min(bptt, stream.size(0) - 1 - row)
    return stream[row : row + length], stream[row + 1 : row + 1 + length]


def window_starts(rows: int, bptt: int) -> range:
    """First rows of the windows over a ``(rows, B)`` stream: 0, bptt, 2·bptt, … while a target remains."""
    return range(0, rows - 1, bptt)


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
        # modulo 2**64: any 64-bit --seed gives a valid generator seed (the product alone overflows torch's)
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % 2**64)
        order = torch.randperm(self._n_windows, generator=generator)
        offsets = torch.arange(self.bptt + 1)
        ids = torch.as_tensor(np.asarray(self.ids, dtype=np.int64))
        for b in range(start_window, len(self)):
            starts = order[b * self.batch_size : (b + 1) * self.batch_size] * self.bptt
            windows = ids[starts[:, None] + offsets].t()  # (bptt + 1, b)
            yield windows[:-1], windows[1:]

    def tokens_per_epoch(self) -> int:
        return self._n_windows * self.bptt


@dataclass(frozen=True)
class EvalColumn:
    """One column of exact evaluation: run ``tokens[start:score_stop-1]``, score targets ``[score_start, score_stop)``.

    The inputs before ``score_start - 1`` are a burn-in: they build up the state (or attention context) that
    the first scored token needs and are not scored themselves.
    """

    start: int
    score_start: int
    score_stop: int

    @property
    def burn_in(self) -> int:
        return self.score_start - 1 - self.start

    @property
    def length(self) -> int:
        """Input positions the column runs (burn-in included)."""
        return self.score_stop - 1 - self.start


def plan_eval_columns(n_tokens: int, n_columns: int, context: int, align: int = 1) -> list[EvalColumn]:
    """Cut the targets of an ``n_tokens`` stream into ``n_columns`` contiguous parts, each with a burn-in.

    Every token after the first is a target of exactly one column, so nothing is trimmed; the columns differ
    in length by at most one. A column whose first target is token ``t`` starts running at
    ``max(0, t - 1 - context)``: each scored token sees at least ``min(t, context + 1)`` real tokens of history,
    whatever ``n_columns`` is. With the 26-letter alphabet, 4 columns and ``context=2``::

        column 0: run a..g        score b..h   (starts cold at the start of the text, like batch size 1)
        column 1: run f g h..m    score i..n   (f g run as burn-in, not scored)
        column 2: run l m n..s    score o..t
        column 3: run r s t..y    score u..z

    ``align`` moves each start back to a multiple of ``align``: a model whose output depends on where its
    windows begin (the Transformer with memory) then cuts every column into the same windows as batch size 1.
    """
    n_targets = n_tokens - 1
    if n_targets < 1:
        raise ConfigError(f"cannot evaluate a stream of {n_tokens} token(s); at least 2 are needed")
    n_columns = max(1, min(n_columns, n_targets))
    base, extra = divmod(n_targets, n_columns)
    columns = []
    first_target = 1
    for j in range(n_columns):
        size = base + (1 if j < extra else 0)
        start = max(0, first_target - 1 - context) // align * align
        columns.append(EvalColumn(start, first_target, first_target + size))
        first_target += size
    return columns


def plan_sliding_windows(n_tokens: int, stride: int, context: int) -> list[EvalColumn]:
    """Columns of ``stride`` targets, each with up to ``context`` tokens of burn-in: the sliding-window
    evaluation of a model that carries no state, where each column is run as one window."""
    if stride < 1:
        raise ConfigError(f"evaluation stride must be at least 1, got {stride}")
    n_targets = n_tokens - 1
    return [
        EvalColumn(max(0, t - 1 - context), t, min(t + stride, n_tokens))
        for t in range(1, n_targets + 1, stride)
    ]

"""Where windows and evaluation columns fall in a stream: plain arithmetic on positions, no tensors.

Kept apart from :mod:`neurallm.data.batching` (which slices tensors) so that ``neurallm explain`` can draw the
layouts without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from neurallm.errors import ConfigError


def column_rows(n_tokens: int, batch_size: int) -> int:
    """Rows of the ``(rows, batch_size)`` matrix that batchify cuts an ``n_tokens`` stream into (the tail is dropped)."""
    rows = n_tokens // batch_size
    if rows < 2:
        raise ConfigError(
            f"--batch-size {batch_size} leaves fewer than 2 tokens per column of a {n_tokens}-token stream; lower it"
        )
    return rows


def window_starts(rows: int, bptt: int) -> range:
    """First rows of the windows over a ``(rows, B)`` stream: 0, bptt, 2·bptt, … while a target remains."""
    return range(0, rows - 1, bptt)


def window_length(rows: int, row: int, bptt: int) -> int:
    """Input rows of the window starting at ``row``: ``bptt``, or fewer at the end where targets run out."""
    return min(bptt, rows - 1 - row)


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
    return [sliding_window(t, n_tokens, stride, context) for t in sliding_window_targets(n_tokens, stride)]


def sliding_window_targets(n_tokens: int, stride: int) -> range:
    """First targets of the sliding windows over an ``n_tokens`` stream (a range: nothing per window is stored)."""
    if stride < 1:
        raise ConfigError(f"evaluation stride must be at least 1, got {stride}")
    return range(1, n_tokens, stride)


def sliding_window(first_target: int, n_tokens: int, stride: int, context: int) -> EvalColumn:
    """The sliding window whose first scored target is ``first_target``."""
    return EvalColumn(max(0, first_target - 1 - context), first_target, min(first_target + stride, n_tokens))

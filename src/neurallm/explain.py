"""Show, with the learner's own tokens, how a stream becomes batches (``neurallm explain``).

The training view draws the batchified matrix and each BPTT window as (input, target), with what the
carried state has already seen. The evaluation view sets the PyTorch example's layout (a cold state at the
top of every column, the tail trimmed) against neurallm's exact one (a burn-in per column, every token
after the first scored once), for several batch sizes::

    naive, 6 columns:  ┌ 1  7 … 31 ┐   2 8 … 32 are predicted from a zero state;
                       └ 6 12 … 36 ┘   37 38 39 40 are trimmed: 30 of 40 tokens scored
    exact, 6 columns:  column 1 runs 4 5 6 7 as burn-in, then scores 9 … 15: 39 of 40 scored
"""

from __future__ import annotations

import os
import re
from typing import Any

from neurallm.config import EXPLAIN_BATCH_SIZES, EXPLAIN_CONTEXT
from neurallm.data.windows import EvalColumn, column_rows, plan_eval_columns, window_length, window_starts
from neurallm.errors import ConfigError

_DIM, _BOLD, _YELLOW, _RESET = "\x1b[2m", "\x1b[1m", "\x1b[33m", "\x1b[0m"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_RANGE = re.compile(r"\s*(-?\d+)\s*\.\.\s*(-?\d+)\s*")
_LINE_WIDTH = 96
_HISTORY_LIMIT = 4  # longer histories shrink to "a … f": the window matrices already show the detail
_LIST_LIMIT = 12
# explain draws every token of its stream, several times: a few thousand already fill pages. The limit is checked
# before any list is built, so `--range 1..1000000000` (7.8 GB of strings) is refused in one line, not a MemoryError.
MAX_EXPLAIN_TOKENS = 5000


def parse_explain_text(text: str | None, numbers: str | None) -> list[str]:
    """The tokens to explain: ``text`` split on whitespace, or the inclusive range ``numbers``.

    Args:
        text: a short text (``--text``); tokens are its whitespace-separated words.
        numbers: a range ``FIRST..LAST`` (``--range``), e.g. ``"1..40"`` -> ``["1", ..., "40"]``.

    Raises:
        ConfigError: both or neither given, an empty text, a malformed or descending range, or more than
            :data:`MAX_EXPLAIN_TOKENS` tokens.
    """
    if (text is None) == (numbers is None):
        raise ConfigError("give exactly one of --text 'a short text' or --range FIRST..LAST (e.g. 1..40)")
    if text is not None:
        tokens = text.split()
        if not tokens:
            raise ConfigError("--text is empty; give a few words, or use --range FIRST..LAST (e.g. 1..40)")
        if len(tokens) > MAX_EXPLAIN_TOKENS:
            raise ConfigError(f"--text has {len(tokens):,} words; explain draws at most {MAX_EXPLAIN_TOKENS:,} tokens: "
                              "give a shorter text")
        return tokens
    match = _RANGE.fullmatch(numbers or "")
    if match is None or int(match[1]) > int(match[2]):
        raise ConfigError(f"--range {numbers!r} is not of the form FIRST..LAST with FIRST <= LAST (e.g. 1..40)")
    count = int(match[2]) - int(match[1]) + 1
    if count > MAX_EXPLAIN_TOKENS:
        raise ConfigError(f"--range {numbers} holds {count:,} numbers; explain draws at most {MAX_EXPLAIN_TOKENS:,} "
                          f"tokens: give a shorter range (e.g. 1..40)")
    return [str(n) for n in range(int(match[1]), int(match[2]) + 1)]


def should_use_color(stream: Any) -> bool:
    """Whether to colour output for ``stream``: it is a terminal and ``NO_COLOR`` is unset (or empty)."""
    isatty = getattr(stream, "isatty", None)
    return bool(callable(isatty) and isatty()) and not os.environ.get("NO_COLOR")


def explain_training(tokens: list[str], batch_size: int, bptt: int, *, color: bool = False) -> str:
    """The batchified matrix of ``tokens`` and every BPTT window over it, as text.

    Args:
        tokens: the stream, one string per token.
        batch_size: columns of the matrix (``--batch-size``).
        bptt: rows per window (``--bptt``).
        color: mark headings and the part seen through the carried state with ANSI codes.

    Raises:
        ConfigError: ``batch_size`` or ``bptt`` below 1, or too many columns for the stream.
    """
    _check_positive("--batch-size", batch_size)
    _check_positive("--bptt", bptt)
    layout = _layout(tokens, batch_size)
    n_rows = len(layout)
    columns = [[tokens[row[j]] for row in layout] for j in range(batch_size)]
    tail, padded = tokens[n_rows * batch_size :], _pad(tokens)
    out = [
        _paint(f"Training: {len(tokens)} tokens, --batch-size {batch_size}, --bptt {bptt}", _BOLD, color),
        "",
        f"batchify cuts the stream into {batch_size} columns of {n_rows} rows; time runs down each column:",
        *_indent(_matrix([[padded[i] for i in row] for row in layout])),
        f"dropped as the tail (too short to fill a row): {' '.join(tail) or 'none'}",
        "",
        f"Windows of {bptt} rows; the target is the input shifted one row down.",
    ]
    starts = window_starts(n_rows, bptt)
    for k, row in enumerate(starts):
        # the rows get_batch slices: input rows [row, row + length), targets one row further down
        length = window_length(n_rows, row, bptt)
        inputs, targets = layout[row : row + length], layout[row + 1 : row + 1 + length]
        span = f"row {row}" if length == 1 else f"rows {row}..{row + length - 1}"
        out += ["", _paint(f"window {k} ({span})", _BOLD, color)]
        out += _indent(_side_by_side(_matrix(_cells(padded, inputs)), _matrix(_cells(padded, targets))))
        if row == 0:
            out.append("  state carried in: none, every column starts from a zero state")
        else:
            seen = [_paint(_abbreviate(column[:row], _HISTORY_LIMIT), _DIM, color) for column in columns]
            items = [f"column {j} has seen {history};" for j, history in enumerate(seen)]
            items[-1] = items[-1].rstrip(";")
            out += _wrap("  state carried in (detached):", items)
        after = f"carried into window {k + 1}" if k + 1 < len(starts) else "dropped at the end of the epoch"
        out.append(f"  gradients stop at the window edge: the state is detached, then {after}")
    return "\n".join(out)


def explain_evaluation(
    tokens: list[str], batch_sizes: tuple[int, ...] = EXPLAIN_BATCH_SIZES, *, context: int = EXPLAIN_CONTEXT, color: bool = False
) -> str:
    """The naive and the exact evaluation layout of ``tokens`` for each batch size, as text.

    Args:
        tokens: the stream, one string per token.
        batch_sizes: evaluation batch sizes (columns) to compare (``--batch-size``).
        context: burn-in tokens per column of the exact layout (``--context``).
        color: mark headings, cold starts and burn-in with ANSI codes.

    Raises:
        ConfigError: a batch size below 1 or too large for the stream, or a negative ``context``.
    """
    if context < 0:
        raise ConfigError(f"--context must be at least 0, got {context}")
    if not batch_sizes:
        raise ConfigError("give at least one --batch-size to compare")
    padded = _pad(tokens)
    out = [_paint(f"Evaluation: {len(tokens)} tokens; the first is never a target", _BOLD, color)]
    naive_counts, exact_counts = [], []
    for batch_size in batch_sizes:
        _check_positive("--batch-size", batch_size)
        lines, scored = _naive_section(tokens, padded, batch_size, color)
        out += lines
        naive_counts.append(scored)
        lines, scored = _exact_section(tokens, padded, batch_size, context, color)
        out += lines
        exact_counts.append(scored)
    naive = ", ".join(f"{n} of {len(tokens)} at batch size {b}" for n, b in zip(naive_counts, batch_sizes))
    exact = " and ".join(sorted({f"{n} of {len(tokens)}" for n in exact_counts}))
    summary = (
        f"the naive layout scores {naive}, so its perplexity depends on the batch size; "
        f"the exact layout scores {exact} at every batch size."
    )
    return "\n".join(out + [""] + _wrap("Summary:", summary.split(), indent="  "))


def _naive_section(tokens: list[str], padded: list[str], batch_size: int, color: bool) -> tuple[list[str], int]:
    """The PyTorch example's evaluation layout, and how many tokens it scores."""
    layout = _layout(tokens, batch_size)
    n_rows = len(layout)
    tail = tokens[n_rows * batch_size :]
    # row 0 is input only; row 1 holds each column's first target, predicted before any state has built up
    rows = [[_paint(padded[i], _YELLOW if r == 1 else "", color) for i in row] for r, row in enumerate(layout)]
    scored = (n_rows - 1) * batch_size
    why = "the first row is input only" + (", the tail is trimmed" if tail else "")
    heading = f"batch size {batch_size}, naive layout (the PyTorch example): {n_rows} rows × {batch_size} columns"
    return [
        "",
        _paint(heading, _BOLD, color),
        *_indent(_matrix(rows)),
        f"  trimmed from the tail: {_paint(' '.join(tail), _DIM, color) if tail else 'none'}",
        *_wrap("  cold start (zero state; only the token above is history):",
               [_paint(tokens[i], _YELLOW, color) for i in layout[1]]),
        f"  tokens scored: {scored} of {len(tokens)} ({why})",
    ], scored


def _exact_section(
    tokens: list[str], padded: list[str], batch_size: int, context: int, color: bool
) -> tuple[list[str], int]:
    """neurallm's exact layout from :func:`plan_eval_columns`, and how many tokens it scores."""
    plan = plan_eval_columns(len(tokens), batch_size, context)
    title = "burn-in (run, not scored)"
    burn_ins = [_abbreviate(padded[c.start : c.score_start - 1], _LIST_LIMIT) or "—" for c in plan]
    burn_ins = [_paint(burn_in, _DIM, color) for burn_in in burn_ins]
    burn_width = max(len(title), *map(_visible_len, burn_ins))
    scored = sum(c.score_stop - c.score_start for c in plan)
    lines = [
        "",
        _paint(f"batch size {batch_size}, exact layout (neurallm, context {context}): {len(plan)} columns",
               _BOLD, color),
        *_burn_in_example(tokens, plan),
        f"  column  {title.ljust(burn_width)}  scored",
    ]
    for j, (column, burn_in) in enumerate(zip(plan, burn_ins)):
        targets = _abbreviate(padded[column.score_start : column.score_stop], _LIST_LIMIT)
        lines.append(f"  {j:>6}  {burn_in}{' ' * (burn_width - _visible_len(burn_in))}  {targets}")
    lines.append(f"  tokens scored: {scored} of {len(tokens)} (every token after the first, whatever the batch size)")
    return lines, scored


def _burn_in_example(tokens: list[str], plan: list[EvalColumn]) -> list[str]:
    """One sentence on column 1: the table leaves out the input between its burn-in and first target."""
    if len(plan) < 2 or plan[1].burn_in == 0:
        return []
    start, first, stop = plan[1].start, plan[1].score_start, plan[1].score_stop
    burn_in = _abbreviate(tokens[start : first - 1], _LIST_LIMIT)
    return [
        f"  column 1 runs {tokens[start]} … {tokens[stop - 2]}: {burn_in} only build "
        f"up the state, then {tokens[first - 1]} predicts {tokens[first]}, and so on up to {tokens[stop - 1]}"
    ]


def _check_positive(flag: str, value: int) -> None:
    if value < 1:
        raise ConfigError(f"{flag} must be at least 1, got {value}")


def _layout(tokens: list[str], batch_size: int) -> list[list[int]]:
    """Token positions in the batchified stream, one list per row: column j holds positions j·rows … (j+1)·rows-1,
    as :func:`neurallm.data.batching.batchify` cuts them (a test holds the two equal)."""
    rows = column_rows(len(tokens), batch_size)
    return [[j * rows + i for j in range(batch_size)] for i in range(rows)]


def _pad(tokens: list[str]) -> list[str]:
    """Every token padded to the widest one: numbers to the right, words to the left."""
    width = max(map(len, tokens), default=1)
    numeric = all(token.lstrip("-").isdigit() for token in tokens)
    return [token.rjust(width) if numeric else token.ljust(width) for token in tokens]


def _cells(padded: list[str], positions: list[list[int]]) -> list[list[str]]:
    return [[padded[i] for i in row] for row in positions]


def _matrix(rows: list[list[str]]) -> list[str]:
    """Bracket rows of padded cells like the batchify diagram: ┌ ┐ on top, │ │ between, └ ┘ below."""
    if len(rows) == 1:
        return [f"[ {' '.join(rows[0])} ]"]
    brackets = [("┌", "┐")] + [("│", "│")] * (len(rows) - 2) + [("└", "┘")]
    return [f"{left} {' '.join(row)} {right}" for (left, right), row in zip(brackets, rows)]


def _side_by_side(inputs: list[str], targets: list[str]) -> list[str]:
    head = f"{'input'.center(_visible_len(inputs[0]))}   {'target'.center(_visible_len(targets[0]))}"
    return [head.rstrip()] + [f"{left}   {right}" for left, right in zip(inputs, targets)]


def _abbreviate(tokens: list[str], limit: int) -> str:
    """``tokens`` joined by spaces, or ``first … last`` when there are more than ``limit``."""
    if len(tokens) <= limit:
        return " ".join(tokens)
    return f"{tokens[0].strip()} … {tokens[-1].strip()}"


def _wrap(head: str, items: list[str], indent: str = "    ") -> list[str]:
    """``head`` followed by ``items``, wrapped at the line width measured without ANSI codes."""
    lines, line = [], head
    for item in items:
        if _visible_len(line) + 1 + _visible_len(item) > _LINE_WIDTH:
            lines.append(line)
            line = indent + item
        else:
            line = f"{line} {item}"
    return lines + [line]


def _indent(lines: list[str]) -> list[str]:
    return ["  " + line for line in lines]


def _paint(text: str, code: str, color: bool) -> str:
    return f"{code}{text}{_RESET}" if color and code and text else text


def _visible_len(text: str) -> int:
    return len(_ANSI.sub("", text))

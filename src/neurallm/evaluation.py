"""Perplexity that does not depend on the evaluation batch size.

The PyTorch example evaluates by ``batchify``-ing the split into ``batch_size`` columns: the tail that does not
fit is dropped and every column starts from a zero state, so the more columns, the more tokens are predicted
with no history and the fewer are scored at all. Its perplexity therefore changes with the batch size
(:func:`evaluate_naive` keeps that method so the effect can be reproduced).

:func:`evaluate` scores every token after the first exactly once, and gives each at least ``context`` tokens of
real history, whatever the batch size:

* models that carry a state (RNNs, the Transformer with ``--memory``) cut the targets into ``batch_size``
  contiguous columns; each column first runs over the ``context`` tokens before its first target (a burn-in
  that builds up the state and is not scored), then scores its own tokens, window after window, carrying the
  state. With ``batch_size=1`` there is one column and no burn-in: the method reduces to reading the text in
  order, which is what every other batch size is compared against.
* a Transformer without memory carries nothing between windows, so it is evaluated with sliding windows:
  each window scores ``stride`` new tokens after ``context`` tokens of history (``stride + context`` is the
  training ``bptt``).

Losses are in nats per token; perplexity is ``exp(loss)``; bits per character is ``loss / ln 2`` per character.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from neurallm.data.batching import EvalColumn, batchify, get_batch, plan_eval_columns, plan_sliding_windows, window_starts
from neurallm.errors import ConfigError

# History every scored token gets from a stateful model. An LSTM's state forgets within a few hundred
# tokens, so 512 makes batch sizes 1..80 agree to well under 0.05% (measured in tests/test_evaluation.py).
DEFAULT_STATEFUL_CONTEXT = 512
# RNN results do not depend on the window length, so evaluate them in long windows: fewer Python steps.
RNN_EVAL_WINDOW = 256
HEAD_CHUNK = 4096  # positions per output-layer call


@dataclass
class EvalResult:
    """Outcome of an evaluation.

    Attributes:
        loss: mean negative log-likelihood per scored token, in nats.
        tokens: number of tokens scored.
        seconds: wall-clock time of the evaluation.
        method: ``exact`` or ``naive``.
        batch_size: columns evaluated in parallel.
        context: history (tokens) guaranteed to each scored token (exact method), None for naive.
        unk_share: fraction of the split's tokens that were not in the vocabulary and became ``<unk>``
            (None when the caller did not know it, e.g. ids passed directly).
    """

    loss: float
    tokens: int
    seconds: float
    method: str
    batch_size: int
    context: int | None
    unk_share: float | None = None

    @property
    def ppl(self) -> float:
        return math.exp(min(self.loss, 700.0))

    @property
    def bpc(self) -> float:
        return self.loss / math.log(2)

    def to_dict(self, level: str = "word") -> dict:
        out = {
            "loss": self.loss,
            "ppl": self.ppl,
            "tokens": self.tokens,
            "seconds": round(self.seconds, 3),
            "method": self.method,
            "batch_size": self.batch_size,
            "context": self.context,
        }
        if level == "char":
            out["bpc"] = self.bpc
        if self.unk_share is not None:
            out["unk_share"] = self.unk_share
        return out


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def default_context(model: nn.Module, bptt: int) -> int:
    """History per scored token when ``--context`` is not given.

    A Transformer with memory sees at most ``memory + bptt`` positions back per layer, so
    ``nlayers · (memory + bptt)`` tokens of burn-in reproduce exactly what batch size 1 computes.
    """
    if not model.carries_state:
        return bptt // 2
    if model.window_independent:
        return DEFAULT_STATEFUL_CONTEXT
    return max(DEFAULT_STATEFUL_CONTEXT, model.config.nlayers * (model.config.memory + bptt))


@torch.no_grad()
def evaluate(
    model: nn.Module,
    ids: np.ndarray,
    *,
    batch_size: int = 10,
    bptt: int = 35,
    context: int | None = None,
) -> EvalResult:
    """Exact evaluation of ``model`` on the id stream ``ids`` (see the module docstring).

    Args:
        model: a neurallm language model.
        ids: 1-D token ids.
        batch_size: columns evaluated in parallel; does not change the result beyond float rounding.
        bptt: the window length the model was trained with.
        context: tokens of history each scored token gets (default: 512 for stateful models, bptt/2 otherwise).
    """
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    context = default_context(model, bptt) if context is None else context
    if context < 0:
        raise ConfigError(f"--context must be 0 or more, got {context}")
    started = time.perf_counter()
    if model.carries_state:
        if model.window_independent:
            window = max(bptt, RNN_EVAL_WINDOW)
            columns = plan_eval_columns(len(ids), batch_size, context)
        else:
            window = bptt
            columns = plan_eval_columns(len(ids), batch_size, context, align=bptt)
        total, count = _run_columns(model, ids, columns, window)
    else:
        stride = max(1, bptt - context)
        columns = plan_sliding_windows(len(ids), stride, context)
        total, count = 0.0, 0
        for first in range(0, len(columns), batch_size):
            group = columns[first : first + batch_size]
            part_total, part_count = _run_columns(model, ids, group, window=max(c.length for c in group))
            total, count = total + part_total, count + part_count
    return EvalResult(total / count, count, time.perf_counter() - started, "exact", batch_size, context)


def _run_columns(model: nn.Module, ids: np.ndarray, columns: list[EvalColumn], window: int) -> tuple[float, int]:
    """Run the columns side by side in windows, carrying the state; sum the NLL of the scored targets."""
    device = _device_of(model)
    starts = np.array([c.start for c in columns])
    lengths = np.array([c.length for c in columns])
    score_from = np.array([c.score_start for c in columns])
    rows = int(lengths.max())
    position = starts[None, :] + np.arange(rows)[:, None]  # (rows, B): index of each input token
    valid = np.arange(rows)[:, None] < lengths[None, :]  # right padding beyond a column's end
    scored = valid & (position + 1 >= score_from[None, :])
    safe = np.minimum(position, len(ids) - 2)
    inputs = torch.from_numpy(np.asarray(ids[safe], dtype=np.int64)).to(device)
    targets = torch.from_numpy(np.asarray(ids[safe + 1], dtype=np.int64)).to(device)
    mask = torch.from_numpy(scored).to(device)

    state = model.init_state(len(columns), device)
    total = torch.zeros((), dtype=torch.float64, device=device)
    for row in range(0, rows, window):
        features, state = model(inputs[row : row + window], state)
        scored_here = mask[row : row + window]
        if scored_here.any():
            # the output layer only where a target is scored: burn-in and padding need no softmax
            scored_features = features[scored_here]
            scored_targets = targets[row : row + window][scored_here]
            # in slices: the logits of a whole window of many columns can take gigabytes
            for first in range(0, scored_targets.numel(), HEAD_CHUNK):
                nll = model.head.loss(scored_features[first : first + HEAD_CHUNK], scored_targets[first : first + HEAD_CHUNK], reduction="sum")
                total += nll.double()
    return float(total), int(scored.sum())


@torch.no_grad()
def evaluate_naive(model: nn.Module, ids: np.ndarray, *, batch_size: int = 10, bptt: int = 35) -> EvalResult:
    """The PyTorch example's evaluation: batchify (tail dropped), every column starts cold, state carried.

    Kept to show that its result depends on ``batch_size``; use :func:`evaluate` for numbers to report.
    """
    started = time.perf_counter()
    device = _device_of(model)
    stream = batchify(np.asarray(ids), batch_size).to(device)
    state = model.init_state(batch_size, device)
    total = 0.0
    for row in window_starts(stream.size(0), bptt):
        inputs, targets = get_batch(stream, row, bptt)
        features, state = model(inputs, state)
        total += float(model.head.loss(features, targets, reduction="sum"))
    tokens = (stream.size(0) - 1) * batch_size
    return EvalResult(total / tokens, tokens, time.perf_counter() - started, "naive", batch_size, None)


def compare_batch_sizes(
    model: nn.Module, ids: np.ndarray, batch_sizes: list[int], *, bptt: int, context: int | None = None
) -> list[dict]:
    """The origin document's experiment: naive vs exact perplexity for several evaluation batch sizes."""
    rows = []
    for batch_size in batch_sizes:
        naive = evaluate_naive(model, ids, batch_size=batch_size, bptt=bptt)
        exact = evaluate(model, ids, batch_size=batch_size, bptt=bptt, context=context)
        rows.append({
            "batch_size": batch_size,
            "naive_ppl": naive.ppl,
            "naive_tokens": naive.tokens,
            "exact_ppl": exact.ppl,
            "exact_tokens": exact.tokens,
            "naive_seconds": round(naive.seconds, 3),
            "exact_seconds": round(exact.seconds, 3),
        })
    return rows


def format_comparison(rows: list[dict]) -> str:
    header = f"{'batch size':>10} {'naive ppl':>10} {'naive tokens':>13} {'exact ppl':>10} {'exact tokens':>13} {'seconds (naive/exact)':>22}"
    lines = [header, "-" * len(header)]
    for r in rows:
        seconds = f"{r['naive_seconds']:.1f} / {r['exact_seconds']:.1f}"
        lines.append(
            f"{r['batch_size']:>10} {r['naive_ppl']:>10.2f} {r['naive_tokens']:>13,} {r['exact_ppl']:>10.2f} "
            f"{r['exact_tokens']:>13,} {seconds:>22}"
        )
    return "\n".join(lines)

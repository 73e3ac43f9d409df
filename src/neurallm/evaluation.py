"""Perplexity that does not depend on the evaluation batch size.

The PyTorch example evaluates by ``batchify``-ing the split into ``batch_size`` columns: the tail that does not
fit is dropped and every column starts from a zero state, so the more columns, the more tokens are predicted
with no history and the fewer are scored at all. Its perplexity therefore changes with the batch size
(:func:`evaluate_naive` keeps that method so the effect can be reproduced).

:func:`evaluate` scores every token after the first exactly once, and gives each at least ``context`` tokens of
real history, whatever the batch size:

How a model is run comes from its :meth:`~neurallm.models.contract.LanguageModel.eval_layout`:

* models that carry a state (RNNs, the Transformer with ``--memory``) cut the targets into ``batch_size``
  contiguous columns; each column first runs over the ``context`` tokens before its first target (a burn-in
  that builds up the state and is not scored), then scores its own tokens, window after window, carrying the
  state. With ``batch_size=1`` there is one column and no burn-in: the method reduces to reading the text in
  order, which is what every other batch size is compared against.
* a Transformer without memory carries nothing between windows, so it is evaluated with sliding windows:
  each window scores ``stride`` new tokens after ``context`` tokens of history (``stride + context`` is the
  training ``bptt``).

Losses are in nats per token; perplexity is ``exp(loss)``. Bits per byte (``bpb``) and per character (``bpc``)
divide the same loss by the text it stands for instead of by tokens (see :func:`with_text_units`).
The ids are read from the (memory-mapped) split one window at a time: no int64 copy of the split is made.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from neurallm.data.batching import EvalColumn, batchify, get_batch, plan_eval_columns, sliding_window, sliding_window_targets, to_ids_tensor, window_starts
from neurallm.config import EVAL_BATCH_SIZE
from neurallm.distributed import SINGLE, Ranks
from neurallm.errors import ConfigError
from neurallm.models.contract import LanguageModel
from neurallm.runtime import cuda_matmul_precision, precision_name

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
        settings: the settings of an evaluation-time method (cache pointer, dynamic evaluation), or None.
        bytes_per_token, chars_per_token: UTF-8 bytes and characters of the split's text per token (None when
            unknown: ids passed directly, or a corpus prepared before neurallm counted them).
        precision: the matrix products' precision, ``float32`` or ``bfloat16`` (``--amp``).
    """

    loss: float
    tokens: int
    seconds: float
    method: str
    batch_size: int
    context: int | None
    unk_share: float | None = None
    settings: dict | None = None
    bytes_per_token: float | None = None
    chars_per_token: float | None = None
    precision: str = "float32"

    @property
    def ppl(self) -> float:
        return math.exp(min(self.loss, 700.0))

    @property
    def bpb(self) -> float | None:
        """Bits per UTF-8 byte of the text (see :func:`with_text_units`); None if the byte count is unknown."""
        return None if self.bytes_per_token is None else self.loss / math.log(2) / self.bytes_per_token

    @property
    def bpc(self) -> float:
        """Bits per character; for a char model whose characters were not counted, bits per token (the same)."""
        return self.loss / math.log(2) / (self.chars_per_token or 1.0)

    def to_dict(self, level: str = "word") -> dict:
        out = {
            "loss": self.loss,
            "ppl": self.ppl,
            "tokens": self.tokens,
            "seconds": round(self.seconds, 3),
            "method": self.method,
            "batch_size": self.batch_size,
            "context": self.context,
            "precision": self.precision,
        }
        if level == "char" or self.chars_per_token is not None:
            out["bpc"] = self.bpc
        if self.bpb is not None:
            out["bpb"] = self.bpb
        if self.unk_share is not None:
            out["unk_share"] = self.unk_share
        if self.settings is not None:
            out.update(self.settings)
        return out


# Why bits per byte, and not perplexity, compares tokenizers
# ---------------------------------------------------------
# Perplexity is exp(mean loss per *token*), and what a token is differs between tokenizers. A character model
# predicts ~5 tokens per English word, each of them easy (after "th" an "e" is likely): its perplexity is ~3. A
# word model predicts one token per word, a hard choice among tens of thousands: perplexity ~100. A BPE model
# sits in between and moves with --vocab-size. Neither number says which model predicts the *text* better,
# because they divide the same total surprise by different counts. And a word vocabulary hides part of the
# text: every rare word becomes one cheap <unk>, which a character or byte-level model has to spell out.
#
# The total negative log-likelihood of a text, though, is comparable: each model assigns a probability to the
# same text. Dividing it by something every tokenizer agrees on — the text's UTF-8 bytes (or characters) —
# gives a rate that compares them: bits per byte = total NLL / ln 2 / bytes. (It is the compressed size of the
# text, in bits, were the model used as an arithmetic coder.) Byte counts are fixed by the text alone, so the
# figure also does not change with the vocabulary size (nanochat reports the same quantity for that reason).
#
# The byte and character counts of each split are taken at `prepare` time from the text as read (each line plus
# its line break) and stored in the prepared meta.json. Evaluation scores every token but the first (exact
# method) or the columns batchify keeps (naive), so the loss per token is converted with the split's bytes per
# token: bpb = (loss / ln 2) × tokens / bytes, i.e. the scored tokens are charged the split's average bytes.
# For a char model the characters are the tokens, so its bpc is loss / ln 2 as before and its
# bpb = bpc × chars / bytes. Caveat: a word model's <unk> tokens still make its bpb look better than it is on
# text with many unknown words (the <unk> share is reported beside it).
def with_text_units(result: EvalResult, counts: dict) -> EvalResult:
    """``result`` with the bytes and characters per token of the split whose ``counts`` (the prepared meta's
    ``{"tokens", "bytes", "chars"}``) it was scored on, so it reports ``bpb`` and ``bpc``; counts of a corpus
    prepared before they were recorded leave it unchanged."""
    if counts.get("bytes") and counts.get("chars") and counts.get("tokens"):
        result.bytes_per_token = counts["bytes"] / counts["tokens"]
        result.chars_per_token = counts["chars"] / counts["tokens"]
    return result


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextmanager
def eval_mode(model: nn.Module, amp_dtype: torch.dtype | None = None) -> Iterator[None]:
    """Dropout off, no gradients and full float32 products (no TF32 on a GPU) while evaluating, or products in
    ``amp_dtype`` (bfloat16 autocast: the softmax and the summed loss stay float32); the caller's mode and settings
    are restored afterwards."""
    was_training = model.training
    device = _device_of(model)
    model.eval()
    try:
        with torch.no_grad(), cuda_matmul_precision(device, tf32=False), \
                torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            yield
    finally:
        model.train(was_training)


def default_context(model: LanguageModel, bptt: int) -> int:
    """History per scored token when ``--context`` is not given (the model's :class:`EvalLayout` says)."""
    return model.eval_layout(bptt).default_context


def evaluate(
    model: LanguageModel,
    ids: np.ndarray,
    *,
    batch_size: int = EVAL_BATCH_SIZE,
    bptt: int = 35,
    context: int | None = None,
    ranks: Ranks = SINGLE,
    amp_dtype: torch.dtype | None = None,
) -> EvalResult:
    """Exact evaluation of ``model`` on the id stream ``ids`` (see the module docstring).

    The model is evaluated in eval mode (dropout off) and left in the mode it was in.

    Args:
        model: a neurallm language model.
        ids: 1-D token ids (a memory-mapped split is read window by window).
        batch_size: columns evaluated in parallel; does not change the result beyond float rounding.
        bptt: the window length the model was trained with.
        context: tokens of history each scored token gets (default: the model's ``eval_layout``).
        ranks: under torchrun, the processes sharing the work: columns are independent, so each rank runs its
            own share of them and the summed NLL and token counts are added up (float64) across ranks; every
            rank returns the same result as one process would, to float rounding.
        amp_dtype: ``torch.bfloat16`` for bfloat16 products (``--amp bf16``; :func:`~neurallm.runtime.amp_dtype_for`
            checks the hardware); None: float32.
    """
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    layout = model.eval_layout(bptt)
    context = layout.default_context if context is None else context
    if context < 0:
        raise ConfigError(f"--context must be 0 or more, got {context}")
    started = time.perf_counter()
    with eval_mode(model, amp_dtype):
        if layout.carries_state:
            columns = plan_eval_columns(len(ids), batch_size, context, align=layout.align or 1)
            own = columns[ranks.share(len(columns))]
            total, count = run_columns(model, ids, own, layout.window) if own else (0.0, 0)
        else:
            stride = max(1, layout.window - context)
            targets = sliding_window_targets(len(ids), stride)
            total, count = 0.0, 0
            for first in range(0, len(targets), batch_size)[ranks.share(-(-len(targets) // batch_size))]:
                group = [sliding_window(t, len(ids), stride, context) for t in targets[first : first + batch_size]]
                part_total, part_count = run_columns(model, ids, group, window=max(c.length for c in group))
                total, count = total + part_total, count + part_count
        total, count = ranks.sum([total, count])
    return EvalResult(total / count, int(count), time.perf_counter() - started, "exact", batch_size, context,
                      precision=precision_name(amp_dtype))


WindowScorer = Callable[[torch.Tensor, torch.Tensor, np.ndarray], torch.Tensor]
"""Summed NLL of a window's scored targets from its features ``(w, B, D)``, targets ``(w, B)`` and scored mask
``(w, B)``; called for every window in order, burn-in included (an evaluation-time method such as the cache
pointer keeps what it needs from each)."""


def run_columns(model: LanguageModel, ids: np.ndarray, columns: list[EvalColumn], window: int,
                scorer: WindowScorer | None = None) -> tuple[float, int]:
    """Run the columns side by side in windows, carrying the state; sum the NLL of the scored targets.

    Positions, masks and ids are built one window at a time, so memory does not grow with the split. ``scorer``
    replaces the output head's NLL (see :data:`WindowScorer`).
    """
    total, count, _ = run_columns_from(model, ids, columns, window, scorer)
    return total, count


def run_columns_from(model: LanguageModel, ids: np.ndarray, columns: list[EvalColumn], window: int,
                     scorer: WindowScorer | None = None, state=None) -> tuple[float, int, object]:
    """:func:`run_columns` from ``state`` (None: a cold one), also returning the state after the last window, so
    that a text read in pieces (``score`` streaming a file) is run exactly as in one piece."""
    device = _device_of(model)
    starts = np.array([c.start for c in columns])
    lengths = np.array([c.length for c in columns])
    score_from = np.array([c.score_start for c in columns])
    rows = int(lengths.max())
    state = model.init_state(len(columns), device) if state is None else state
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    for row in range(0, rows, window):
        steps = np.arange(row, min(row + window, rows))[:, None]  # (w, 1)
        position = starts[None, :] + steps  # (w, B): index of each input token
        scored = (steps < lengths[None, :]) & (position + 1 >= score_from[None, :])  # not padding, not burn-in
        # inputs are rows 0..w-1 and targets rows 1..w of one gather; right padding reads a clamped, unscored id
        wanted = np.minimum(np.vstack((position, position[-1:] + 1)), len(ids) - 1)
        window_ids = to_ids_tensor(np.asarray(ids)[wanted], device)  # (w + 1, B)
        features, state = model.features(window_ids[:-1], state)
        if scorer is not None:
            count += int(scored.sum())
            total += scorer(features, window_ids[1:], scored).double()
            continue
        flat = np.flatnonzero(scored)
        if flat.size == 0:
            continue
        count += flat.size
        # the output layer only where a target is scored (burn-in and padding need no softmax), and in slices:
        # the logits of a whole window of many columns can take gigabytes
        index = torch.from_numpy(flat).to(device)
        scored_features = features.reshape(-1, features.size(-1)).index_select(0, index)
        scored_targets = window_ids[1:].reshape(-1).index_select(0, index)
        for first in range(0, flat.size, HEAD_CHUNK):
            chunk = slice(first, first + HEAD_CHUNK)
            total += model.head.loss(scored_features[chunk], scored_targets[chunk], reduction="sum").double()
    return float(total), count, state


def evaluate_naive(model: LanguageModel, ids: np.ndarray, *, batch_size: int = 10, bptt: int = 35) -> EvalResult:
    """The PyTorch example's evaluation: batchify (tail dropped), every column starts cold, state carried.

    Kept to show that its result depends on ``batch_size``; use :func:`evaluate` for numbers to report.
    """
    started = time.perf_counter()
    device = _device_of(model)
    stream = batchify(np.asarray(ids), batch_size)
    total = torch.zeros((), dtype=torch.float64, device=device)
    with eval_mode(model):
        state = model.init_state(batch_size, device)
        for row in window_starts(len(stream), bptt):
            inputs, targets = get_batch(stream, row, bptt, device)
            features, state = model.features(inputs, state)
            total += model.head.loss(features, targets, reduction="sum").double()
    tokens = (len(stream) - 1) * batch_size
    return EvalResult(float(total) / tokens, tokens, time.perf_counter() - started, "naive", batch_size, None)


def compare_batch_sizes(
    model: LanguageModel, ids: np.ndarray, batch_sizes: list[int], *, bptt: int, context: int | None = None
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

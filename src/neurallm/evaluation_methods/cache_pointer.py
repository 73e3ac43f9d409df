"""The continuous cache pointer (Grave, Joulin & Usunier, 2017): mix the model's distribution with one over the
words that followed the most similar of the last ``size`` hidden states.

    p(w | h_t) = (1 - λ) p_model(w | h_t) + λ Σ_{i in [t - size, t)} softmax_i(θ h_t·h_i) [w = y_i]

where ``h_i`` are the model's features and ``y_i`` the word that followed them. Only the target's probability is
needed, so the mixture is computed for the target alone (no ``(V,)`` vector per position): it is exact, and cheap.

Exact evaluation's guarantees hold: each column is given ``max(context, size)`` tokens of burn-in, during which
its cache fills (scored by no one), so every scored token sees the same ``size`` previous pairs as when the text is
read in one column, whatever ``--batch-size``; every token after the first is scored once.

Defaults ``θ = 0.3``, ``λ = 0.1`` help on WikiText-2 without tuning (the paper's grid found θ ≈ 0.3 best for a
cache of 100–2000 with an LSTM of a few hundred units). To tune, score the validation split over a grid, e.g.
``for t in 0.1 0.3 0.6; do for l in 0.05 0.1 0.2; do neurallm eval RUN --split valid --cache-pointer 1000 --theta $t
--lambda $l --json; done; done``, and report test with the best pair.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from neurallm.config import CACHE_LAMBDA, CACHE_THETA
from neurallm.data.batching import plan_eval_columns
from neurallm.errors import ConfigError
from neurallm.evaluation import EvalResult, eval_mode, run_columns
from neurallm.models.contract import LanguageModel, OutputHead


@dataclass(frozen=True)
class CachePointerSettings:
    """How the pointer was run (reported in ``--json`` output)."""

    size: int
    theta: float = CACHE_THETA
    lambda_: float = CACHE_LAMBDA

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ConfigError(f"--cache-pointer must be at least 1 (the number of past states kept), got {self.size}")
        if self.theta < 0:
            raise ConfigError(f"--theta must be 0 or more, got {self.theta}")
        if not 0.0 <= self.lambda_ < 1.0:
            raise ConfigError(f"--lambda must be in [0, 1), got {self.lambda_}")

    def to_dict(self) -> dict:
        return {"cache_pointer": self.size, "theta": self.theta, "lambda": self.lambda_}


class CachePointerScorer:
    """Scores windows in order (a :data:`~neurallm.evaluation.WindowScorer`), keeping each column's last
    ``size`` (feature, next word) pairs."""

    def __init__(self, head: OutputHead, settings: CachePointerSettings) -> None:
        self.head = head
        self.settings = settings
        self.keys: torch.Tensor | None = None  # (B, n, D) past features
        self.words: torch.Tensor | None = None  # (B, n) the word that followed each

    def __call__(self, features: torch.Tensor, targets: torch.Tensor, scored: np.ndarray) -> torch.Tensor:
        size, theta, lam = self.settings.size, self.settings.theta, self.settings.lambda_
        feats = features.transpose(0, 1).float()  # (B, w, D)
        words = targets.t()  # (B, w)
        B, w, _ = feats.shape
        if self.keys is None:
            self.keys, self.words = feats[:, :0], words[:, :0]
        n = self.keys.size(1)
        keys = torch.cat([self.keys, feats], 1)  # (B, n + w, D)
        key_words = torch.cat([self.words, words], 1)  # (B, n + w)
        # position t may point at pairs n + t - size .. n + t - 1 of the history (never at itself or later)
        j = torch.arange(n + w, device=feats.device)[None, :]
        t = torch.arange(w, device=feats.device)[:, None]
        visible = (j < n + t) & (j >= n + t - size)  # (w, n + w)
        logits = (theta * feats @ keys.transpose(1, 2)).masked_fill(~visible, float("-inf"))  # (B, w, n + w)
        has_cache = visible.any(-1)  # (w,): the text's very first position has nothing to point at
        attention = torch.softmax(logits, -1).nan_to_num(0.0)
        p_cache = (attention * (key_words[:, None, :] == words[:, :, None])).sum(-1)  # (B, w)
        log_model = -self.head.loss(feats, words, reduction="none").view(B, w)
        mixed = torch.logaddexp(log_model + np.log1p(-lam), torch.log(lam * p_cache))
        nll = -torch.where(has_cache[None, :], mixed, log_model)  # (B, w)
        self.keys, self.words = keys[:, -size:], key_words[:, -size:]
        mask = torch.from_numpy(np.ascontiguousarray(scored.T)).to(nll.device)
        return nll[mask].sum()


def evaluate_cache_pointer(model: LanguageModel, ids: np.ndarray, settings: CachePointerSettings, *,
                           batch_size: int = 10, bptt: int = 35, context: int | None = None) -> EvalResult:
    """Exact evaluation of ``model`` with a cache pointer (see the module docstring)."""
    layout = model.eval_layout(bptt)
    if not layout.carries_state:
        raise ConfigError("--cache-pointer needs a model that carries a state (an RNN or AWD_LSTM)")
    context = max(layout.default_context if context is None else context, settings.size)
    started = time.perf_counter()
    with eval_mode(model):
        columns = plan_eval_columns(len(ids), batch_size, context, align=layout.align or 1)
        total, count = run_columns(model, ids, columns, layout.window, scorer=CachePointerScorer(model.head, settings))
    return EvalResult(total / count, count, time.perf_counter() - started, "exact+cache-pointer", batch_size, context,
                      settings=settings.to_dict())


__all__ = ["CachePointerScorer", "CachePointerSettings", "evaluate_cache_pointer"]

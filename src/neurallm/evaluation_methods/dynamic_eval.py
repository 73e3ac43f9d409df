"""Dynamic evaluation (Krause et al., 2018): adapt the weights to the text as it is read.

The text is read in order in one column, window by window: each window is scored first (its NLL counts), then
one gradient step on that same window moves the weights towards it, and a decay pulls them back towards the
trained weights. Every token after the first is scored exactly once, and only with weights that have seen the
tokens before it, never itself. Two update rules (``--dynamic-rule``):

- ``rms`` (the default, the paper's best): each weight's step is divided by the root mean square of its gradient on
  the training text, ``θ ← θ - lr·∇/(RMS + ε) + decay·(RMS/mean RMS)·(θ_trained - θ)``. Weights the training text
  rarely moved take bigger steps, and the weights that move most are pulled back hardest. The RMS is measured once
  per evaluation on (at most :data:`STATS_TOKENS` tokens of) the run's training split, before any test token is read.
- ``sgd``: plain steps, ``θ ← θ - lr·∇ + decay·(θ_trained - θ)``; needs no training text.

The window length matters: the weights change once per window, so shorter windows adapt sooner, from noisier
gradients and with more backward passes; the default, 20 tokens, was the best of 10-35 on cpu-fast. The result is
reported with the rule, the window, the learning rate and the decay, so a number can be traced to how it was taken.
The trained weights are restored afterwards.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from neurallm.config import DYNAMIC_DECAY, DYNAMIC_RULES, DYNAMIC_WINDOW, dynamic_lr_default
from neurallm.data.batching import batchify, get_batch
from neurallm.errors import ConfigError
from neurallm.evaluation import EvalResult
from neurallm.models.contract import LanguageModel

FINITE_CHECK_EVERY = 64  # windows between checks that the adapted weights have not diverged (each check syncs)
# The RMS statistics: 80 columns of the training split (the paper used its training batches and all of it). The
# more text, the better: on cpu-fast the valid perplexity was 91.53 with RMS from 50,000 training tokens and 82.26
# from 200,000 (likely because a rare word's RMS stays near 0 until the text has it, so its steps are huge). Capped
# so that a large corpus costs minutes, not an epoch.
STATS_STREAMS = 80
STATS_TOKENS = 1_000_000
RMS_EPSILON = 1e-5  # tuned with the learning rate: 1e-3 made cpu-fast's best valid perplexity 11% worse (91.58 vs 82.26)


@dataclass(frozen=True)
class DynamicSettings:
    """How dynamic evaluation was run (reported in ``--json`` output). ``lr`` None: the rule's default for the
    run's tokens, ``level`` (word, char or bpe)."""

    rule: str = "rms"
    lr: float | None = None
    decay: float = DYNAMIC_DECAY
    window: int = DYNAMIC_WINDOW
    level: str = "word"

    def __post_init__(self) -> None:
        if self.rule not in DYNAMIC_RULES:
            raise ConfigError(f"--dynamic-rule must be one of {', '.join(DYNAMIC_RULES)}, got {self.rule!r}")
        if self.lr is None:
            object.__setattr__(self, "lr", dynamic_lr_default(self.rule, self.level))
        if self.lr <= 0:
            raise ConfigError(f"--dynamic-lr must be positive, got {self.lr}")
        if not 0.0 <= self.decay <= 1.0:
            raise ConfigError(f"--dynamic-decay must be in [0, 1], got {self.decay}")
        if self.window < 1:
            raise ConfigError(f"--dynamic-window must be at least 1 token, got {self.window}")

    def to_dict(self) -> dict:
        return {"dynamic": True, "dynamic_rule": self.rule, "dynamic_lr": self.lr, "dynamic_decay": self.decay,
                "dynamic_window": self.window}


@contextmanager
def _adapting(model: LanguageModel) -> Iterator[list[torch.Tensor]]:
    """The model's trainable weights, with dropout off (the gradient is the text's, not a regulariser's) and
    gradients on; afterwards the gradients are dropped and the caller's mode is restored."""
    was_training = model.training
    model.eval()
    try:
        yield [p for p in model.parameters() if p.requires_grad]
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)


def gradient_rms(model: LanguageModel, train_ids: np.ndarray, window: int) -> list[torch.Tensor]:
    """Root mean square of each trainable weight's gradient over ``window``-token windows of the training text
    (its first :data:`STATS_TOKENS` tokens in :data:`STATS_STREAMS` columns, state carried, no dropout)."""
    ids = np.asarray(train_ids[: STATS_TOKENS + 1])
    if len(ids) < window + 1:
        raise ConfigError(f"--dynamic-rule rms measures its step sizes on the run's training text, which has {len(ids)} "
                          f"tokens, fewer than one {window}-token window; use --dynamic-rule sgd")
    streams = max(1, min(STATS_STREAMS, (len(ids) - 1) // window))
    stream = batchify(torch.from_numpy(ids.astype(np.int64)), streams)
    with _adapting(model) as params:
        device = params[0].device
        squares = [torch.zeros_like(p) for p in params]
        state = model.init_state(streams, device)
        windows = 0
        for row in range(0, len(stream) - 1, window):
            inputs, targets = get_batch(stream, row, window, device)
            features, state = model.features(inputs, state)
            model.zero_grad(set_to_none=True)
            model.head.loss(features, targets).backward()
            with torch.no_grad():
                for square, p in zip(squares, params):
                    if p.grad is not None:
                        square.addcmul_(p.grad, p.grad)
            state = tuple(t.detach() for t in state)
            windows += 1
    return [torch.sqrt(square / windows) for square in squares]


def evaluate_dynamic(model: LanguageModel, ids: np.ndarray, settings: DynamicSettings,
                     rms: list[torch.Tensor] | None = None) -> EvalResult:
    """Score ``ids`` in order while adapting ``model`` to them (see the module docstring). ``rms``: the rule
    ``rms``'s statistics, from :func:`gradient_rms` on the training text."""
    if not model.carries_state:
        raise ConfigError("--dynamic needs a model that carries a state between windows (an RNN, AWD_LSTM or "
                          "a Transformer with --memory)")
    started = time.perf_counter()
    with _adapting(model) as params:
        if settings.rule == "rms" and (rms is None or len(rms) != len(params)):
            raise ValueError("the rule 'rms' needs gradient_rms() of the model's trainable weights")
        device = params[0].device
        trained = [p.detach().clone() for p in params]
        steps, pulls = _update_factors(settings, rms, len(params))
        total = torch.zeros((), dtype=torch.float64, device=device)
        state = model.init_state(1, device)
        column = batchify(np.asarray(ids), 1)
        try:
            for number, row in enumerate(range(0, len(ids) - 1, settings.window)):
                inputs, targets = get_batch(column, row, settings.window, device)
                features, new_state = model.features(inputs, state)
                nll = model.head.loss(features, targets, reduction="sum")
                total += nll.detach().double()
                model.zero_grad(set_to_none=True)
                (nll / targets.numel()).backward()
                with torch.no_grad():
                    for p, p0, step, pull in zip(params, trained, steps, pulls):
                        _update(p, p0, step, pull, settings)
                state = tuple(t.detach() for t in new_state)
                if number % FINITE_CHECK_EVERY == 0 and not torch.isfinite(total):
                    raise _diverged(settings, row + settings.window)
            if not torch.isfinite(total):
                raise _diverged(settings, len(ids) - 1)
        finally:
            with torch.no_grad():
                for p, p0 in zip(params, trained):
                    p.copy_(p0)
    count = len(ids) - 1
    return EvalResult(float(total) / count, count, time.perf_counter() - started, "dynamic", 1, None,
                      settings=settings.to_dict())


def _update_factors(settings: DynamicSettings, rms: list[torch.Tensor] | None, count: int) -> tuple[list, list]:
    """Per weight, for the rule rms: what multiplies its gradient, 1/(RMS + ε), and the share of its distance to the
    trained value taken back per window, decay·RMS/mean RMS capped at 1. For sgd: None (1 and the plain decay)."""
    if settings.rule == "sgd":
        return [None] * count, [None] * count
    # the smallest positive float keeps a model whose gradients were all zero from dividing by zero
    mean_rms = torch.cat([r.flatten() for r in rms]).mean().clamp_min(torch.finfo(torch.float32).tiny)
    steps = [1.0 / (r + RMS_EPSILON) for r in rms]
    pulls = [(settings.decay * r / mean_rms).clamp(max=1.0) for r in rms]
    return steps, pulls


def _update(p: torch.Tensor, trained: torch.Tensor, step: torch.Tensor | None, pull: torch.Tensor | None,
            settings: DynamicSettings) -> None:
    """One weight's step down its gradient, then the pull back towards its trained value (in place, no grad)."""
    if p.grad is not None:
        if step is None:
            p.add_(p.grad, alpha=-settings.lr)
        else:
            p.addcmul_(p.grad, step, value=-settings.lr)
    if settings.decay:
        if pull is None:
            p.add_(trained - p, alpha=settings.decay)
        else:
            p.addcmul_(trained - p, pull)


def _diverged(settings: DynamicSettings, tokens_read: int) -> ConfigError:
    return ConfigError(f"dynamic evaluation diverged with --dynamic-lr {settings.lr:g} (a non-finite loss within the first "
                       f"{tokens_read:,} tokens); lower --dynamic-lr (tune it on --split valid)")

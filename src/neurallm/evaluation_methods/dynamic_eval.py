"""Dynamic evaluation (Krause et al., 2018): adapt the weights to the text as it is read.

The text is read in order in one column, window by window: each window is scored first (its NLL counts), then
one gradient step on that same window moves the weights towards it, and a decay pulls them back towards the
trained weights (``θ ← θ - lr·∇ + decay·(θ_trained - θ)``, the paper's SGD variant). Every token after the first is
scored exactly once, and only with weights that have seen the tokens before it, never itself.

The window length matters: the weights change once per window, so shorter windows adapt sooner (better
perplexity, typically) at the price of more backward passes; the default is the run's ``--bptt``. The result is
reported with the window, the learning rate and the decay, so a number can be traced to how it was taken.
The trained weights are restored afterwards.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from neurallm.config import DYNAMIC_DECAY, DYNAMIC_LR
from neurallm.data.batching import to_ids_tensor
from neurallm.errors import ConfigError
from neurallm.evaluation import EvalResult
from neurallm.models.contract import LanguageModel

FINITE_CHECK_EVERY = 64  # windows between checks that the adapted weights have not diverged (each check syncs)


@dataclass(frozen=True)
class DynamicSettings:
    """How dynamic evaluation was run (reported in ``--json`` output)."""

    lr: float = DYNAMIC_LR
    decay: float = DYNAMIC_DECAY
    window: int = 35

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"--dynamic-lr must be positive, got {self.lr}")
        if not 0.0 <= self.decay <= 1.0:
            raise ConfigError(f"--dynamic-decay must be in [0, 1], got {self.decay}")
        if self.window < 1:
            raise ConfigError(f"the dynamic evaluation window must be at least 1 token, got {self.window}")

    def to_dict(self) -> dict:
        return {"dynamic": True, "dynamic_lr": self.lr, "dynamic_decay": self.decay, "dynamic_window": self.window}


def evaluate_dynamic(model: LanguageModel, ids: np.ndarray, settings: DynamicSettings) -> EvalResult:
    """Score ``ids`` in order while adapting ``model`` to them (see the module docstring)."""
    if not model.carries_state:
        raise ConfigError("--dynamic needs a model that carries a state between windows (an RNN, AWD_LSTM or "
                          "a Transformer with --memory)")
    started = time.perf_counter()
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    trained = [p.detach().clone() for p in params]
    was_training = model.training
    model.eval()  # no dropout: the gradient is the text's, not a regulariser's
    total = torch.zeros((), dtype=torch.float64, device=device)
    state = model.init_state(1, device)
    try:
        for number, start in enumerate(range(0, len(ids) - 1, settings.window)):
            window_ids = to_ids_tensor(np.asarray(ids[start : start + settings.window + 1]), device)[:, None]  # (w+1, 1)
            features, new_state = model.features(window_ids[:-1], state)
            nll = model.head.loss(features, window_ids[1:], reduction="sum")
            total += nll.detach().double()
            model.zero_grad(set_to_none=True)
            (nll / (window_ids.size(0) - 1)).backward()
            with torch.no_grad():
                for p, p0 in zip(params, trained):
                    if p.grad is not None:
                        p.add_(p.grad, alpha=-settings.lr)
                    if settings.decay:
                        p.add_(p0 - p, alpha=settings.decay)
            state = tuple(t.detach() for t in new_state)
            if number % FINITE_CHECK_EVERY == 0 and not torch.isfinite(total):
                raise _diverged(settings, start + settings.window)
        if not torch.isfinite(total):
            raise _diverged(settings, len(ids) - 1)
    finally:
        with torch.no_grad():
            for p, p0 in zip(params, trained):
                p.copy_(p0)
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    count = len(ids) - 1
    return EvalResult(float(total) / count, count, time.perf_counter() - started, "dynamic", 1, None,
                      settings=settings.to_dict())


def _diverged(settings: DynamicSettings, tokens_read: int) -> ConfigError:
    return ConfigError(f"dynamic evaluation diverged with --dynamic-lr {settings.lr:g} (a non-finite loss within the first "
                       f"{tokens_read:,} tokens); lower --dynamic-lr (tune it on --split valid)")

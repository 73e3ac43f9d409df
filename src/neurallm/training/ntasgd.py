"""NT-ASGD (Merity et al., 2018): SGD until validation stops improving, then report the average of the iterates.

The trigger is non-monotone: averaging starts at the end of an epoch whose validation loss is worse than the
best of all but the last ``--nonmono`` epochs (:meth:`neurallm.training.optim.Schedule.after_validation`).
From then on :class:`ParameterAverage` keeps the running mean of *every* trained parameter (the reference code
switched to ``torch.optim.ASGD`` and its averages left out the parameters of its separate softmax criterion;
here the output head is part of the model, so it is averaged like the rest). Validation, the best checkpoint
and the test score use the averaged weights; training continues on the raw ones. The averages and their count
are saved in ``last.safetensors``, so a resumed run averages exactly as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from neurallm.weights import AVERAGE_PREFIX as PREFIX  # names of the averages in last.safetensors (load_run reads them)


class ParameterAverage:
    """Running mean of a model's parameters since :meth:`start` (inactive until then)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.count = 0
        self.means: dict[str, torch.Tensor] | None = None

    @property
    def active(self) -> bool:
        return self.means is not None

    def start(self) -> None:
        """Begin averaging from the current weights (the first iterate of the average)."""
        self.means = {name: p.detach().clone() for name, p in self.model.named_parameters()}
        self.count = 1

    def update(self) -> None:
        """Fold the current weights into the mean (after each optimizer step)."""
        if self.means is None:
            return
        self.count += 1
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                self.means[name].add_(p.detach() - self.means[name], alpha=1.0 / self.count)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The model holds the averaged weights inside the block, its own ones again after it."""
        if self.means is None:
            yield
            return
        params = dict(self.model.named_parameters())
        raw = {name: p.detach().clone() for name, p in params.items()}
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(self.means[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(raw[name])

    def to_state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """``({"count": n}, tensors)`` for a checkpoint (no tensors while inactive)."""
        tensors = {PREFIX + name: t for name, t in (self.means or {}).items()}
        return {"count": self.count}, tensors

    def load_state(self, info: dict | None, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`to_state` saved (inactive if nothing was)."""
        if not info or info.get("count", 0) == 0:
            self.means, self.count = None, 0
            return
        device = next(self.model.parameters()).device
        self.means = {name: tensors[PREFIX + name].to(device) for name, _ in self.model.named_parameters()}
        self.count = info["count"]

"""Optimizers and learning-rate schedules.

* ``sgd``: plain SGD; the learning rate is divided by 4 whenever the validation loss fails to improve
  (the PyTorch example's schedule).
* ``adamw``: AdamW with linear warm-up over ``warmup`` steps, then cosine decay to a tenth of ``lr`` by the
  last step of the last epoch. Weight decay applies to matrices only, not to biases and LayerNorm gains.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from neurallm.config import TrainConfig


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=config.lr)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # on CUDA the fused kernel updates every parameter in one launch instead of several per tensor
    fused = next(model.parameters()).device.type == "cuda"
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.99), fused=fused)


@dataclass
class Schedule:
    """Learning rate as a function of progress; its fields are all a resumed run needs to continue it."""

    kind: str
    base_lr: float
    warmup: int
    total_steps: int
    step: int = 0
    lr: float = 0.0
    best_valid_loss: float = math.inf

    def __post_init__(self) -> None:
        if self.lr == 0.0:
            self.lr = self.base_lr if self.kind == "sgd" else self._adamw_lr()

    def _adamw_lr(self) -> float:
        if self.step < self.warmup:
            return self.base_lr * (self.step + 1) / self.warmup
        progress = min(1.0, (self.step - self.warmup) / max(1, self.total_steps - self.warmup))
        return self.base_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    def after_step(self) -> None:
        self.step += 1
        if self.kind == "adamw":
            self.lr = self._adamw_lr()

    def after_validation(self, valid_loss: float) -> None:
        """Record the validation loss of a whole epoch; SGD anneals when it is no better than the best so far."""
        if valid_loss < self.best_valid_loss:
            self.best_valid_loss = valid_loss
        elif self.kind == "sgd":
            self.lr /= 4.0

    def scale(self, factor: float) -> None:
        """Lower the learning rate for good (after a numerical fault)."""
        self.base_lr *= factor
        self.lr *= factor

    def apply(self, optimizer: torch.optim.Optimizer) -> None:
        for group in optimizer.param_groups:
            group["lr"] = self.lr

    def to_dict(self) -> dict:
        data = asdict(self)
        data["best_valid_loss"] = None if math.isinf(self.best_valid_loss) else self.best_valid_loss
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "Schedule":
        data = dict(data)
        if data.get("best_valid_loss") is None:
            data["best_valid_loss"] = math.inf
        return cls(**data)

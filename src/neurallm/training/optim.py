"""Optimizers and learning-rate schedules.

* ``sgd``: plain SGD (:class:`~neurallm.training.sgd.PlainSGD`); the learning rate is divided by 4 whenever the
  validation loss fails to improve (the PyTorch example's schedule).
* ``ntasgd``: SGD at a constant learning rate (with L2 weight decay) until validation stalls, non-monotonically
  (see :mod:`neurallm.training.ntasgd`); then the weights are averaged.
* ``adamw``: AdamW with linear warm-up over ``warmup`` steps, then cosine decay to ``min_lr_ratio`` × ``lr``
  (``--min-lr-ratio``, a tenth by default) by the last step of the last epoch. Weight decay applies to matrices
  only, not to biases and LayerNorm gains.

With ``--max-time`` the last step is not known in advance, yet a run stopped by the clock in mid-schedule has
not annealed and scores much worse. So the cosine follows the training clock instead: after the warm-up its
progress is the share of the remaining time spent (or of the epochs' steps, whichever is further), and it reaches
its end when the time runs out however the speed varies on the way. An earlier version fixed the length once from
the steps per second of the first 10% of the time; on a shared machine whose speed drifted, that ended the cosine
an epoch early (measured: lr at its floor for the last 35 of 110 s). The clock is the trainer's training time,
saved in the checkpoint, so a resumed run continues the schedule where it stopped; a raised ``--max-time``
stretches what is left of it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from neurallm.config import TrainConfig
from neurallm.training.sgd import PlainSGD

Optimizer = torch.optim.Optimizer | PlainSGD  # what build_optimizer returns; the trainer uses only their shared part


def build_optimizer(model: nn.Module, config: TrainConfig) -> Optimizer:
    if config.optimizer == "sgd":
        return PlainSGD(model.parameters(), lr=config.lr)
    if config.optimizer == "ntasgd":
        return PlainSGD(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # the fused kernel updates every parameter in one pass (CUDA: one launch) instead of several passes and launches
    # per tensor; on the CPU that took cpu-fast's optimizer step from 28 ms to 4.6 ms (5M parameters, 2 cores)
    fused = next(model.parameters()).device.type in ("cuda", "cpu")
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
    nonmono: int = 5
    valid_history: list[float] = field(default_factory=list)  # each whole epoch's validation loss (ntasgd's trigger)
    averaging: bool = False  # ntasgd has switched to averaged weights
    time_limit: float | None = None  # --max-time: the cosine follows the training clock towards it
    elapsed: float = 0.0  # training seconds after the last step (the trainer's clock)
    warmup_end_time: float | None = None  # the clock when the warm-up ended (the cosine's start in time)
    min_lr_ratio: float = 0.1  # adamw: the cosine's end as a fraction of base_lr (checkpoints without it had 0.1)

    def __post_init__(self) -> None:
        if self.lr == 0.0:
            self.lr = self._adamw_lr() if self.kind == "adamw" else self.base_lr

    def _adamw_lr(self) -> float:
        if self.step < self.warmup:
            return self.base_lr * (self.step + 1) / self.warmup
        progress = (self.step - self.warmup) / max(1, self.total_steps - self.warmup)
        if self.time_limit is not None and self.warmup_end_time is not None:
            time_left = max(1e-9, self.time_limit - self.warmup_end_time)
            progress = max(progress, (self.elapsed - self.warmup_end_time) / time_left)
        progress = min(1.0, progress)
        floor = self.min_lr_ratio
        return self.base_lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))

    def after_step(self, elapsed: float = 0.0, time_limit: float | None = None) -> None:
        """Count a step; ``elapsed`` is the training time so far and ``time_limit`` the ``--max-time`` (None: none)."""
        self.step += 1
        self.elapsed, self.time_limit = elapsed, time_limit
        if self.warmup_end_time is None and self.step >= self.warmup:
            self.warmup_end_time = elapsed
        if self.kind == "adamw":
            self.lr = self._adamw_lr()

    def resumed(self, total_steps: int, max_time: float | None) -> None:
        """Continue under possibly changed limits: the epochs' end is ``total_steps`` and the clock runs towards
        ``max_time`` (a raised ``--epochs`` or ``--max-time`` stretches what is left of the cosine)."""
        self.total_steps, self.time_limit = total_steps, max_time

    def after_validation(self, valid_loss: float) -> None:
        """Record the validation loss of a whole epoch; SGD anneals when it is no better than the best so far;
        NT-ASGD starts averaging when it is worse than the best before the last ``nonmono`` epochs."""
        history, self.valid_history = self.valid_history, self.valid_history + [valid_loss]
        if self.kind == "ntasgd" and not self.averaging and len(history) > self.nonmono:
            self.averaging = valid_loss > min(history[: -self.nonmono])
        if valid_loss < self.best_valid_loss:
            self.best_valid_loss = valid_loss
        elif self.kind == "sgd":
            self.lr /= 4.0

    def scale(self, factor: float) -> None:
        """Lower the learning rate for good (after a numerical fault)."""
        self.base_lr *= factor
        self.lr *= factor

    def apply(self, optimizer: Optimizer, scale: float = 1.0) -> None:
        """Set the optimizer's learning rate; ``scale`` multiplies it for one step (a window of variable length)."""
        for group in optimizer.param_groups:
            group["lr"] = self.lr * scale

    def to_dict(self) -> dict:
        data = asdict(self)
        data["best_valid_loss"] = None if math.isinf(self.best_valid_loss) else self.best_valid_loss
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "Schedule":
        data = dict(data)
        data.pop("fitted_to", None)  # checkpoints from before the clock-driven schedule
        if data.get("best_valid_loss") is None:
            data["best_valid_loss"] = math.inf
        return cls(**data)

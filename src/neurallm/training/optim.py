"""Optimizers and learning-rate schedules.

* ``sgd``: plain SGD; the learning rate is divided by 4 whenever the validation loss fails to improve
  (the PyTorch example's schedule).
* ``ntasgd``: SGD at a constant learning rate (with L2 weight decay) until validation stalls, non-monotonically
  (see :mod:`neurallm.training.ntasgd`); then the weights are averaged.
* ``adamw``: AdamW with linear warm-up over ``warmup`` steps, then cosine decay to a tenth of ``lr`` by the
  last step of the last epoch. Weight decay applies to matrices only, not to biases and LayerNorm gains.

With ``--max-time`` the last step is not known in advance, yet a run stopped by the clock in mid-schedule has
not annealed and scores much worse. So once :data:`TIMING_SHARE` of the time is spent, the steps per second
measured so far fix the schedule's length (:meth:`Schedule.fit_to_time`): the cosine reaches its end when the
time runs out. The length is fixed once and saved with the schedule, so a resumed run continues exactly; a
resume that raises ``--max-time`` fits it again to the new limit.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from neurallm.config import TrainConfig

TIMING_SHARE = 0.1  # share of --max-time over which steps per second are measured before the length is fixed


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=config.lr)
    if config.optimizer == "ntasgd":
        return torch.optim.SGD(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
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
    nonmono: int = 5
    valid_history: list[float] = field(default_factory=list)  # each whole epoch's validation loss (ntasgd's trigger)
    averaging: bool = False  # ntasgd has switched to averaged weights
    fitted_to: float | None = None  # the --max-time that total_steps was fitted to from the measured speed

    def __post_init__(self) -> None:
        if self.lr == 0.0:
            self.lr = self._adamw_lr() if self.kind == "adamw" else self.base_lr

    def _adamw_lr(self) -> float:
        if self.step < self.warmup:
            return self.base_lr * (self.step + 1) / self.warmup
        progress = min(1.0, (self.step - self.warmup) / max(1, self.total_steps - self.warmup))
        return self.base_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    def after_step(self) -> None:
        self.step += 1
        if self.kind == "adamw":
            self.lr = self._adamw_lr()

    def fit_to_time(self, elapsed: float, max_time: float) -> None:
        """Once ``TIMING_SHARE`` of ``max_time`` seconds is spent, end the schedule where the time will run out
        at the speed measured so far (never later than the epochs' end). Does nothing after the first time."""
        if self.fitted_to is not None or self.kind != "adamw" or elapsed < TIMING_SHARE * max_time or self.step == 0:
            return
        steps_left = (max_time - elapsed) * self.step / elapsed
        self.total_steps = min(self.total_steps, self.step + max(1, round(steps_left)))
        self.fitted_to = max_time

    def resumed(self, total_steps: int, max_time: float | None) -> None:
        """Continue under possibly changed limits: a length fitted to the same ``--max-time`` is kept (an exact
        resume); otherwise the schedule spans ``total_steps`` (``--epochs`` raised) and is fitted again."""
        if self.fitted_to is None or self.fitted_to != max_time:
            self.total_steps, self.fitted_to = total_steps, None

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

    def apply(self, optimizer: torch.optim.Optimizer, scale: float = 1.0) -> None:
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
        if data.get("best_valid_loss") is None:
            data["best_valid_loss"] = math.inf
        return cls(**data)

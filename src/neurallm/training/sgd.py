"""Plain SGD, ``p ← p − lr · (∇p + weight_decay · p)``: the PyTorch example's update, and NT-ASGD's before it
averages.

Why not ``torch.optim.SGD``: building any ``torch.optim`` optimizer imports ``torch._dynamo`` (its methods are
wrapped by ``torch._disable_dynamo``, which imports it on first call), and with it sympy: measured here, 73 MB of
resident memory and about 2 s per process, for an update that is one ``_foreach_add_``. That was most of the
peak-memory difference between ``neurallm train`` and the example, which updates its parameters by hand.

:class:`PlainSGD` has the part of the optimizer interface the trainer uses (``param_groups``, ``zero_grad``,
``step``, ``state_dict``/``load_state_dict``), and its state dict has ``torch.optim.SGD``'s layout, so
checkpoints written with either load into either.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class PlainSGD:
    """SGD without momentum over ``params`` (one parameter group).

    Args:
        params: the parameters to update.
        lr: learning rate (the schedule rewrites ``param_groups[0]["lr"]`` as it goes).
        weight_decay: L2 penalty added to each gradient.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float = 0.0) -> None:
        self.param_groups = [{"params": list(params), "lr": lr, "weight_decay": weight_decay}]
        self.state: dict = {}  # SGD without momentum keeps none

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if group["weight_decay"]:
                grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
            torch._foreach_add_(params, grads, alpha=-group["lr"])

    def state_dict(self) -> dict:
        groups, first = [], 0
        for group in self.param_groups:
            count = len(group["params"])
            groups.append({"lr": group["lr"], "weight_decay": group["weight_decay"], "momentum": 0,
                           "params": list(range(first, first + count))})
            first += count
        return {"state": {}, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        """Take the learning rate and weight decay of each group (a ``torch.optim.SGD`` state dict works too)."""
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups) or any(
                len(saved["params"]) != len(here["params"]) for saved, here in zip(groups, self.param_groups)):
            raise ValueError("the saved optimizer state is for a different set of parameters")
        if state_dict.get("state") or any(saved.get("momentum", 0) for saved in groups):
            raise ValueError("the saved optimizer state has momentum, which plain SGD does not use")
        for saved, here in zip(groups, self.param_groups):
            here["lr"], here["weight_decay"] = float(saved["lr"]), float(saved.get("weight_decay", 0.0))

"""One optimisation step, and the running loss that is read back from the device only when it is needed.

:func:`training_step` is the only place that runs forward, backward, clipping and the optimizer; the trainer
and every test that needs a training step call it. It never waits for the device: whether the loss and the
gradient were finite comes back as a boolean tensor. On the CPU reading it costs nothing, so a non-finite step
is skipped before the optimizer touches the weights. On an accelerator reading it would stall the pipeline
every step, so the step is applied regardless and :class:`LossTracker` reports the fault at its next
``flush`` (once per logging interval and before every checkpoint); the trainer then restores the last
checkpoint, which a faulty step can never have reached.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from neurallm.models.contract import LanguageModel, State
from neurallm.training.optim import Optimizer


def detach_state(state: State) -> State:
    """Cut the graph at the window edge (truncated BPTT) while keeping the state's values."""
    return tuple(t.detach() for t in state)


@dataclass(frozen=True)
class StepOutcome:
    """What one training step did.

    Attributes:
        nll: mean NLL of the window in nats (a detached 0-d tensor on the model's device).
        finite: 0-d bool tensor: the loss and the gradient norm were finite.
        state: the state after the window, detached from the graph.
    """

    nll: torch.Tensor
    finite: torch.Tensor
    state: State


def syncs_for_free(device: torch.device) -> bool:
    """Whether reading a tensor's value on ``device`` costs nothing (no queue of kernels to wait for)."""
    return device.type == "cpu"


def compile_for_training(model: LanguageModel, step_model: nn.Module | None = None) -> nn.Module:
    """``torch.compile`` of ``step_model`` (the model itself, or a wrapper of it such as DistributedDataParallel),
    after the model has moved out of the graph what the graph should take as an input (its ``prepare_for_compile``)."""
    model.prepare_for_compile()
    return torch.compile(model if step_model is None else step_model)


@dataclass
class StepModels:
    """What a training step calls: the model itself, or a wrapper standing in for it (DDP, ``torch.compile``).

    Attributes:
        usual: what the usual window (``full_window``) runs through.
        odd_window: what a window of another shape runs through under ``--compile`` (an epoch's shorter last
            window, a smaller last batch of shuffled windows), or None to run every window through ``usual``.
        full_window: the usual window's shape ``(bptt, local batch size)``.
    """

    usual: nn.Module
    odd_window: nn.Module | None
    full_window: tuple[int, int]

    def for_window(self, inputs: torch.Tensor) -> nn.Module:
        """The module to run the window ``inputs`` ``(T, B)`` through."""
        if self.odd_window is not None and tuple(inputs.shape) != self.full_window:
            return self.odd_window
        return self.usual


def wrap_for_training(model: LanguageModel, device: torch.device, *, distributed: bool, compile: bool,
                      variable_bptt: bool, full_window: tuple[int, int]) -> StepModels:
    """Wrap ``model`` for training steps: DistributedDataParallel under torchrun, then ``torch.compile`` under
    ``--compile``.

    Under --compile a window of another shape than the usual one runs uncompiled: compiling for it would stall
    the run for one step (27 s for the GPT-2-small shape on an H100). With --variable-bptt every length is usual:
    the compiled graph takes them all.
    """
    step_model: nn.Module = model
    if distributed:
        from torch.nn.parallel import DistributedDataParallel

        step_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    odd_window = None
    if compile:
        if not variable_bptt:
            odd_window = step_model
        step_model = compile_for_training(model, step_model)
    return StepModels(step_model, odd_window, full_window)


def training_step(
    model: nn.Module,
    optimizer: Optimizer,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    state: State,
    *,
    clip: float,
    skip_nonfinite: bool = True,
    amp_dtype: torch.dtype | None = None,
) -> StepOutcome:
    """Forward, backward, clip and update on one window ``(T, B)``.

    Args:
        model: a :class:`~neurallm.models.contract.LanguageModel`, or a wrapper of one (DistributedDataParallel,
            ``torch.compile``): only ``model(inputs, state, targets)`` is called.
        optimizer: updates the parameters it holds; their gradients are what is clipped.
        inputs, targets: ids ``(T, B)``; the targets are the inputs shifted by one token.
        state: the state to start the window from (detached or cold).
        clip: gradient-norm bound; 0 turns clipping off (an infinite bound scales by exactly 1) but not the check
            for a non-finite gradient.
        skip_nonfinite: leave the weights alone when the loss or gradient is not finite. This reads a value back
            from the device, so pass False on accelerators and act on :class:`LossTracker`'s report instead.
            Under DistributedDataParallel pass False too: the ranks must all take (or all skip) the update.
        amp_dtype: run the forward pass under autocast to this dtype (``torch.bfloat16``); the output head
            computes the loss in float32 either way, and backward runs outside autocast as PyTorch advises.
    """
    with torch.autocast(inputs.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        output = model(inputs, state, targets)
    optimizer.zero_grad(set_to_none=True)
    output.loss.backward()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = nn.utils.clip_grad_norm_(params, clip if clip > 0 else math.inf)
    nll = output.nll.detach()
    finite = torch.isfinite(nll) & torch.isfinite(grad_norm)
    if not skip_nonfinite or bool(finite):
        optimizer.step()
    return StepOutcome(nll, finite, detach_state(output.state))


@dataclass
class Flushed:
    """The tracker's totals as numbers.

    Attributes:
        loss_sum: sum of the finite steps' mean NLL since the tracker was reset.
        steps: finite steps counted in ``loss_sum``.
        faulty: non-finite steps since the previous flush.
    """

    loss_sum: float
    steps: int
    faulty: int


class LossTracker:
    """Sums per-step losses on the device; :meth:`flush` is the one point that reads them back."""

    def __init__(self, device: torch.device, loss_sum: float = 0.0, steps: int = 0) -> None:
        self.device = device
        self.reset(loss_sum, steps)

    def reset(self, loss_sum: float = 0.0, steps: int = 0) -> None:
        # float64 so that the sum is the one a Python float accumulation of the same losses gives (MPS has none)
        dtype = torch.float32 if self.device.type == "mps" else torch.float64
        self._sum = torch.tensor(loss_sum, dtype=dtype, device=self.device)
        self._steps = torch.tensor(steps, dtype=torch.int64, device=self.device)
        self._pending = 0  # steps added since the last flush
        self.last = Flushed(loss_sum, steps, 0)

    def add(self, outcome: StepOutcome) -> None:
        finite = outcome.finite
        self._sum += torch.where(finite, outcome.nll.to(self._sum.dtype), 0.0)
        self._steps += finite.long()
        self._pending += 1

    def flush(self) -> Flushed:
        """Read the totals back (one host synchronisation) and count the faulty steps since the last flush."""
        loss_sum, steps = float(self._sum), int(self._steps)
        faulty = self._pending - (steps - self.last.steps)
        self._pending = 0
        self.last = Flushed(loss_sum, steps, faulty)
        return self.last

    @property
    def pending(self) -> int:
        return self._pending

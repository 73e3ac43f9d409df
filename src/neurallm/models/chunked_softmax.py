"""Softmax cross-entropy of a linear output layer, computed a slice of positions at a time.

Why: with a word vocabulary the output layer is most of a CPU training step, and most of *that* is not the
matrix multiplies but passes over the ``(N, V)`` logits (N = bptt × batch positions, V = vocabulary): the
logits, the log-softmax, the gradient of the NLL, the gradient of the log-softmax are each a fresh ``N × V``
float32 buffer (39 MB for the PyTorch example's default LSTM on wt2-lite, V = 13.8k) written and read again
from main memory, and the peak memory holds several of them at once.

Here each slice of ``CHUNK`` positions is taken through logits → log-sum-exp → loss → softmax − one-hot → both
gradient products while its ``CHUNK × V`` logits are still in cache, and the buffer is reused in place. The
gradients with respect to the features, the weight and the bias are therefore computed in the forward pass
and kept until ``backward`` scales them by the incoming gradient. The arithmetic is float32, and the result is
the same as ``F.cross_entropy(F.linear(x, W, b), t)`` to float rounding (tests/models/test_head.py).
"""

from __future__ import annotations

import torch

CHUNK = 256  # positions per slice: 256 × 13.8k logits = 14 MB, reused for every slice


def _lse_and_target_logit(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.logsumexp(logits, dim=1), logits.gather(1, targets[:, None]).squeeze(1)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features, weight, bias, targets, mean: bool):  # noqa: D102 - see the module docstring
        n = features.size(0)
        wants_grad = ctx.needs_input_grad[:3]
        grad_features = torch.empty_like(features) if wants_grad[0] else None
        grad_weight = torch.zeros_like(weight) if wants_grad[1] else None
        grad_bias = torch.zeros_like(bias) if wants_grad[2] else None
        total = torch.zeros((), dtype=torch.float32, device=features.device)
        scale = 1.0 / n if mean else 1.0
        logits = None
        for start in range(0, n, CHUNK):
            x, t = features[start : start + CHUNK], targets[start : start + CHUNK]
            rows = x.size(0)
            # one buffer reused for every slice (the last, shorter slice writes into its first rows)
            logits = torch.empty(rows, weight.size(0), dtype=torch.float32, device=features.device) if logits is None else logits[:rows]
            torch.addmm(bias, x, weight.t(), out=logits)
            lse, target_logit = _lse_and_target_logit(logits, t)
            total += (lse - target_logit).sum()
            if not any(wants_grad):
                continue
            # d loss / d logits = softmax − one-hot, computed in place (the mean's 1/n is applied in backward,
            # to the much smaller gradients, instead of in another pass over the logits)
            logits.sub_(lse[:, None]).exp_()
            logits[torch.arange(rows, device=logits.device), t] -= 1.0
            if grad_features is not None:
                torch.mm(logits, weight, out=grad_features[start : start + rows])
            if grad_weight is not None:
                grad_weight.addmm_(logits.t(), x)
            if grad_bias is not None:
                grad_bias += logits.sum(0)
        ctx.save_for_backward(grad_features, grad_weight, grad_bias)
        ctx.scale = scale
        return total * scale

    @staticmethod
    def backward(ctx, grad_output):  # noqa: D102
        grads = ctx.saved_tensors
        # each saved gradient is used once, so it can be scaled in place
        factor = grad_output * ctx.scale
        return (*(g.mul_(factor) if g is not None else None for g in grads), None, None)


def linear_cross_entropy(
    features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, targets: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """NLL in nats of ``targets`` ``(N,)`` under ``softmax(features @ weight.T + bias)``; ``features`` ``(N, D)``.

    ``reduction`` is ``mean`` or ``sum``. Gradients flow to the features, the weight and the bias.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be mean or sum, got {reduction!r}")
    return _ChunkedLinearCrossEntropy.apply(features.float(), weight.float(), bias.float(), targets, reduction == "mean")

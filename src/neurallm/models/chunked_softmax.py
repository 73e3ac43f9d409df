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


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features, weight, bias, targets, mean: bool, grad_enabled: bool, matmul_dtype: torch.dtype):  # noqa: D102 - see the module docstring
        n = features.size(0)
        # needs_input_grad only says which inputs require grad; under no_grad (evaluation) none is wanted
        wants_grad = tuple(needed and grad_enabled for needed in ctx.needs_input_grad[:3])
        grad_features = torch.empty_like(features) if wants_grad[0] else None
        grad_weight = torch.zeros_like(weight) if wants_grad[1] else None
        grad_bias = torch.zeros_like(bias) if wants_grad[2] else None
        total = torch.zeros((), dtype=torch.float32, device=features.device)
        scale = 1.0 / n if mean else 1.0
        low_precision = matmul_dtype != torch.float32
        # bfloat16 products (float32 accumulation) run on the CPU's AMX/AVX-512 BF16 units at 2-3x the float32 speed
        weight_mm = weight.to(matmul_dtype)
        features_mm = features.to(matmul_dtype)
        logits = None
        for start in range(0, n, CHUNK):
            x, t = features_mm[start : start + CHUNK], targets[start : start + CHUNK]
            rows = x.size(0)
            # one buffer reused for every slice (the last, shorter slice writes into its first rows)
            logits = torch.empty(rows, weight.size(0), dtype=torch.float32, device=features.device) if logits is None else logits[:rows]
            if low_precision:
                torch.add(torch.mm(x, weight_mm.t()), bias, out=logits)
            else:
                torch.addmm(bias, x, weight_mm.t(), out=logits)
            target_logit = logits.gather(1, t[:, None]).squeeze(1)
            # log-sum-exp in place: exp(z - max) is kept, so the softmax below is one division, not a second exp
            row_max = logits.amax(dim=1, keepdim=True)
            logits.sub_(row_max).exp_()
            row_sum = logits.sum(dim=1, keepdim=True)
            total += (row_max + row_sum.log()).sum() - target_logit.sum()
            if not any(wants_grad):
                continue
            # d loss / d logits = softmax − one-hot (the mean's 1/n is applied in backward, to the much smaller
            # gradients, instead of in another pass over the logits)
            logits.div_(row_sum)
            logits[torch.arange(rows, device=logits.device), t] -= 1.0
            if grad_bias is not None:
                grad_bias += logits.sum(0)
            grad_logits = logits.to(matmul_dtype)
            if grad_features is not None:
                if low_precision:
                    grad_features[start : start + rows] = torch.mm(grad_logits, weight_mm)
                else:
                    torch.mm(grad_logits, weight_mm, out=grad_features[start : start + rows])
            if grad_weight is not None:
                if low_precision:
                    grad_weight += torch.mm(grad_logits.t(), x)
                else:
                    grad_weight.addmm_(grad_logits.t(), x)
        ctx.save_for_backward(grad_features, grad_weight, grad_bias)
        ctx.scale = scale
        return total * scale

    @staticmethod
    def backward(ctx, grad_output):  # noqa: D102
        grads = ctx.saved_tensors
        # each saved gradient is used once, so it can be scaled in place
        factor = grad_output * ctx.scale
        return (*(g.mul_(factor) if g is not None else None for g in grads), None, None, None, None)


def linear_cross_entropy(
    features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, targets: torch.Tensor, reduction: str = "mean",
    matmul_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """NLL in nats of ``targets`` ``(N,)`` under ``softmax(features @ weight.T + bias)``; ``features`` ``(N, D)``.

    ``reduction`` is ``mean`` or ``sum``. Gradients flow to the features, the weight and the bias.
    ``matmul_dtype`` ``torch.bfloat16`` runs the three matrix products in bfloat16 (as autocast would); the
    softmax, the loss and the gradients' accumulation stay float32.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be mean or sum, got {reduction!r}")
    return _ChunkedLinearCrossEntropy.apply(features.float(), weight.float(), bias.float(), targets, reduction == "mean",
                                            torch.is_grad_enabled(), matmul_dtype)

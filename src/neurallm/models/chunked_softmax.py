"""Softmax cross-entropy of a linear output layer, computed a slice of positions at a time.

Why: with a word vocabulary the output layer is most of a CPU training step, and most of *that* is not the
matrix multiplies but passes over the ``(N, V)`` logits (N = bptt × batch positions, V = vocabulary): the
logits, the log-softmax, the gradient of the NLL, the gradient of the log-softmax are each a fresh ``N × V``
float32 buffer (39 MB for the PyTorch example's default LSTM on wt2-lite, V = 13.8k) written and read again
from main memory, and the peak memory holds several of them at once.

Here each slice of ``CHUNK`` positions is taken through logits → log-softmax → loss → softmax − one-hot → both
gradient products in one ``CHUNK × V`` buffer that is reused in place, with as few passes over it as PyTorch's
kernels allow (measured in benchmarks/output_layer_floor.py):

* the bias rides in the matrix product, as one more column of the weight against a column of ones in the
  features: ``addmm`` would first copy the broadcast bias into the buffer, a whole pass of its own;
* the log-softmax is PyTorch's fused kernel, written over its own input (it reads a row before writing it):
  one pass where max, subtract, exp and sum were four;
* the loss's ``1/N`` is the products' ``alpha``, so ``backward`` multiplies nothing when the incoming gradient
  is 1 (the usual case).

The gradients with respect to the features, the weight and the bias are therefore computed in the forward pass
and kept until ``backward``. The arithmetic is float32, and the result is the same as
``F.cross_entropy(F.linear(x, W, b), t)`` to float rounding (tests/models/test_head.py).
"""

from __future__ import annotations

import torch

# positions per slice: 256 × 13.8k logits = 14 MB, reused for every slice. Evaluation uses the same size although
# bigger slices read the weight fewer times (46 µs per position at 512 against 58 at 256, V = 13.8k): a bigger
# buffer than training's does not fit in the memory training freed: 512 raised the peak RSS after validation
# from 415 to 438 MB (neurallm train on wt2-lite).
CHUNK = 256


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features, weight, bias, targets, mean: bool, grad_enabled: bool, matmul_dtype: torch.dtype,  # noqa: D102 - see the module docstring
                low_precision_weight: torch.Tensor | None):
        n, device = features.size(0), features.device
        # needs_input_grad only says which inputs require grad; under no_grad (evaluation) none is wanted
        wants_grad = tuple(needed and grad_enabled for needed in ctx.needs_input_grad[:3])
        grad_features = torch.empty_like(features) if wants_grad[0] else None
        grad_weight = torch.empty_like(weight) if wants_grad[1] else None
        grad_bias = torch.zeros_like(bias) if wants_grad[2] else None
        total = torch.zeros((), dtype=torch.float32, device=device)
        scale = 1.0 / n if mean else 1.0
        low_precision = matmul_dtype != torch.float32
        if low_precision:
            # bfloat16 products (float32 accumulation) run on the CPU's AMX/AVX-512 BF16 units at 2-3x the float32
            # speed; the bias is added in float32 (in bfloat16 it would lose all but 3 digits)
            weight_mm = weight.to(matmul_dtype) if low_precision_weight is None else low_precision_weight
            features_mm = features.to(matmul_dtype)
        else:
            weight_mm = torch.cat((weight, bias[:, None]), dim=1)  # (V, D + 1)
            features_mm = torch.cat((features, features.new_ones(n, 1)), dim=1)  # (N, D + 1)
        buffer = grad_buffer = None
        for start in range(0, n, CHUNK):
            x, t = features_mm[start : start + CHUNK], targets[start : start + CHUNK]
            rows = x.size(0)
            # one buffer reused for every slice (the last, shorter slice writes into its first rows)
            buffer = torch.empty(rows, weight.size(0), dtype=torch.float32, device=device) if buffer is None else buffer[:rows]
            if low_precision:
                torch.add(torch.mm(x, weight_mm.t()), bias, out=buffer)
            else:
                torch.mm(x, weight_mm.t(), out=buffer)
            torch.log_softmax(buffer, dim=1, out=buffer)
            total -= buffer.gather(1, t[:, None]).sum()
            if not any(wants_grad):
                continue
            # d loss / d logits = softmax − one-hot, times the reduction's scale (applied in the products)
            if low_precision:
                # exp reads the float32 log-probabilities and writes them rounded to bfloat16 in the same pass: the
                # products' operand, without a separate conversion pass over the (rows, V) buffer
                if grad_buffer is None:
                    grad_buffer = torch.empty(rows, weight.size(0), dtype=matmul_dtype, device=device)
                grad_logits = torch.exp(buffer, out=grad_buffer[:rows])
            else:
                grad_logits = buffer.exp_()
            grad_logits[torch.arange(rows, device=device), t] -= 1.0
            if grad_bias is not None:
                grad_bias.add_(grad_logits.sum(0, dtype=torch.float32), alpha=scale)
            if grad_features is not None:
                into = grad_features[start : start + rows]
                if low_precision:
                    torch.mul(torch.mm(grad_logits, weight_mm), scale, out=into)
                else:
                    torch.addmm(into, grad_logits, weight, beta=0, alpha=scale, out=into)
            if grad_weight is not None:
                # the first slice writes the gradient over the empty buffer's contents, the others add to it
                without_ones = features_mm[start : start + rows, : weight.size(1)]  # the bias column's ones dropped
                if not low_precision:
                    grad_weight.addmm_(grad_logits.t(), without_ones, beta=0.0 if start == 0 else 1.0, alpha=scale)
                elif start == 0:
                    torch.mul(torch.mm(grad_logits.t(), without_ones), scale, out=grad_weight)
                else:
                    grad_weight.add_(torch.mm(grad_logits.t(), without_ones), alpha=scale)
        ctx.save_for_backward(grad_features, grad_weight, grad_bias)
        return total * scale

    @staticmethod
    def backward(ctx, grad_output):  # noqa: D102
        grads = ctx.saved_tensors
        # the incoming gradient is almost always exactly 1 (the loss is what backward starts from): then the
        # saved gradients are the answer as they are; otherwise each is used once, so it is scaled in place.
        # This head runs on the CPU only, where reading the value costs nothing.
        if grad_output.item() != 1.0:
            grads = tuple(g.mul_(grad_output) if g is not None else None for g in grads)
        return (*grads, None, None, None, None, None)


def linear_cross_entropy(
    features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, targets: torch.Tensor, reduction: str = "mean",
    matmul_dtype: torch.dtype = torch.float32, low_precision_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """NLL in nats of ``targets`` ``(N,)`` under ``softmax(features @ weight.T + bias)``; ``features`` ``(N, D)``.

    ``reduction`` is ``mean`` or ``sum``. Gradients flow to the features, the weight and the bias.
    ``matmul_dtype`` ``torch.bfloat16`` runs the three matrix products in bfloat16 (as autocast would); the
    softmax, the loss and the gradients' accumulation stay float32. ``low_precision_weight`` is ``weight`` already
    cast to ``matmul_dtype`` (a copy the caller keeps while the weight does not change), else it is cast here.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be mean or sum, got {reduction!r}")
    return _ChunkedLinearCrossEntropy.apply(features.float(), weight.float(), bias.float(), targets, reduction == "mean",
                                            torch.is_grad_enabled(), matmul_dtype, low_precision_weight)

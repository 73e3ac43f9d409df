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

With bfloat16 products (``--amp bf16``, see docs/guides/speed.md) the slices take a shorter route: the bias rides
in the product as two bfloat16 columns, PyTorch's softmax reads the bfloat16 logits once and writes bfloat16
probabilities (computed in float32 inside the kernel), the loss is ``-log p(target)`` summed in float32, and those
probabilities minus the one-hot feed both gradient products (the bias gradient is the weight product's extra
column): two passes over each slice where the float32 route makes four.
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
    def forward(ctx, features, weight, bias, targets, mean: bool, grad_enabled: bool,  # noqa: D102 - see the module docstring
                low_precision_weight: torch.Tensor | None):
        n, device = features.size(0), features.device
        # needs_input_grad only says which inputs require grad; under no_grad (evaluation) none is wanted
        wants_grad = tuple(needed and grad_enabled for needed in ctx.needs_input_grad[:3])
        grad_features = torch.empty_like(features) if wants_grad[0] else None
        grad_weight = torch.empty_like(weight) if wants_grad[1] else None
        grad_bias = torch.zeros_like(bias) if wants_grad[2] else None
        scale = 1.0 / n if mean else 1.0
        if low_precision_weight is not None:
            total = _low_precision_slices(features, weight, bias, targets, low_precision_weight, scale,
                                          grad_features, grad_weight, grad_bias)
            ctx.save_for_backward(grad_features, grad_weight, grad_bias)
            return total * scale
        total = torch.zeros((), dtype=torch.float32, device=device)
        weight_mm = torch.cat((weight, bias[:, None]), dim=1)  # (V, D + 1)
        features_mm = torch.cat((features, features.new_ones(n, 1)), dim=1)  # (N, D + 1)
        buffer = None
        for start in range(0, n, CHUNK):
            x, t = features_mm[start : start + CHUNK], targets[start : start + CHUNK]
            rows = x.size(0)
            # one buffer reused for every slice (the last, shorter slice writes into its first rows)
            buffer = torch.empty(rows, weight.size(0), dtype=torch.float32, device=device) if buffer is None else buffer[:rows]
            torch.mm(x, weight_mm.t(), out=buffer)
            torch.log_softmax(buffer, dim=1, out=buffer)
            total -= buffer.gather(1, t[:, None]).sum()
            if not any(wants_grad):
                continue
            # d loss / d logits = softmax − one-hot, times the reduction's scale (applied in the products)
            buffer.exp_()
            buffer[torch.arange(rows, device=device), t] -= 1.0
            if grad_bias is not None:
                grad_bias.add_(buffer.sum(0), alpha=scale)
            grad_logits = buffer
            if grad_features is not None:
                into = grad_features[start : start + rows]
                torch.addmm(into, grad_logits, weight, beta=0, alpha=scale, out=into)
            if grad_weight is not None:
                # the first slice writes the gradient over the empty buffer's contents, the others add to it
                without_ones = features_mm[start : start + rows, : weight.size(1)]  # the bias column's ones dropped
                grad_weight.addmm_(grad_logits.t(), without_ones, beta=0.0 if start == 0 else 1.0, alpha=scale)
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
        return (*grads, None, None, None, None)


# a target probability below this (e^-69) is scored from float32 logits: bfloat16 keeps the exponent range of float32
# but loses precision among its subnormals, and at about 1e-40 rounds to zero (an infinite loss)
_TINY_PROBABILITY = 1e-30


def bf16_weight_with_bias(weight: torch.Tensor, bias: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``(V, D + 2)``: the weight in ``dtype`` and the bias as two more columns, its high and low halves.

    The bias rides in the product against two columns of ones (no pass of its own over the logits); split in two it
    keeps 16 bits of mantissa where one bfloat16 column would keep 8 (a bias of -9.3 would be off by 0.02).
    """
    with torch.no_grad():
        high = bias.to(dtype)
        low = (bias - high.float()).to(dtype)
        return torch.cat((weight.to(dtype), high[:, None], low[:, None]), dim=1)


def _low_precision_slices(features, weight, bias, targets, weight_mm, scale, grad_features, grad_weight, grad_bias):
    """The slices of :class:`_ChunkedLinearCrossEntropy` with bfloat16 products; returns the summed NLL (float32).

    Per slice: the logits (bias included) come out of the product in bfloat16, the softmax reads them once and writes
    the probabilities in bfloat16 (computed in float32 inside the kernel), the loss is ``-log p(target)`` in float32,
    and the probabilities minus the one-hot are the operand of both gradient products. That is two passes over the
    ``(rows, V)`` slice where the float32 path needs four, and the bias gradient is the product's extra column.
    """
    n, dim, device, dtype = features.size(0), weight.size(1), features.device, weight_mm.dtype
    features_mm = torch.cat((features.to(dtype), features.new_ones(n, 2, dtype=dtype)), dim=1)  # (N, D + 2)
    total = torch.zeros((), dtype=torch.float32, device=device)
    logits = probs = None
    for start in range(0, n, CHUNK):
        x, t = features_mm[start : start + CHUNK], targets[start : start + CHUNK]
        rows = x.size(0)
        if logits is None:
            logits = torch.empty(rows, weight.size(0), dtype=dtype, device=device)
            probs = torch.empty_like(logits)
        torch.mm(x, weight_mm.t(), out=logits[:rows])
        p = torch.ops.aten._softmax.out(logits[:rows], 1, False, out=probs[:rows])
        target_p = p.gather(1, t[:, None])[:, 0].float()
        log_p = target_p.log()
        tiny = torch.nonzero(target_p < _TINY_PROBABILITY)[:, 0]
        if tiny.numel():  # rare: score those rows from float32 logits instead (reading the count is free on a CPU)
            rows_logits = torch.addmm(bias, features[start + tiny], weight.t())
            log_p[tiny] = rows_logits.log_softmax(1).gather(1, t[tiny, None])[:, 0]
        total -= log_p.sum()
        if grad_features is None and grad_weight is None and grad_bias is None:
            continue
        p[torch.arange(rows, device=device), t] -= 1.0  # d loss / d logits = softmax − one-hot (times scale)
        if grad_features is not None:
            torch.mul(torch.mm(p, weight_mm)[:, :dim], scale, out=grad_features[start : start + rows])
        if grad_weight is not None or grad_bias is not None:
            part = torch.mm(p.t(), x)  # (V, D + 2): the weight's gradient, then the bias's twice (its ones columns)
            if grad_weight is not None:
                if start == 0:  # the first slice writes over the empty buffer, the others add to it
                    torch.mul(part[:, :dim], scale, out=grad_weight)
                else:
                    grad_weight.add_(part[:, :dim], alpha=scale)
            if grad_bias is not None:
                grad_bias.add_(part[:, dim], alpha=scale)
    return total



def linear_cross_entropy(
    features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, targets: torch.Tensor, reduction: str = "mean",
    matmul_dtype: torch.dtype = torch.float32, low_precision_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """NLL in nats of ``targets`` ``(N,)`` under ``softmax(features @ weight.T + bias)``; ``features`` ``(N, D)``.

    ``reduction`` is ``mean`` or ``sum``. Gradients flow to the features, the weight and the bias.
    ``matmul_dtype`` ``torch.bfloat16`` runs the three matrix products in bfloat16 (as autocast would) with
    float32 accumulation; the loss is summed in float32 from probabilities computed in float32 and stored in
    bfloat16, the gradients are accumulated in float32. ``low_precision_weight`` is
    :func:`bf16_weight_with_bias` of the weight and bias, when the caller keeps one (else it is made here).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be mean or sum, got {reduction!r}")
    if matmul_dtype != torch.float32 and low_precision_weight is None:
        low_precision_weight = bf16_weight_with_bias(weight.float(), bias.float(), matmul_dtype)
    return _ChunkedLinearCrossEntropy.apply(features.float(), weight.float(), bias.float(), targets, reduction == "mean",
                                            torch.is_grad_enabled(), low_precision_weight)

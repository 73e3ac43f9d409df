"""The output layer: the chunked softmax cross-entropy equals the plain one, value and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from neurallm.models import chunked_softmax
from neurallm.models.chunked_softmax import linear_cross_entropy
from neurallm.models.head import SoftmaxHead


def _inputs(n: int, d: int = 12, v: int = 50, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(n, d, generator=g, requires_grad=True)
    weight = torch.randn(v, d, generator=g, requires_grad=True)
    bias = torch.randn(v, generator=g, requires_grad=True)
    targets = torch.randint(0, v, (n,), generator=g)
    return features, weight, bias, targets


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("n", [1, 7, 16, 37])  # under, at and over several slices of 8
def test_chunked_cross_entropy_equals_the_plain_one_in_value_and_gradients(n, reduction, monkeypatch):
    monkeypatch.setattr(chunked_softmax, "CHUNK", 8)
    features, weight, bias, targets = _inputs(n)
    upstream = 0.7  # backward scales by the incoming gradient, as when the loss is part of a larger sum
    chunked = linear_cross_entropy(features, weight, bias, targets, reduction)
    grads = torch.autograd.grad(chunked * upstream, (features, weight, bias))
    plain = F.cross_entropy(F.linear(features, weight, bias), targets, reduction=reduction)
    expected = torch.autograd.grad(plain * upstream, (features, weight, bias))
    assert chunked.item() == pytest.approx(plain.item(), rel=1e-5)
    for got, want in zip(grads, expected):
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)


def test_bfloat16_products_give_the_float32_loss_and_gradients_to_bfloat16_precision(monkeypatch):
    """``--amp bf16`` on a CPU: the three matrix products in bfloat16, softmax and accumulation in float32."""
    monkeypatch.setattr(chunked_softmax, "CHUNK", 8)
    features, weight, bias, targets = _inputs(37, d=32, v=300)
    low = linear_cross_entropy(features, weight, bias, targets, "mean", torch.bfloat16)
    low_grads = torch.autograd.grad(low, (features, weight, bias))
    full = linear_cross_entropy(features, weight, bias, targets, "mean")
    full_grads = torch.autograd.grad(full, (features, weight, bias))
    assert low.item() == pytest.approx(full.item(), rel=2e-2)
    for got, want in zip(low_grads, full_grads):
        assert got.dtype == torch.float32
        assert (got - want).norm() <= 0.05 * want.norm()


def test_without_gradients_only_the_value_is_computed(monkeypatch):
    """Under no_grad (evaluation) each slice costs one matrix multiply, the logits; none for gradients, although
    the weight and bias still require grad."""
    monkeypatch.setattr(chunked_softmax, "CHUNK", 8)
    features, weight, bias, targets = _inputs(20)
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiled:
        value = linear_cross_entropy(features, weight, bias, targets, "sum")
    calls = {event.key: event.count for event in profiled.key_averages()}
    assert calls.get("aten::mm") == 3  # slices of 8, 8 and 4 positions
    assert "aten::addmm" not in calls and "aten::addmm_" not in calls
    assert value.grad_fn is None
    assert value.item() == pytest.approx(F.cross_entropy(features @ weight.T + bias, targets, reduction="sum").item(), rel=1e-5)


@pytest.mark.parametrize("matmul_dtype", [torch.float32, torch.bfloat16])
def test_a_target_far_below_the_best_logit_costs_its_true_loss_not_infinity(matmul_dtype):
    """A probability that underflows float32 (here e^-200) must still give its loss, 200 nats, not inf (bfloat16
    probabilities: the target's row is scored again from float32 logits)."""
    features = torch.tensor([[1.0]], requires_grad=True)
    weight = torch.tensor([[100.0], [-100.0]], requires_grad=True)
    bias = torch.zeros(2, requires_grad=True)
    loss = linear_cross_entropy(features, weight, bias, torch.tensor([1]), matmul_dtype=matmul_dtype)
    assert loss.item() == pytest.approx(200.0, rel=1e-6)
    loss.backward()
    assert torch.isfinite(features.grad).all() and features.grad.item() == pytest.approx(200.0, rel=1e-6)  # p·W − W[target]


def test_a_tied_weight_gets_the_gradient_of_both_its_uses():
    torch.manual_seed(0)
    embedding = torch.nn.Embedding(30, 8)
    head = SoftmaxHead(8, 30, tied_weight=embedding.weight)
    ids = torch.randint(0, 30, (5, 3))
    head.loss(embedding(ids), ids.roll(1, 0)).backward()
    chunked_grad = embedding.weight.grad.clone()
    embedding.weight.grad = None
    F.cross_entropy(head.logits(embedding(ids)).reshape(-1, 30), ids.roll(1, 0).reshape(-1)).backward()
    assert torch.allclose(chunked_grad, embedding.weight.grad, atol=1e-6)


def test_an_unknown_reduction_is_refused():
    features, weight, bias, targets = _inputs(4)
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(features, weight, bias, targets, "max")

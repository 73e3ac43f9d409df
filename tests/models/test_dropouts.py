"""Dropout with nn.Dropout's behaviour, its CPU mask drawn in vectorised blocks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from neurallm.models.dropouts import Dropout


def test_in_training_a_share_p_is_zeroed_and_the_rest_scaled_to_keep_the_mean():
    torch.manual_seed(0)
    x = torch.ones(200_000)
    y = Dropout(0.2).train()(x)
    kept = y != 0
    assert kept.float().mean().item() == pytest.approx(0.8, abs=0.005)
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / 0.8))
    assert y.mean().item() == pytest.approx(1.0, abs=0.01)


def test_in_eval_mode_and_at_p_0_it_is_the_identity():
    x = torch.randn(5, 3)
    assert Dropout(0.5).eval()(x) is x
    assert Dropout(0.0).train()(x) is x


def test_p_1_drops_everything_and_p_outside_0_1_is_refused():
    assert Dropout(1.0).train()(torch.ones(4)).eq(0).all()
    with pytest.raises(ValueError, match="between 0 and 1"):
        Dropout(1.5)


def test_the_gradient_flows_through_the_kept_units_only_with_their_scale():
    torch.manual_seed(1)
    x = torch.randn(1000, requires_grad=True)
    y = Dropout(0.3).train()(x)
    y.sum().backward()
    kept = y.detach() != 0
    assert torch.allclose(x.grad[kept], torch.full_like(x.grad[kept], 1 / 0.7))
    assert x.grad[~kept].eq(0).all()


def test_the_same_seed_draws_the_same_mask():
    x = torch.randn(50, 20)
    torch.manual_seed(3)
    first = Dropout(0.5).train()(x)
    torch.manual_seed(3)
    assert torch.equal(first, Dropout(0.5).train()(x))


def test_the_cpu_mask_does_not_use_bernoulli_which_draws_one_number_at_a_time():
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiled:
        Dropout(0.2).train()(torch.randn(35, 20, 200))
    names = {event.key for event in profiled.key_averages()}
    assert "aten::bernoulli_" not in names and "aten::uniform_" in names
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as reference:
        nn.Dropout(0.2).train()(torch.randn(35, 20, 200))
    assert "aten::bernoulli_" in {event.key for event in reference.key_averages()}  # what it replaces

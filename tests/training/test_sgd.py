"""PlainSGD: torch.optim.SGD's update and state-dict layout, without importing torch._dynamo."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from neurallm.training.sgd import PlainSGD


def _model_and_grads(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    model(torch.randn(5, 4)).pow(2).sum().backward()
    return model


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_the_update_is_torch_sgds(weight_decay):
    ours, theirs = _model_and_grads(), _model_and_grads()
    PlainSGD(ours.parameters(), lr=0.5, weight_decay=weight_decay).step()
    torch.optim.SGD(theirs.parameters(), lr=0.5, weight_decay=weight_decay).step()
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b)


def test_a_parameter_without_a_gradient_is_left_alone():
    model = _model_and_grads()
    model[0].weight.grad = None
    before = model[0].weight.clone()
    PlainSGD(model.parameters(), lr=0.5).step()
    assert torch.equal(model[0].weight, before)


def test_state_dicts_load_both_ways_with_torch_sgd():
    model = _model_and_grads()
    theirs = torch.optim.SGD(model.parameters(), lr=0.25, weight_decay=0.01)
    ours = PlainSGD(model.parameters(), lr=1.0)
    ours.load_state_dict(theirs.state_dict())
    assert (ours.param_groups[0]["lr"], ours.param_groups[0]["weight_decay"]) == (0.25, 0.01)
    back = torch.optim.SGD(model.parameters(), lr=1.0)
    back.load_state_dict(ours.state_dict())
    assert (back.param_groups[0]["lr"], back.param_groups[0]["weight_decay"]) == (0.25, 0.01)


def test_a_state_dict_of_other_parameters_or_with_momentum_is_refused():
    model = _model_and_grads()
    ours = PlainSGD(model.parameters(), lr=1.0)
    with pytest.raises(ValueError, match="different set of parameters"):
        ours.load_state_dict(PlainSGD(list(model.parameters())[:2], lr=1.0).state_dict())
    with pytest.raises(ValueError, match="momentum"):
        ours.load_state_dict(torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9).state_dict())


@pytest.mark.integration
def test_training_an_lstm_with_sgd_does_not_import_torch_dynamo():
    """torch._dynamo (and sympy) cost ~73 MB and ~2 s; only --compile, AdamW and a Transformer with memory need it."""
    code = """
import sys, torch
from neurallm.config import ModelConfig, TrainConfig
from neurallm.models import build_model
from neurallm.training.optim import build_optimizer
from neurallm.training.step import training_step
import neurallm.training.loop
for model_name in ("LSTM", "AWD_LSTM", "Transformer"):
    model = build_model(ModelConfig(model=model_name, vocab_size=50, emsize=16, nhid=16, nlayers=1))
    for optimizer in ("sgd", "ntasgd"):
        ids = torch.randint(0, 50, (6, 2))
        training_step(model, build_optimizer(model, TrainConfig(optimizer=optimizer)), ids, ids, model.init_state(2), clip=0.25)
print("torch._dynamo" in sys.modules, "sympy" in sys.modules)
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.split() == ["False", "False"]

"""Dynamic evaluation: scores each window before learning from it, adapts to the text, restores the weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neurallm.config import ModelConfig
from neurallm.errors import ConfigError
from neurallm.evaluation import evaluate
from neurallm.evaluation_methods.dynamic_eval import DynamicSettings, evaluate_dynamic
from neurallm.models import build_model


@pytest.fixture
def model():
    torch.manual_seed(0)
    return build_model(ModelConfig(model="LSTM", vocab_size=30, emsize=16, nhid=32, nlayers=1, dropout=0.0))


@pytest.fixture
def repeated_text() -> np.ndarray:
    passage = np.random.default_rng(0).integers(0, 30, 40)
    return np.tile(passage, 5).astype(np.int64)


def test_adapting_to_a_repetitive_text_lowers_its_loss(model, repeated_text):
    static = evaluate(model, repeated_text, batch_size=1, bptt=10)
    dynamic = evaluate_dynamic(model, repeated_text, DynamicSettings(lr=1.0, window=10))
    assert dynamic.tokens == static.tokens == len(repeated_text) - 1
    assert dynamic.loss < static.loss - 0.1  # measured: 3.25 against 3.40


def test_a_single_window_is_scored_before_any_update(model, repeated_text):
    static = evaluate(model, repeated_text, batch_size=1, bptt=10)
    one_window = evaluate_dynamic(model, repeated_text, DynamicSettings(lr=1.0, window=len(repeated_text)))
    assert one_window.loss == pytest.approx(static.loss, rel=1e-5)


def test_the_trained_weights_are_restored(model, repeated_text):
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    evaluate_dynamic(model, repeated_text, DynamicSettings(lr=1.0, decay=0.1, window=10))
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name


def test_a_model_without_state_is_refused():
    transformer = build_model(ModelConfig(model="Transformer", vocab_size=30, emsize=16, nhid=16, nhead=2))
    with pytest.raises(ConfigError, match="--dynamic"):
        evaluate_dynamic(transformer, np.arange(20), DynamicSettings())


@pytest.mark.parametrize("settings,flag", [(dict(lr=0.0), "--dynamic-lr"), (dict(decay=2.0), "--dynamic-decay")])
def test_bad_settings_name_the_flag(settings, flag):
    with pytest.raises(ConfigError, match=flag):
        DynamicSettings(**settings)


def test_a_learning_rate_that_diverges_is_refused_with_the_flag_and_the_weights_restored(model, repeated_text):
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ConfigError, match="diverged with --dynamic-lr 1e\\+38.*lower --dynamic-lr"):
        evaluate_dynamic(model, repeated_text, DynamicSettings(lr=1e38, window=10))
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name

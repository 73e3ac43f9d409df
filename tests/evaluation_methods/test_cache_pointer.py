"""The cache pointer: it points at what followed similar states, adds nothing with λ = 0, and is batch-size
invariant because each column's cache fills during its burn-in."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from neurallm.config import ModelConfig
from neurallm.errors import ConfigError
from neurallm.evaluation import evaluate
from neurallm.evaluation_methods.cache_pointer import CachePointerScorer, CachePointerSettings, evaluate_cache_pointer
from neurallm.models import SoftmaxHead, build_model


@pytest.fixture
def model():
    torch.manual_seed(0)
    return build_model(ModelConfig(model="LSTM", vocab_size=50, emsize=16, nhid=32, nlayers=1, dropout=0.0))


@pytest.fixture
def repeated_text() -> np.ndarray:
    """A random passage of 60 tokens, then the same passage again: a cache's best case (an untrained LSTM's
    small features need a large θ to tell states apart)."""
    passage = np.random.default_rng(0).integers(0, 50, 60)
    return np.concatenate([passage, passage]).astype(np.int64)


def test_it_points_at_the_word_that_followed_the_matching_state_across_windows():
    """Features that are the one-hot current word: on a repeated passage of distinct words the state at the second
    occurrence matches the first occurrence, whose next word is the right one."""
    V = 20
    passage = torch.randperm(V)
    text = torch.cat([passage, passage, passage[:1]])  # inputs are text[:-1], targets text[1:]
    inputs, targets = text[:-1], text[1:]
    head = SoftmaxHead(V, V)
    torch.nn.init.zeros_(head.weight)  # the model alone: uniform, log V per token
    scorer = CachePointerScorer(head, CachePointerSettings(size=V, theta=50.0, lambda_=0.5))
    features = torch.nn.functional.one_hot(inputs, V).float()[:, None, :]  # (2V, 1, V)
    with torch.no_grad():
        first = scorer(features[:V], targets[:V, None], np.ones((V, 1), dtype=bool))
        second = scorer(features[V:], targets[V:, None], np.ones((V, 1), dtype=bool))  # a new window: the cache carries over
    assert float(second) / V == pytest.approx(-math.log(0.5 + 0.5 / V), abs=1e-3)  # pointer right every time
    assert float(first) / V > math.log(V) - 0.1  # nothing seen before: the pointer cannot help yet


def test_lambda_zero_is_the_model_alone(model, repeated_text):
    plain = evaluate(model, repeated_text, batch_size=1, bptt=16)
    pointer = evaluate_cache_pointer(model, repeated_text, CachePointerSettings(100, theta=1.0, lambda_=0.0), batch_size=1, bptt=16)
    assert pointer.loss == pytest.approx(plain.loss, rel=1e-6)


@pytest.mark.parametrize("batch_size", [2, 3, 7])
def test_the_result_does_not_depend_on_the_batch_size(model, repeated_text, batch_size):
    settings = CachePointerSettings(30, theta=1.0, lambda_=0.3)
    # context longer than the text: every column sees the whole history, as batch size 1 does
    one = evaluate_cache_pointer(model, repeated_text, settings, batch_size=1, bptt=16, context=200)
    many = evaluate_cache_pointer(model, repeated_text, settings, batch_size=batch_size, bptt=16, context=200)
    assert many.tokens == one.tokens
    assert many.loss == pytest.approx(one.loss, rel=1e-5)


def test_the_burn_in_is_at_least_the_cache(model, repeated_text):
    result = evaluate_cache_pointer(model, repeated_text, CachePointerSettings(80), batch_size=2, bptt=16, context=10)
    assert result.context == 80


@pytest.mark.parametrize("settings,flag", [(dict(size=0), "--cache-pointer"), (dict(size=5, theta=-1.0), "--theta"),
                                          (dict(size=5, lambda_=1.0), "--lambda")])
def test_bad_settings_name_the_flag(settings, flag):
    with pytest.raises(ConfigError, match=flag):
        CachePointerSettings(**settings)

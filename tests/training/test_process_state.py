"""The library leaves a program's process-wide state alone: training seeds its own streams and gives the caller's
global random generators back as they were."""

from __future__ import annotations

import random

import numpy as np
import torch

import neurallm

from conftest import TINY_MODEL, write_patterned_corpus


def draws() -> tuple:
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_train_leaves_the_callers_global_random_generators_as_they_were(tmp_path):
    corpus = write_patterned_corpus(tmp_path / "corpus", lines=60)
    for seed_caller in (random.seed, np.random.seed, torch.manual_seed):
        seed_caller(2024)
    expected = draws()
    for seed_caller in (random.seed, np.random.seed, torch.manual_seed):
        seed_caller(2024)
    neurallm.train(corpus, tmp_path / "run", progress=False, **{**TINY_MODEL, "dropout": 0.3})
    assert draws() == expected
    neurallm.train(None, tmp_path / "run", resume=True, epochs=2)
    # the run's own seed did not leak either: the next draws are the caller's next ones
    for seed_caller in (random.seed, np.random.seed, torch.manual_seed):
        seed_caller(2024)
    draws()
    following = draws()
    for seed_caller in (random.seed, np.random.seed, torch.manual_seed):
        seed_caller(2024)
    draws()
    neurallm.train(None, tmp_path / "run", resume=True, epochs=3)
    assert draws() == following

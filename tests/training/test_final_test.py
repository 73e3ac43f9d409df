"""The test split at the end of training is scored with the best weights (model.safetensors), which are read back
from the file only when the model no longer holds them (reading holds a second copy: the run's memory peak)."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file

import neurallm
from neurallm.evaluation import EvalResult
from neurallm.training import checkpoint as ckpt
from neurallm.training.loop import Trainer

from conftest import TINY_MODEL, write_patterned_corpus

SETTINGS = {**TINY_MODEL, "eval_context": 8, "epochs": 2}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_patterned_corpus(tmp_path_factory.mktemp("final") / "corpus", lines=60)


def spy_on_the_test(monkeypatch, valid_losses: list[float]) -> dict:
    """Validation reports ``valid_losses`` in turn; records the model's weights when the test split is scored and
    how often a weights file was read."""
    seen: dict = {"reads": 0}
    original_evaluate, original_read = Trainer.evaluate_split, ckpt.read_safetensors
    losses = iter(valid_losses)

    def evaluate_split(self, split):
        if split == "valid":
            return EvalResult(next(losses), 10, 0.0, "exact", 1, 0)
        seen["weights"] = {name: t.clone() for name, t in self.model.state_dict().items()}
        return original_evaluate(self, split)

    def read_safetensors(path):
        seen["reads"] += 1
        return original_read(path)

    monkeypatch.setattr(Trainer, "evaluate_split", evaluate_split)
    monkeypatch.setattr(ckpt, "read_safetensors", read_safetensors)
    return seen


def assert_weights_equal(weights: dict, saved: dict) -> None:
    for name, tensor in saved.items():
        assert (weights[name] == tensor).all(), name


def test_when_the_last_epoch_is_the_best_its_weights_are_scored_without_reading_the_file(corpus, tmp_path, monkeypatch):
    seen = spy_on_the_test(monkeypatch, [2.0, 1.0])
    neurallm.train(corpus, tmp_path / "run", **SETTINGS)
    assert seen["reads"] == 0
    assert_weights_equal(seen["weights"], load_file(tmp_path / "run" / "model.safetensors"))


def test_when_an_earlier_epoch_was_better_its_weights_are_read_back_and_scored(corpus, tmp_path, monkeypatch):
    seen = spy_on_the_test(monkeypatch, [1.0, 2.0])
    neurallm.train(corpus, tmp_path / "run", **SETTINGS)
    assert seen["reads"] == 1
    best = load_file(tmp_path / "run" / "model.safetensors")
    assert_weights_equal(seen["weights"], best)
    last = {k[len("model."):]: v for k, v in load_file(tmp_path / "run" / "last.safetensors").items() if k.startswith("model.")}
    assert any(not (last[name] == tensor).all() for name, tensor in best.items())  # epoch 2 had moved on

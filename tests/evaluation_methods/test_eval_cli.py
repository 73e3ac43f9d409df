"""`neurallm eval RUN --cache-pointer N` and `--dynamic` from the command line, with their settings in --json."""

from __future__ import annotations

import json
import math

import neurallm
from neurallm.cli import main
from neurallm.config import DYNAMIC_DECAY, DYNAMIC_LR, DYNAMIC_WINDOW
from conftest import TINY_MODEL, write_patterned_corpus


def _eval_json(capsys, *argv) -> dict:
    assert main(["eval", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_cache_pointer_reports_its_settings_and_scores_every_token(trained_run, capsys):
    plain = _eval_json(capsys, str(trained_run))
    pointer = _eval_json(capsys, str(trained_run), "--cache-pointer", "50", "--theta", "0.5", "--lambda", "0.2")
    assert (pointer["cache_pointer"], pointer["theta"], pointer["lambda"]) == (50, 0.5, 0.2)
    assert pointer["tokens"] == plain["tokens"] and pointer["method"] == "exact+cache-pointer"


def test_dynamic_evaluation_reports_its_settings(trained_run, capsys):
    plain = _eval_json(capsys, str(trained_run))
    dynamic = _eval_json(capsys, str(trained_run), "--dynamic", "--dynamic-rule", "sgd", "--dynamic-lr", "0.5",
                         "--dynamic-decay", "0.01", "--dynamic-window", "6")
    assert (dynamic["dynamic_rule"], dynamic["dynamic_lr"], dynamic["dynamic_decay"], dynamic["dynamic_window"]) == (
        "sgd", 0.5, 0.01, 6)
    assert dynamic["tokens"] == plain["tokens"] and dynamic["method"] == "dynamic"


def test_dynamic_evaluation_defaults_to_the_rms_rule_with_its_own_rate(trained_run, capsys):
    dynamic = _eval_json(capsys, str(trained_run), "--dynamic")
    assert (dynamic["dynamic_rule"], dynamic["dynamic_lr"], dynamic["dynamic_decay"]) == (
        "rms", DYNAMIC_LR["rms"]["word"], DYNAMIC_DECAY)  # the session's trained run is word-level
    assert dynamic["dynamic_window"] == DYNAMIC_WINDOW and math.isfinite(dynamic["ppl"])


def test_the_rms_rule_without_the_runs_training_text_is_one_line_naming_the_other_rule(tmp_path, capsys):
    corpus = write_patterned_corpus(tmp_path / "corpus", lines=60)
    neurallm.train(corpus, tmp_path / "run", progress=False, **TINY_MODEL)
    corpus.rename(tmp_path / "moved")
    capsys.readouterr()  # training's own warnings (tiny splits)
    assert main(["eval", str(tmp_path / "run"), "--data", str(tmp_path / "moved"), "--dynamic"]) == 1
    error = capsys.readouterr().err.strip()
    assert "--dynamic-rule sgd" in error and "training text" in error and "\n" not in error, error
    assert main(["eval", str(tmp_path / "run"), "--data", str(tmp_path / "moved"), "--dynamic", "--dynamic-rule", "sgd"]) == 0


def test_both_methods_at_once_is_one_line_naming_the_flags(trained_run, capsys):
    assert main(["eval", str(trained_run), "--cache-pointer", "50", "--dynamic"]) == 1
    error = capsys.readouterr().err.strip()
    assert "--cache-pointer and --dynamic" in error and "\n" not in error


def test_a_character_run_takes_the_rules_character_rate(tmp_path, capsys):
    corpus = write_patterned_corpus(tmp_path / "corpus", lines=60)
    neurallm.train(corpus, tmp_path / "run", progress=False, level="char", **TINY_MODEL)
    capsys.readouterr()
    rms = _eval_json(capsys, str(tmp_path / "run"), "--dynamic")
    sgd = _eval_json(capsys, str(tmp_path / "run"), "--dynamic", "--dynamic-rule", "sgd")
    assert (rms["dynamic_lr"], sgd["dynamic_lr"]) == (DYNAMIC_LR["rms"]["char"], DYNAMIC_LR["sgd"]["char"])
    assert math.isfinite(rms["bpc"]) and rms["tokens"] == sgd["tokens"]


def test_a_grid_of_rates_on_one_loaded_run_measures_the_gradient_rms_once(trained_run, monkeypatch):
    import neurallm.api

    measured = []
    real = neurallm.api.gradient_rms
    monkeypatch.setattr(neurallm.api, "gradient_rms", lambda *args: measured.append(args[2]) or real(*args))
    run = neurallm.load_run(trained_run)
    first, second = (run.evaluate(dynamic=True, dynamic_lr=lr) for lr in (1e-4, 2e-4))
    again = run.evaluate(dynamic=True, dynamic_lr=1e-4)
    assert measured == [DYNAMIC_WINDOW]  # one pass over the training text for the whole grid
    assert again.loss == first.loss != second.loss
    run.evaluate(dynamic=True, dynamic_window=5)
    assert measured == [DYNAMIC_WINDOW, 5]  # another window length is measured for itself

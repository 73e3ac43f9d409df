"""`neurallm eval RUN --cache-pointer N` and `--dynamic` from the command line, with their settings in --json."""

from __future__ import annotations

import json

from neurallm.cli import main


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
    dynamic = _eval_json(capsys, str(trained_run), "--dynamic", "--dynamic-lr", "0.5", "--dynamic-decay", "0.01")
    assert (dynamic["dynamic_lr"], dynamic["dynamic_decay"], dynamic["dynamic_window"]) == (0.5, 0.01, 8)  # the run's bptt
    assert dynamic["tokens"] == plain["tokens"] and dynamic["method"] == "dynamic"


def test_both_methods_at_once_is_one_line_naming_the_flags(trained_run, capsys):
    assert main(["eval", str(trained_run), "--cache-pointer", "50", "--dynamic"]) == 1
    error = capsys.readouterr().err.strip()
    assert "--cache-pointer and --dynamic" in error and "\n" not in error

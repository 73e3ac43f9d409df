"""Presets: each is a valid bundle of settings, listed in --help, and flags given explicitly override it."""

from __future__ import annotations

import json
import re

import pytest

from conftest import write_patterned_corpus
from neurallm.cli import build_parser, main
from neurallm.run_config import TRAIN_SETTINGS
from neurallm.presets import PRESETS, with_preset
from neurallm.settings import split_settings


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_is_a_valid_set_of_settings(name):
    parts = split_settings(PRESETS[name].settings, *TRAIN_SETTINGS, what=f"preset {name}")
    for cls, part in zip(TRAIN_SETTINGS, parts):
        if cls.__name__ != "SourceSettings":  # --data is never part of a preset
            cls(**{"vocab_size": 100} if cls.__name__ == "ModelConfig" else {}, **part)


# How a preset's one-line summary (shown by --help and the docs) states a setting: pattern → the settings its groups
# give. The test below reads each summary with these and compares with the bundle, so the values live in one place
# (neurallm/presets.py) and what a user is told a preset sets is what it sets.
STATED = [
    (r"(\d+)x(\d+) LSTM", ("nlayers", "nhid")),
    (r"(\d+)-layer AWD_LSTM (\d+)/(\d+)", ("nlayers", "nhid", "emsize")),
    (r"\bdropout ([\d.]+)", ("dropout",)),
    (r"\bdropouti ([\d.]+)", ("dropouti",)),
    (r"\bdropouth ([\d.]+)", ("dropouth",)),
    (r"\bdropoute ([\d.]+)", ("dropoute",)),
    (r"\bwdrop ([\d.]+)", ("wdrop",)),
    (r"\balpha ([\d.]+), beta ([\d.]+)", ("alpha", "beta")),
    (r"cosine down to ([\d.]+)x", ("min_lr_ratio",)),
    (r"\blr ([\d.]+)", ("lr",)),
    (r"\bAdamW ([\d.]+e-\d+)", ("lr",)),
    (r"\bweight decay ([\d.]+)", ("weight_decay",)),
    (r"\bbatch (\d+)", ("batch_size",)),
    (r"\bbptt (\d+)", ("bptt",)),
    (r"(\d+) epochs", ("epochs",)),
    (r"adaptive softmax (\d+),(\d+)", ("cutoffs", "cutoffs")),
]


@pytest.mark.parametrize("name", list(PRESETS))
def test_what_a_presets_summary_says_it_sets_is_what_it_sets(name):
    summary, settings = PRESETS[name].summary, PRESETS[name].settings
    stated = 0
    for pattern, names in STATED:
        for match in re.finditer(pattern, summary):
            if names == ("cutoffs", "cutoffs"):
                assert settings["adaptive_softmax"] is True and tuple(settings["cutoffs"]) == tuple(map(int, match.groups()))
            else:
                for setting, text in zip(names, match.groups()):
                    assert float(settings[setting]) == float(text), f"{name}: the summary says {setting} {text}"
            stated += 1
    if re.search(r"\btied\b", summary):
        assert settings["tied"] is True, f"{name}: the summary says tied"
    optimizers = {"NT-ASGD": "ntasgd", "AdamW": "adamw", "SGD": "sgd"}
    said = next((optimizer for word, optimizer in optimizers.items() if word in summary), None)
    assert said is None or settings["optimizer"] == said, f"{name}: the summary says {said}"
    assert stated >= 2, f"{name}: its summary states almost none of its settings: {summary!r}"


def test_explicit_settings_override_the_preset():
    merged = with_preset("cpu-fast", {"emsize": 64, "lr": 1e-3})
    assert merged["emsize"] == 64 and merged["lr"] == 1e-3
    assert merged["tied"] is True  # the rest of the bundle stays


def test_a_switch_the_preset_turns_on_can_be_turned_off(tmp_path):
    corpus = write_patterned_corpus(tmp_path / "corpus", lines=40)
    out = tmp_path / "run"
    assert main(["train", "--preset", "cpu-fast", "--no-tied", "--data", str(corpus), "--out", str(out),
                 "--emsize", "16", "--nhid", "16", "--batch-size", "4", "--bptt", "8", "--epochs", "1", "--no-progress"]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["model"]["tied"] is False and saved["train"]["optimizer"] == "adamw"


def test_train_help_lists_every_preset(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = "".join(capsys.readouterr().out.split())  # argparse wraps lines (and breaks "pe-small" after its dash)
    for name in PRESETS:
        assert f"{name}:" in text


def test_a_preset_run_records_the_bundle_with_the_overrides(tmp_path):
    corpus = write_patterned_corpus(tmp_path / "corpus", lines=40)
    out = tmp_path / "run"
    assert main(["train", "--preset", "cpu-fast", "--data", str(corpus), "--out", str(out), "--emsize", "16",
                 "--nhid", "16", "--batch-size", "4", "--bptt", "8", "--epochs", "1", "--no-progress"]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["model"]["tied"] is True and saved["model"]["nlayers"] == 1
    assert saved["model"]["emsize"] == 16 and saved["train"]["epochs"] == 1 and saved["train"]["optimizer"] == "adamw"


def test_an_unknown_preset_is_one_line_naming_the_flag(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--preset", "fastest", "--out", "x"])
    assert "--preset" in capsys.readouterr().err

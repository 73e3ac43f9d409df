"""Presets: each is a valid bundle of settings, listed in --help, and flags given explicitly override it."""

from __future__ import annotations

import json

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


def test_the_paper_configurations_are_the_published_ones():
    assert {k: PRESETS["pe-medium"].settings[k] for k in ("emsize", "nhid", "dropout")} == {"emsize": 650, "nhid": 650, "dropout": 0.5}
    assert PRESETS["pe-large"].settings["nhid"] == 1500
    awd = PRESETS["awd-wt2"].settings
    assert (awd["model"], awd["nhid"], awd["emsize"], awd["nlayers"], awd["optimizer"]) == ("AWD_LSTM", 1150, 400, 3, "ntasgd")
    assert (awd["dropouti"], awd["dropouth"], awd["wdrop"], awd["alpha"], awd["beta"]) == (0.65, 0.2, 0.5, 2.0, 1.0)


def test_explicit_settings_override_the_preset():
    merged = with_preset("cpu-fast", {"emsize": 64, "lr": 1e-3})
    assert merged["emsize"] == 64 and merged["lr"] == 1e-3
    assert merged["adaptive_softmax"] is True  # the rest of the bundle stays


def test_a_switch_the_preset_turns_on_can_be_turned_off(tmp_path):
    corpus = write_patterned_corpus(tmp_path / "corpus", lines=40)
    out = tmp_path / "run"
    assert main(["train", "--preset", "cpu-fast", "--no-adaptive-softmax", "--data", str(corpus), "--out", str(out),
                 "--emsize", "16", "--nhid", "16", "--batch-size", "4", "--bptt", "8", "--epochs", "1", "--no-progress"]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["model"]["adaptive_softmax"] is False and saved["train"]["optimizer"] == "adamw"


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
    assert saved["model"]["adaptive_softmax"] is True and saved["model"]["nlayers"] == 1
    assert saved["model"]["emsize"] == 16 and saved["train"]["epochs"] == 1 and saved["train"]["optimizer"] == "adamw"


def test_an_unknown_preset_is_one_line_naming_the_flag(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--preset", "fastest", "--out", "x"])
    assert "--preset" in capsys.readouterr().err

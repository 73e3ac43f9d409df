"""Settings have one source of truth: the dataclass fields. Flags, API keywords and resume checks follow them."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

import pytest

import neurallm
from neurallm.cli import add_setting_flags, build_parser, given_settings
from neurallm.config import ModelConfig, TrainConfig
from neurallm.run_config import DATA_SETTINGS, TRAIN_SETTINGS, RunConfig
from neurallm.data.sources import SourceSettings
from neurallm.data.stream import VocabSettings
from neurallm.data.tokenizers import TokenizerSettings
from neurallm.errors import ConfigError
from neurallm.settings import setting, settings_of, split_settings


def _subparser(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {option: action for action in parser._actions for option in action.option_strings}


def _example_text(s) -> str:
    """A value for the setting's flag that differs from its default."""
    if s.choices:
        return next(c for c in s.choices if c != s.default)
    if s.name == "cutoffs":  # a tuple of word ids
        return "100,500"
    return {int: "3", float: "0.5", str: "text", tuple: "0.8,0.1,0.1"}[s.kind]


def test_every_field_of_every_settings_class_is_declared_with_help():
    for cls in TRAIN_SETTINGS:
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"


@pytest.mark.parametrize("command, classes", [("train", TRAIN_SETTINGS), ("prepare", DATA_SETTINGS)])
def test_every_setting_is_a_flag_whose_help_shows_the_default(command, classes):
    options = _options(_subparser(command))
    for s in settings_of(*classes):
        action = options[s.flag]
        assert action.dest == s.name
        assert action.default is None  # so that the flags a user typed are known (resume compares those)
        for alias in s.aliases:
            assert options[alias] is action
        if s.kind is not bool and s.default is not dataclasses.MISSING:
            assert "(default: " in action.help, s.flag


@pytest.mark.parametrize("s", settings_of(*TRAIN_SETTINGS), ids=lambda s: s.flag)
def test_each_train_flag_reaches_the_api_as_its_field_name_and_type(s):
    text = None if s.kind is bool else _example_text(s)
    argv = ["train", "--out", "run", s.flag] + ([] if text is None else [text])
    settings = given_settings(build_parser().parse_args(argv), *TRAIN_SETTINGS)
    if s.name == "data":
        assert settings == {}  # --data is passed as the first argument, not a keyword
        return
    expected = True if text is None else (s.parse or s.kind)(text)
    assert settings == {s.name: expected}


def test_the_flag_name_may_differ_from_the_field_and_aliases_are_accepted():
    args = build_parser().parse_args(["train", "--out", "run", "--context", "64", "--batch_size", "7"])
    assert given_settings(args, TrainConfig) == {"eval_context": 64, "batch_size": 7}


def test_adding_a_setting_is_adding_one_field():
    @dataclass
    class Regularisation:
        wdrop: float = setting(0.0, help="DropConnect on the hidden-to-hidden weights")
        dropouti: float = setting(0.65, help="dropout on the inputs", flag="--input-dropout")

    parser = argparse.ArgumentParser(allow_abbrev=False)
    add_setting_flags(parser, "regularisation", Regularisation)
    args = parser.parse_args(["--wdrop", "0.5", "--input-dropout", "0.1"])
    assert given_settings(args, Regularisation) == {"wdrop": 0.5, "dropouti": 0.1}
    assert "(default: 0.65)" in parser.format_help()
    assert split_settings({"wdrop": 0.2, "lr": 1.0}, Regularisation, TrainConfig, what="train") == [{"wdrop": 0.2}, {"lr": 1.0}]


def test_a_field_without_help_is_refused_when_flags_are_built():
    @dataclass
    class Undocumented:
        secret: int = 3

    with pytest.raises(TypeError, match="Undocumented.secret"):
        settings_of(Undocumented)


def test_api_keywords_are_the_field_names_and_unknown_ones_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="unknown setting.*batchsize.*known: .*batch_size"):
        neurallm.train(tmp_path / "corpus", tmp_path / "run", batchsize=4)
    with pytest.raises(ConfigError, match="unknown setting.*for prepare: emsize"):
        neurallm.prepare(tmp_path / "corpus", emsize=4)
    assert not (tmp_path / "run").exists()


def _config() -> RunConfig:
    return RunConfig(SourceSettings(data="corpus"), TokenizerSettings(), VocabSettings(), ModelConfig(vocab_size=10), TrainConfig())


def test_resume_may_change_exactly_the_settings_declared_resumable():
    # where and how the same arithmetic runs may change too: a run trained on a GPU goes on on a CPU
    assert {s.name for s in settings_of(*TRAIN_SETTINGS) if s.resumable} == {"epochs", "max_time", "device", "compile"}
    resumed = _config().resumed_with({"epochs": 60, "max_time": 30.0, "device": "cpu", "compile": True, "lr": 20.0,
                                      "split_ratios": [0.9, 0.05, 0.05]})
    assert (resumed.train.epochs, resumed.train.max_time, resumed.train.device, resumed.train.compile) == (60, 30.0, "cpu", True)


@pytest.mark.parametrize("given, flag", [({"lr": 5.0}, "--lr 5.0"), ({"eval_context": 3}, "--context 3"),
                                         ({"level": "char"}, "--level char"), ({"max_vocab": 5}, "--max-vocab 5")])
def test_resume_refuses_any_other_change_naming_the_flag_and_what_may_change(given, flag):
    with pytest.raises(ConfigError, match=f"{flag} differs from the run's .*only --epochs, --max-time, --device and --compile may change"):
        _config().resumed_with(given)


def test_a_resumed_value_is_still_checked():
    with pytest.raises(ConfigError, match="--epochs must be at least 1"):
        _config().resumed_with({"epochs": 0})


def test_config_json_keys_are_the_field_names(tmp_path):
    saved = _config().to_dict()
    assert set(saved["train"]) == {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(saved["model"]) == {f.name for f in dataclasses.fields(ModelConfig)}
    assert RunConfig.from_dict(saved) == _config()


# config.json as neurallm 0.1.0 wrote it before the settings were declared with `setting(...)`
CONFIG_0_1_0 = (
    '{"source": {"data": "/data/corpus", "format": "auto", "text_column": null, "text_field": null, "split_ratios": '
    '[0.9, 0.05, 0.05], "encoding": "utf-8"}, "tokenizer": {"level": "word", "lowercase": false, "strip_punctuation": '
    'false}, "vocab": {"min_freq": 1, "max_vocab": null}, "model": {"model": "LSTM", "vocab_size": 10, "emsize": 200, '
    '"nhid": 200, "nlayers": 2, "dropout": 0.2, "tied": false, "nhead": 2, "memory": 0}, "train": {"lr": 20.0, '
    '"clip": 0.25, "epochs": 40, "batch_size": 20, "bptt": 35, "seed": 1111, "optimizer": "sgd", "weight_decay": 0.01, '
    '"warmup": 100, "max_time": null, "device": "auto", "shuffle_windows": false, "eval_batch_size": 10, '
    '"eval_context": null, "log_interval": 50}}'
)


def test_a_config_json_written_before_still_loads_and_its_keys_are_kept():
    import json

    old = json.loads(CONFIG_0_1_0)
    config = RunConfig.from_dict(old)
    assert config == RunConfig(SourceSettings(data="/data/corpus"), TokenizerSettings(), VocabSettings(),
                               ModelConfig(vocab_size=10), TrainConfig(eval_batch_size=10))  # 0.1.0's default, kept
    saved = json.loads(json.dumps(config.to_dict()))
    for section, values in old.items():
        assert {k: saved[section][k] for k in values} == values  # same keys and values; new settings only add keys

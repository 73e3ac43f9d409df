"""Every command's settings are declared once, as ``setting()`` fields: the flags of eval, score and explain and
the keyword arguments of the Python API come from the same fields, with the same defaults."""

from __future__ import annotations

import argparse
import inspect

import pytest

import neurallm
from neurallm.cli import build_parser
from neurallm.config import (
    EvalConfig, EvalMethods, EvalReport, ExplainConfig, LoadSettings, ScoreConfig, ScoreInput,
)
from neurallm.data.sources import SourceSettings
from neurallm.errors import ConfigError
from neurallm.explain import explain_evaluation
from neurallm.settings import settings_of

# command -> the settings classes its flags come from (besides the positional run, -h and --debug)
COMMANDS = {
    "eval": (SourceSettings, EvalConfig, EvalReport, LoadSettings, EvalMethods),
    "score": (ScoreInput, ScoreConfig, LoadSettings),
    "explain": (ExplainConfig,),
}


def subparser(command: str) -> argparse.ArgumentParser:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[command]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_flag_of_the_command_is_a_declared_setting(command):
    declared = {spelling for s in settings_of(*COMMANDS[command]) for spelling in (s.flag, *s.aliases)}
    declared |= {f"--no-{s.flag[2:]}" for s in settings_of(*COMMANDS[command]) if s.kind is bool}
    options = {o for a in subparser(command)._actions for o in a.option_strings} - {"-h", "--help", "--debug"}
    assert options == declared


@pytest.mark.parametrize("command", COMMANDS)
def test_each_flag_shows_its_fields_default(command):
    helps = {a.dest: a.help for a in subparser(command)._actions}
    for s in settings_of(*COMMANDS[command]):
        if s.name == "data" or (s.kind is bool and not s.default):
            continue
        assert helps[s.name] == s.help_with_default().replace("%", "%%"), s.name  # argparse's escape of a literal %


def test_the_api_takes_the_same_names_and_refuses_others(trained_run):
    run = neurallm.load_run(trained_run, **{s.name: s.default for s in settings_of(LoadSettings)})
    defaults = {s.name: s.default for s in settings_of(EvalConfig, EvalMethods)}
    assert run.evaluate(**defaults).ppl == run.evaluate().ppl
    assert run.score(["the cat sat"], **{s.name: s.default for s in settings_of(ScoreConfig)})[0].logprob == \
        run.score(["the cat sat"])[0].logprob
    with pytest.raises(ConfigError, match="unknown setting.*batchsize.*known:.*batch_size"):
        run.evaluate(batchsize=5)
    with pytest.raises(ConfigError, match="unknown setting.*checkpiont"):
        neurallm.load_run(trained_run, checkpiont="last")
    with pytest.raises(ConfigError, match="--cache-pointer and --dynamic are separate methods"):
        run.evaluate(cache_pointer=10, dynamic=True)


def test_the_explain_functions_default_to_the_flags_defaults():
    parameters = inspect.signature(explain_evaluation).parameters
    assert parameters["batch_sizes"].default == ExplainConfig().compare_batch_sizes
    assert parameters["context"].default == ExplainConfig().context

"""The command line round trip: prepare → train → eval → generate, as a user types it."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY_MODEL, TRAINED_RUN_EPOCHS, write_patterned_corpus
from neurallm.cli import main

REPO = Path(__file__).resolve().parents[1]
RUN_FILES = {"config.json", "vocab.json", "model.safetensors", "last.safetensors", "metrics.jsonl"}
METRIC_KEYS = {"epoch", "train_loss", "valid_loss", "valid_ppl", "lr", "seconds", "tokens_per_s"}


def _flags(settings: dict) -> list[str]:
    return [arg for key, value in settings.items() for arg in (f"--{key.replace('_', '-')}", str(value))]


TINY = _flags(TINY_MODEL) + ["--no-progress"]


def _word_tokens(corpus: Path, split: str = "test") -> int:
    """Word tokens of a split, counted from the text: words plus one <eos> per line."""
    return sum(len(line.split()) + 1 for line in (corpus / f"{split}.txt").read_text(encoding="utf-8").splitlines())


def _json_line(capsys) -> dict:
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return json.loads(lines[0])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_patterned_corpus(tmp_path_factory.mktemp("cli") / "corpus")


@pytest.mark.integration
def test_python_dash_m_neurallm_trains_a_run(tiny_corpus, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "neurallm", "train", "--data", str(tiny_corpus), "--out", str(out), *TINY],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "end of training" in done.stdout
    assert RUN_FILES <= {p.name for p in out.iterdir()}


def test_train_writes_the_run_directory_and_one_metrics_line_per_epoch(trained_run):
    assert RUN_FILES <= {p.name for p in trained_run.iterdir()}
    records = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    config = json.loads((trained_run / "config.json").read_text(encoding="utf-8"))
    assert [r["epoch"] for r in records] == list(range(1, config["train"]["epochs"] + 1))
    for record in records:
        assert METRIC_KEYS <= record.keys()
        assert math.isfinite(record["valid_loss"]) and record["valid_ppl"] == pytest.approx(math.exp(record["valid_loss"]))
    assert config["model"]["model"] == "LSTM" and config["model"]["emsize"] == TINY_MODEL["emsize"]
    assert config["train"]["epochs"] == TRAINED_RUN_EPOCHS


@pytest.mark.parametrize("batch_size", [1, 10])
def test_eval_json_prints_one_object_scoring_every_test_token_but_the_first(trained_run, trained_corpus, batch_size, capsys):
    assert main(["eval", str(trained_run), "--split", "test", "--json", "--batch-size", str(batch_size)]) == 0
    result = _json_line(capsys)
    assert result["tokens"] == _word_tokens(trained_corpus) - 1
    assert result["ppl"] == pytest.approx(math.exp(result["loss"]))
    assert result["split"] == "test" and result["batch_size"] == batch_size
    assert result["bpb"] > 0 and result["bpc"] > 0  # bits per byte and per character at every level


def test_eval_gives_the_same_loss_at_batch_size_1_and_10(trained_run, capsys):
    losses = []
    for batch_size in ("1", "10"):
        assert main(["eval", str(trained_run), "--json", "--batch-size", batch_size]) == 0
        losses.append(_json_line(capsys)["loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_eval_without_json_prints_a_readable_line(trained_run, capsys):
    assert main(["eval", str(trained_run), "--split", "valid"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("valid: loss ") and "ppl" in out


def test_generate_writes_the_file_and_the_same_seed_writes_the_same_text(trained_run, tmp_path, capsys):
    first, second, other = tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "c.txt"
    for path, seed in ((first, "3"), (second, "3"), (other, "4")):
        assert main(["generate", str(trained_run), "--tokens", "20", "--seed", seed, "--out", str(path)]) == 0
    captured = capsys.readouterr()
    assert captured.out == ""  # the text went to the file
    assert "wrote 20 tokens" in captured.err
    assert first.read_text(encoding="utf-8") == second.read_text(encoding="utf-8")
    assert first.read_text(encoding="utf-8") != other.read_text(encoding="utf-8")
    assert "<eos>" not in first.read_text(encoding="utf-8")


def test_generate_prints_to_stdout_and_names_unknown_prompt_words(trained_run, capsys):
    assert main(["generate", str(trained_run), "--prompt", "the zebra", "--tokens", "5", "--seed", "1"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("the zebra")
    assert "zebra" in captured.err and "<unk>" in captured.err


def test_prepare_then_train_on_the_prepared_folder(corpus, tmp_path, capsys):
    prepared = tmp_path / "prepared"
    assert main(["prepare", "--data", str(corpus), "--out", str(prepared)]) == 0
    assert {"train.npy", "valid.npy", "test.npy", "vocab.json", "meta.json"} <= {p.name for p in prepared.iterdir()}
    log = capsys.readouterr().out
    assert f"prepared {prepared}" in log
    assert f"valid: {_word_tokens(corpus, 'valid'):,} tokens, 0 replaced by <unk>" in log  # the <unk> substitutions of each split are reported
    run = tmp_path / "run"
    assert main(["train", "--data", str(prepared), "--out", str(run), *TINY]) == 0
    capsys.readouterr()
    assert json.loads((run / "vocab.json").read_text()) == json.loads((prepared / "vocab.json").read_text())
    assert main(["eval", str(run), "--json"]) == 0
    assert _json_line(capsys)["tokens"] == _word_tokens(corpus) - 1


def test_train_refuses_an_existing_run_without_force_and_replaces_it_with_force(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", str(corpus), "--out", str(out), *TINY]) == 0
    capsys.readouterr()
    assert main(["train", "--data", str(corpus), "--out", str(out), *TINY]) == 1
    error = capsys.readouterr().err
    assert "already exists" in error and "--force" in error
    (out / ".metrics.jsonl.left-by-a-crash.tmp").write_text("from the first run")
    assert main(["train", "--data", str(corpus), "--out", str(out), *TINY, "--force"]) == 0
    assert not (out / ".metrics.jsonl.left-by-a-crash.tmp").exists()
    assert RUN_FILES <= {p.name for p in out.iterdir()}


def test_force_keeps_the_old_run_when_the_new_one_cannot_start(corpus, tmp_path, capsys):
    """--force deletes the old run only once the new run's data and settings have been checked."""
    out = tmp_path / "run"
    assert main(["train", "--data", str(corpus), "--out", str(out), *TINY]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    capsys.readouterr()
    assert main(["train", "--data", str(tmp_path / "missing.txt"), "--out", str(out), *TINY, "--force"]) == 1
    assert "missing.txt" in capsys.readouterr().err
    assert main(["train", "--data", str(corpus), "--out", str(out), *TINY, "--batch-size", "100000", "--force"]) == 1
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


@pytest.mark.parametrize("extra", [["--shuffle-windows"], ["--optimizer", "adamw", "--lr", "0.01", "--warmup", "5"]],
                         ids=["shuffle-windows", "adamw"])
def test_training_variants_train_and_lower_the_loss(corpus, tmp_path, extra, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", str(corpus), "--out", str(out), *TINY, "--epochs", "2", *extra]) == 0
    config = json.loads((out / "config.json").read_text())
    if extra[0] == "--shuffle-windows":
        assert config["train"]["shuffle_windows"] is True
    else:
        assert config["train"]["optimizer"] == "adamw"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2
    assert records[1]["train_loss"] < records[0]["train_loss"]
    assert records[1]["valid_loss"] < 1.2  # a uniform guess among the 24 tokens would be ln 24 = 3.18


def test_a_transformer_with_memory_trains_evaluates_and_generates(corpus, tmp_path, capsys):
    out = tmp_path / "xl"
    flags = ["--model", "Transformer", "--nhead", "2", "--memory", "8", "--optimizer", "adamw", "--lr", "0.005", "--warmup", "5"]
    assert main(["train", "--data", str(corpus), "--out", str(out), *TINY, *flags]) == 0  # one epoch, as TINY says
    capsys.readouterr()
    assert main(["eval", str(out), "--json"]) == 0
    result = _json_line(capsys)
    assert result["tokens"] == _word_tokens(corpus) - 1 and math.isfinite(result["ppl"])
    assert main(["generate", str(out), "--tokens", "15", "--seed", "3", "--out", str(tmp_path / "g.txt")]) == 0
    assert (tmp_path / "g.txt").read_text(encoding="utf-8").strip()


def test_tied_with_adaptive_softmax_fails_with_one_line_naming_the_flag(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", str(corpus), "--out", str(out), *TINY, "--adaptive-softmax", "--tied"]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("neurallm train: error: --tied") and "\n" not in error
    assert not out.exists() or not any(out.iterdir())


@pytest.fixture(scope="module")
def shakespeare_run(shared_data, tmp_path_factory) -> Path:
    """A character-level run trained one epoch on the dataset name `tinyshakespeare`, found in ../shared/data.

    Bounded by the epoch, not by --max-time: what it learns must not depend on how fast the machine is.
    """
    out = tmp_path_factory.mktemp("runs") / "chars"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)
        patch.delenv("NEURALLM_DATA", raising=False)
        assert main(["train", "--data", "tinyshakespeare", "--level", "char", "--out", str(out), *TINY,
                     "--batch-size", "64", "--bptt", "64", "--eval-batch-size", "20"]) == 0
    return out


def test_char_level_tinyshakespeare_trains_evaluates_with_bpc_and_generates(shakespeare_run, capsys):
    out = shakespeare_run
    capsys.readouterr()
    assert main(["eval", str(out), "--json", "--batch-size", "20"]) == 0
    result = _json_line(capsys)
    assert result["tokens"] == 47_426 - 1  # the last 5% of the 40,000 lines, in characters
    assert result["bpc"] == pytest.approx(result["loss"] / math.log(2))
    assert result["bpc"] < math.log2(66)  # better than guessing among the 66 characters
    assert main(["generate", str(out), "--prompt", "ROMEO:", "--tokens", "50", "--seed", "1"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("ROMEO:")
    assert len(text) >= len("ROMEO:") + 50  # 50 characters follow (an <unk>, if drawn, is written as 5)


def test_a_run_trained_on_a_dataset_name_is_evaluated_from_another_folder_offline(shakespeare_run, tmp_path, monkeypatch, capsys):
    config = json.loads((shakespeare_run / "config.json").read_text())
    assert config["source"]["data"] == "tinyshakespeare"
    assert config["source"]["location"] == str((REPO.parent / "shared" / "data" / "tinyshakespeare").resolve())
    monkeypatch.chdir(tmp_path)  # ../shared/data does not exist from here
    monkeypatch.delenv("NEURALLM_DATA", raising=False)
    monkeypatch.setenv("NEURALLM_MIRROR", "http://127.0.0.1:9")  # a download would fail: nothing listens there
    capsys.readouterr()
    assert main(["eval", str(shakespeare_run), "--json", "--batch-size", "20"]) == 0
    assert _json_line(capsys)["tokens"] == 47_426 - 1


def test_news_csv_with_the_tutorial_preprocessing_trains_evaluates_and_generates(shared_data, tmp_path, capsys):
    out = tmp_path / "news"
    csv_path = shared_data / "ag_news" / "test.csv"
    # --max-vocab keeps the softmax small (CPU seconds); the full 20,898-word preparation is in tests/data/test_stream.py
    assert main(["train", "--data", str(csv_path), "--text-column", "title,description", "--lowercase",
                 "--strip-punctuation", "--max-vocab", "2000", "--out", str(out), *TINY, "--batch-size", "20",
                 "--max-time", "2"]) == 0
    log = capsys.readouterr().out
    assert "valid: 15,389 tokens" in log
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["vocab_size"] == 2000
    assert config["tokenizer"] == {"level": "word", "bpe_vocab_size": None, "lowercase": True, "strip_punctuation": True}
    assert config["source"]["text_column"] == "title,description"
    assert main(["eval", str(out), "--json"]) == 0
    assert _json_line(capsys)["tokens"] == 14_912 - 1
    assert main(["generate", str(out), "--prompt", "Stocks Rally", "--tokens", "10", "--seed", "2"]) == 0
    assert capsys.readouterr().out.startswith("Stocks Rally")


def test_a_local_folder_name_is_accepted_as_data(shared_data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("NEURALLM_DATA", raising=False)
    assert main(["prepare", "--data", "wt2-lite", "--out", str(tmp_path / "wt2")]) == 0
    assert "vocabulary 13,777" in capsys.readouterr().out
    meta = json.loads((tmp_path / "wt2" / "meta.json").read_text())
    assert {split: counts["tokens"] for split, counts in meta["splits"].items()} == {
        "train": 217_646, "valid": 118_886, "test": 126_683}


@pytest.mark.slow
def test_done_when_an_lstm_on_wt2_lite_reaches_test_perplexity_under_1000(shared_data, tmp_path, monkeypatch, capsys):
    # The acceptance run (measured: test ppl 318 in about 45 s on two cores).
    monkeypatch.chdir(REPO)
    out = tmp_path / "wt2"
    assert main(["train", "--data", "wt2-lite", "--out", str(out), "--model", "LSTM", "--emsize", "64", "--nhid", "64",
                 "--nlayers", "1", "--epochs", "1", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["eval", str(out), "--json"]) == 0
    result = _json_line(capsys)
    assert result["tokens"] == 126_683 - 1
    assert math.isfinite(result["ppl"]) and result["ppl"] < 1000, result


def test_dry_run_trains_one_batch_then_validates_and_tests(corpus, tmp_path, capsys):
    out = tmp_path / "dry"
    assert main(["train", "--data", str(corpus), "--out", str(out), *TINY, "--epochs", "3", "--dry-run"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 1 and records[0]["complete"] is False  # one batch, not an epoch
    results = json.loads((out / "results.json").read_text())
    assert results["stopped_by"] == "dry_run" and results["test"]["tokens"] == _word_tokens(corpus) - 1


@pytest.mark.parametrize("argv", [["train", "--out", "x", "--epoch", "3"], ["train", "--out", "x", "--save-ev", "60"],
                                  ["eval", "run", "--compare", "1,2"], ["generate", "run", "--temp", "0.5"]],
                         ids=["epoch", "save-ev", "compare", "temp"])
def test_abbreviated_flags_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


def test_a_max_time_stop_says_so_on_the_console(corpus, tmp_path, capsys):
    out = tmp_path / "timed"
    assert main(["train", "--data", str(corpus), "--out", str(out), *TINY, "--epochs", "3", "--max-time", "0.001"]) == 0
    log = capsys.readouterr().out
    assert "stopped by --max-time after 0 of 3 epochs and 1 of " in log
    assert json.loads((out / "results.json").read_text())["stopped_by"] == "max_time"


def test_eval_on_a_foreign_corpus_reports_the_unk_share_and_warns(trained_run, tmp_path, capsys):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    for split in ("train", "valid", "test"):
        # 4 of the 8 tokens per line are unknown to the run (zebra, ate, grass, quickly); "the" and <eos> are known
        (foreign / f"{split}.txt").write_text("the zebra ate the grass quickly the\n" * 40, encoding="utf-8")
    assert main(["eval", str(trained_run), "--data", str(foreign), "--json"]) == 0
    captured = capsys.readouterr()
    # stdout: the one JSON object alone; the share is of the 319 targets (the first token is none), 160 unknown
    assert json.loads(captured.out)["unk_share"] == pytest.approx(160 / 319)
    [warning] = [line for line in captured.err.splitlines() if "<unk>" in line]
    assert "warning: 50.2% of the test targets" in warning
    assert "50.2% not in the vocabulary, 0.0% written <unk> in the text" in warning
    assert main(["eval", str(trained_run)]) == 0  # its own corpus: every word known, no <unk> warning
    captured = capsys.readouterr()
    assert "<unk> 0.0%" in captured.out and "<unk>" not in captured.err


def _subparsers() -> dict:
    import argparse

    from neurallm.cli import build_parser

    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_every_flag_of_every_subcommand_shows_its_default_in_its_help():
    for command, parser in _subparsers().items():
        for action in parser._actions:
            switch = action.nargs == 0  # --tied, --json, -h: off unless given
            if switch or action.required or not action.option_strings:
                continue
            assert "(default: " in action.help, f"neurallm {command} {action.option_strings[0]}"


def test_the_cli_reference_page_is_the_parsers():
    """docs/reference/cli.md is generated from the parser: every subcommand has its section, and it is not stale."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("flags_table", REPO / "scripts" / "flags_table.py")
    flags_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(flags_table)
    page = (REPO / "docs" / "reference" / "cli.md").read_text(encoding="utf-8")
    assert [line for line in page.splitlines() if line.startswith("## ")] == [f"## `neurallm {c}`" for c in _subparsers()]
    assert flags_table.cli_reference() == page, "docs/reference/cli.md is stale: python scripts/flags_table.py --write"


def test_the_readme_quick_start_is_two_commands_and_ci_runs_the_second():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    block = readme.split("## Quick start", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]
    assert commands == ["./scripts/quickstart.sh", "./scripts/test.sh"]
    for script in commands:
        assert os.access(REPO / script, os.X_OK), script
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert "\n./scripts/test.sh\n" in ci
    setup = (REPO / "scripts" / "setup-venv.sh").read_text(encoding="utf-8")
    assert 'pip install torch==2.13.0 -e ".[dev]"' in setup  # the local CPU wheel, never an unpinned torch


def test_save_writes_a_copy_of_the_best_weights_as_safetensors(corpus, tmp_path, capsys):
    from safetensors.torch import load_file

    out, saved = tmp_path / "run", tmp_path / "model.pt"
    assert main(["train", "--data", str(corpus), "--out", str(out), *TINY, "--save", str(saved)]) == 0
    assert f"wrote the best weights to {saved}" in capsys.readouterr().out
    assert saved.read_bytes() == (out / "model.safetensors").read_bytes()
    assert load_file(str(saved))  # a safetensors file, whatever its name


def test_save_into_a_missing_folder_fails_before_training(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", str(corpus), "--out", str(out), *TINY, "--save", str(tmp_path / "no" / "m.pt")]) == 1
    assert "--save" in capsys.readouterr().err and not out.exists()


def test_onnx_export_runs_after_training_or_fails_before_it_in_one_line(corpus, tmp_path, capsys):
    import importlib.util

    out, onnx = tmp_path / "run", tmp_path / "model.onnx"
    code = main(["train", "--data", str(corpus), "--out", str(out), *TINY, "--onnx-export", str(onnx)])
    if importlib.util.find_spec("neurallm.export") is None:
        err = capsys.readouterr().err
        assert code == 1 and err.startswith("neurallm train: error: --onnx-export") and err.count("\n") == 1
        assert not out.exists()  # refused before any training
    else:
        assert code == 0 and onnx.is_file()


def test_the_pytorch_examples_generate_spellings_are_aliases(trained_run, tmp_path, capsys):
    ours, theirs = tmp_path / "ours.txt", tmp_path / "theirs.txt"
    assert main(["generate", str(trained_run), "--tokens", "12", "--seed", "5", "--out", str(ours)]) == 0
    assert main(["generate", str(trained_run), "--words", "12", "--seed", "5", "--outf", str(theirs)]) == 0
    assert theirs.read_text(encoding="utf-8") == ours.read_text(encoding="utf-8")


def test_explain_compare_batch_sizes_keeps_eval_batch_sizes_as_an_alias(capsys):
    assert main(["explain", "--range", "1..40", "--eval", "--compare-batch-sizes", "5,8"]) == 0
    new = capsys.readouterr().out
    assert main(["explain", "--range", "1..40", "--eval", "--eval-batch-sizes", "5,8"]) == 0
    assert capsys.readouterr().out == new and "batch size 5" in new


def test_context_means_the_same_in_every_subcommand_that_has_it():
    from neurallm.config import CONTEXT_HELP

    having = {command: action for command, parser in _subparsers().items() for action in parser._actions
              if "--context" in action.option_strings}
    assert {"train", "eval", "generate", "explain"} <= having.keys()
    for command, action in having.items():
        assert action.help.startswith(CONTEXT_HELP), command


def test_eval_and_explain_name_their_batch_size_list_alike():
    for command in ("eval", "explain"):
        options = {o for a in _subparsers()[command]._actions for o in a.option_strings}
        assert "--compare-batch-sizes" in options


def test_every_subcommand_prints_its_help():
    """argparse %-formats help texts, so a setting's help with a bare % ("within 0.05%") broke `eval --help`."""
    for name, subparser in _subparsers().items():
        assert subparser.format_help(), name

"""`neurallm score RUN --text/--file/--jsonl` and `Run.score`: per-line log-probability, tokens and perplexity."""

from __future__ import annotations

import json
import math

import pytest

import neurallm
from neurallm.cli import main

TEXT = "the cat sat on the mat\na dog ran in the park"


def _score(capsys, *argv) -> list[dict]:
    assert main(["score", *map(str, argv), "--json"]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_score_prints_one_json_object_per_line_matching_run_score(trained_run, capsys):
    rows = _score(capsys, trained_run, "--text", TEXT)
    (expected,) = neurallm.load_run(trained_run).score([TEXT])
    assert [row["line"] for row in rows] == [1, 2]
    assert [row["text"] for row in rows] == TEXT.splitlines()
    assert [row["tokens"] for row in rows] == [7, 7]  # six words and <eos>
    for row, line in zip(rows, expected.lines):
        assert row["logprob"] == pytest.approx(line.logprob) and row["logprob"] < 0
        assert row["ppl"] == pytest.approx(math.exp(-row["logprob"] / row["tokens"]))


def test_file_and_jsonl_score_the_same_lines_as_text(trained_run, capsys, tmp_path):
    (tmp_path / "t.txt").write_text(TEXT + "\n", encoding="utf-8")
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"id": i, "body": line}) + "\n"
                                              for i, line in enumerate(TEXT.splitlines())), encoding="utf-8")
    from_text = _score(capsys, trained_run, "--text", TEXT)
    assert _score(capsys, trained_run, "--file", tmp_path / "t.txt") == from_text
    assert _score(capsys, trained_run, "--jsonl", tmp_path / "t.jsonl", "--text-field", "body") == from_text


def test_lines_carry_context_unless_independent(trained_run, capsys):
    carried = _score(capsys, trained_run, "--text", TEXT)
    independent = _score(capsys, trained_run, "--text", TEXT, "--independent")
    second_alone = _score(capsys, trained_run, "--text", TEXT.splitlines()[1])
    assert independent[1]["logprob"] == pytest.approx(second_alone[0]["logprob"])
    assert carried[1]["logprob"] != pytest.approx(second_alone[0]["logprob"])


def test_score_reports_the_unknown_share_and_warns_when_high(trained_run, capsys, caplog):
    assert main(["score", str(trained_run), "--text", "quantum chromodynamics explains hadrons"]) == 0
    assert "<unk> 80.0%" in capsys.readouterr().err  # four words unknown, <eos> known
    assert "warning: 80.0% of the scored tokens" in caplog.text
    caplog.clear()
    assert main(["score", str(trained_run), "--text", "the cat sat on the mat"]) == 0
    assert "<unk> 0.0%" in capsys.readouterr().err and "warning" not in caplog.text


@pytest.mark.parametrize("argv,message", [
    (["--jsonl", "x.jsonl"], "--jsonl needs --text-field"),
    (["--text", "a", "--text-field", "k"], "--text-field applies to --jsonl only"),
    (["--file", "missing.txt"], "--file missing.txt: no such file"),
])
def test_bad_score_input_is_one_line(trained_run, capsys, argv, message):
    assert main(["score", str(trained_run), *argv]) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_run_score_wants_a_list(trained_run):
    with pytest.raises(neurallm.errors.ConfigError, match="list of texts"):
        neurallm.load_run(trained_run).score("the cat")

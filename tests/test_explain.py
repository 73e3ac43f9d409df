"""`neurallm explain`: the layouts it draws are the ones batchify and plan_eval_columns produce."""

import io
import string

import pytest

from neurallm.errors import ConfigError
from neurallm.explain import (
    explain_evaluation,
    explain_training,
    parse_explain_text,
    should_use_color,
)

ONE_TO_FORTY = parse_explain_text(None, "1..40")
ALPHABET = list(string.ascii_lowercase)


def section(text: str, heading: str) -> list[str]:
    """The lines from the one starting with ``heading`` up to the next blank line."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
    end = next((i for i in range(start, len(lines)) if not lines[i].strip()), len(lines))
    return lines[start:end]


def value(lines: list[str], label: str) -> str:
    """What follows ``label:`` on the one line of ``lines`` that starts with it (after the indent)."""
    (line,) = [line.strip() for line in lines if line.strip().startswith(label)]
    return line.split(":", 1)[1].strip()


def test_range_and_text_parse_into_tokens():
    assert ONE_TO_FORTY == [str(n) for n in range(1, 41)]
    assert parse_explain_text("the  cat\tsat\n", None) == ["the", "cat", "sat"]


@pytest.mark.parametrize(
    "text, numbers, flag",
    [(None, None, "--text"), ("a b", "1..3", "--range"), ("   ", None, "--range"),
     (None, "a..b", "FIRST..LAST"), (None, "5..1", "FIRST..LAST"), (None, "1-40", "--range")],
)
def test_bad_input_is_a_one_line_config_error(text, numbers, flag):
    with pytest.raises(ConfigError) as error:
        parse_explain_text(text, numbers)
    assert flag in str(error.value) and "\n" not in str(error.value)


def test_origin_example_eight_columns_trim_nothing():
    naive = section(explain_evaluation(ONE_TO_FORTY), "batch size 8, naive")
    assert "5 rows × 8 columns" in naive[0]
    assert naive[1].strip() == "┌  1  6 11 16 21 26 31 36 ┐"
    assert naive[5].strip() == "└  5 10 15 20 25 30 35 40 ┘"
    assert value(naive, "trimmed from the tail") == "none"
    # the second token of each column is its first target, predicted from a zero state
    assert value(naive, "cold start").split() == ["2", "7", "12", "17", "22", "27", "32", "37"]
    assert value(naive, "tokens scored").startswith("32 of 40")  # (5 - 1) rows × 8 columns


def test_origin_example_six_columns_trim_the_tail():
    naive = section(explain_evaluation(ONE_TO_FORTY), "batch size 6, naive")
    assert "6 rows × 6 columns" in naive[0]
    assert naive[1].strip() == "┌  1  7 13 19 25 31 ┐"
    assert naive[6].strip() == "└  6 12 18 24 30 36 ┘"
    assert value(naive, "trimmed from the tail") == "37 38 39 40"
    assert value(naive, "cold start").split() == ["2", "8", "14", "20", "26", "32"]
    assert value(naive, "tokens scored").startswith("30 of 40")  # (6 - 1) rows × 6 columns


@pytest.mark.parametrize("batch_size", [8, 6])
def test_exact_layout_scores_every_token_after_the_first(batch_size):
    exact = section(explain_evaluation(ONE_TO_FORTY), f"batch size {batch_size}, exact")
    assert value(exact, "tokens scored").startswith("39 of 40")
    header = next(line for line in exact if line.strip().startswith("column  burn-in"))
    at = header.index("scored")
    rows = [line for line in exact if line.split()[0].isdigit()]
    assert len(rows) == batch_size
    assert [token for row in rows for token in row[at:].split()] == [str(n) for n in range(2, 41)]
    burn_ins = [row[header.index("burn-in") : at].split() for row in rows]
    assert burn_ins[0] == ["—"]  # column 0 starts at the start of the text
    assert burn_ins[1] == (["2", "3", "4", "5"] if batch_size == 8 else ["4", "5", "6", "7"])


def test_summary_compares_the_batch_sizes():
    summary = " ".join(section(explain_evaluation(ONE_TO_FORTY), "Summary"))
    assert "32 of 40 at batch size 8, 30 of 40 at batch size 6" in summary
    assert "39 of 40 at every batch size" in summary


def test_alphabet_reproduces_the_batchify_docstring():
    text = explain_training(ALPHABET, batch_size=4, bptt=2)
    matrix = [line.strip() for line in section(text, "batchify")[1:7]]
    assert matrix == ["┌ a g m s ┐", "│ b h n t │", "│ c i o u │", "│ d j p v │", "│ e k q w │", "└ f l r x ┘"]
    assert value(section(text, "batchify"), "dropped as the tail") == "y z"
    first = section(text, "window 0")
    assert first[2].strip() == "┌ a g m s ┐   ┌ b h n t ┐"  # input rows a..b, target rows b..c
    assert first[3].strip() == "└ b h n t ┘   └ c i o u ┘"
    assert "none" in value(first, "state carried in")
    assert any("gradients stop at the window edge" in line for line in first)


def test_carried_state_lists_what_each_column_has_seen():
    text = explain_training(ALPHABET, batch_size=4, bptt=2)
    second = " ".join(section(text, "window 1"))
    assert "column 0 has seen a b;" in second and "column 3 has seen s t" in second
    third = " ".join(section(text, "window 2"))
    assert "[ e k q w ]   [ f l r x ]" in third  # the last window is one row long
    assert "column 0 has seen a b c d;" in third


def test_long_histories_are_abbreviated():
    text = explain_training(ALPHABET, batch_size=2, bptt=3)
    assert "column 0 has seen a … f;" in " ".join(section(text, "window 2"))


def test_color_only_when_asked():
    plain = explain_training(ALPHABET, 4, 2) + explain_evaluation(ONE_TO_FORTY)
    assert "\x1b" not in plain
    colored = explain_training(ALPHABET, 4, 2, color=True)
    assert "\x1b[2ma b\x1b[0m" in colored  # the history seen through the carried state is dimmed
    assert "\x1b[" in explain_evaluation(ONE_TO_FORTY, color=True)


def test_default_examples_fit_in_100_columns():
    for text in (explain_evaluation(ONE_TO_FORTY), explain_training(ALPHABET, 4, 2)):
        assert max(map(len, text.splitlines())) <= 100


@pytest.mark.parametrize(
    "call, flag",
    [(lambda: explain_training(ALPHABET, 0, 2), "--batch-size"),
     (lambda: explain_training(ALPHABET, 4, 0), "--bptt"),
     (lambda: explain_training(ALPHABET, 20, 2), "--batch-size"),
     (lambda: explain_evaluation(ONE_TO_FORTY, (8, 0)), "--batch-size"),
     (lambda: explain_evaluation(ONE_TO_FORTY, (30,)), "--batch-size")],
)
def test_bad_settings_name_the_flag(call, flag):
    with pytest.raises(ConfigError, match=flag):
        call()


class FakeStream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_color_follows_the_terminal_and_no_color(monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    assert should_use_color(FakeStream(tty=True))
    assert not should_use_color(FakeStream(tty=False))
    monkeypatch.setenv("NO_COLOR", "1")
    assert not should_use_color(FakeStream(tty=True))


@pytest.mark.parametrize("n_tokens, batch_size", [(26, 4), (40, 6), (41, 8), (7, 3)])
def test_the_drawn_layout_is_what_batchify_cuts(n_tokens, batch_size):
    """explain draws without torch; its layout must stay the one training uses."""
    import torch

    from neurallm.data.batching import batchify
    from neurallm.explain import _layout

    tokens = [str(i) for i in range(n_tokens)]
    assert _layout(tokens, batch_size) == batchify(torch.arange(n_tokens), batch_size).tolist()


@pytest.mark.parametrize("argv", [["--range", "1..1000000000"], ["--range", "0..5000"],
                                  ["--text", "word " * 5001], ["--eval", "--range", "1..99999999999999999999"]])
def test_a_stream_too_long_to_draw_is_refused_in_one_line_before_it_is_built(argv, capsys):
    import tracemalloc

    from neurallm.cli import main

    tracemalloc.start()
    assert main(["explain", *argv]) != 0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "explain draws at most 5,000 tokens" in err[0]
    assert peak < 50_000_000  # nothing the size of the stream was allocated

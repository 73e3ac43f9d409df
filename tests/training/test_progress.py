"""Progress when stderr is not a terminal: a plain line every --log-interval batches, as the PyTorch example prints."""

from __future__ import annotations

import math
import re

from conftest import TINY_MODEL, write_patterned_corpus
from neurallm.cli import main
from neurallm.training.progress import IntervalMeter, format_progress_line

LINE = re.compile(r"\| epoch +(\d+) \| +(\d+)/ *(\d+) batches \| lr [0-9.e+-]+ \| ms/batch +[0-9.]+ \| loss +[0-9.]+ \| ppl +[0-9.]+")


def test_the_line_has_the_pytorch_examples_format():
    line = format_progress_line(1, 200, 2983, 20.0, 45.123, math.log(2050.23))
    assert line == "| epoch   1 |   200/ 2983 batches | lr 20.00 | ms/batch 45.12 | loss  7.63 | ppl  2050.23"


def test_a_small_learning_rate_is_not_shown_as_zero():
    assert "| lr 3.00e-03 |" in format_progress_line(2, 10, 100, 0.003, 1.0, 1.0)


def test_loss_is_the_mean_since_the_previous_line():
    meter = IntervalMeter()
    assert "| loss  3.00 |" in meter.line(1, 2, 10, 1.0, loss_sum=4.0 + 2.0, steps=2)
    assert "| loss  1.00 |" in meter.line(1, 3, 10, 1.0, loss_sum=4.0 + 2.0 + 1.0, steps=3)


def test_training_without_a_terminal_prints_a_line_every_log_interval_batches(tmp_path, capsys):
    corpus = write_patterned_corpus(tmp_path / "corpus")
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY_MODEL.items()]
    assert main(["train", "--data", str(corpus), "--out", str(tmp_path / "run"), *flags, "--log-interval", "10"]) == 0
    lines = [m for m in map(LINE.match, capsys.readouterr().out.splitlines()) if m]
    batches = int(lines[0][3])
    assert [int(m[2]) for m in lines] == [*range(10, batches, 10), batches]  # every 10 batches, and the epoch's last
    assert all(m[1] == "1" for m in lines)

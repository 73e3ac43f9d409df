"""A part of an epoch (a --max-time stop after one batch) is not counted or shown as an epoch (issue 21.6)."""

from __future__ import annotations

import json
import shutil

from conftest import write_patterned_corpus
from neurallm.cli import main


def test_a_one_batch_stop_is_logged_as_part_of_an_epoch_not_as_an_epoch(tmp_path, capsys):
    corpus = write_patterned_corpus(tmp_path / "corpus", lines=200)
    out = tmp_path / "run"
    assert main(["train", "--data", str(corpus), "--out", str(out), "--emsize", "8", "--nhid", "8", "--bptt", "8",
                 "--batch-size", "4", "--epochs", "3", "--max-time", "0.001", "--no-progress"]) == 0
    log = capsys.readouterr().out
    assert "| epoch 1 stopped after 1 of " in log
    assert "end of epoch" not in log
    [record] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert record["complete"] is False


def test_the_served_facts_count_whole_epochs_only(trained_run, tmp_path):
    from neurallm.api import load_run
    from neurallm.config import ServeConfig
    from neurallm.server.facts import model_facts

    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    whole = max(r["epoch"] for r in records)
    partial = {**records[-1], "epoch": whole + 1, "complete": False, "seconds": 0.0}
    with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(partial) + "\n")
    assert model_facts(load_run(run_dir), ServeConfig())["epochs"] == whole

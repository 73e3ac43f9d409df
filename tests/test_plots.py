"""Training curves: RUN/curves.png redrawn after every epoch, and `neurallm plot` overlaying runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import neurallm
from conftest import TINY_MODEL, write_patterned_corpus
from neurallm.cli import main
from neurallm.plots import Curves, plot_curves

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ORANGE = (255, 127, 14)  # matplotlib's C1: the second run's colour


def _pixels_of(path: Path, color: tuple[int, int, int]) -> int:
    image = np.asarray(Image.open(path).convert("RGB")).astype(int)
    return int((np.abs(image - np.array(color)).sum(axis=-1) < 30).sum())


def test_a_trained_run_leaves_curves_png(trained_run):
    path = trained_run / "curves.png"
    assert path.read_bytes().startswith(PNG_MAGIC)
    width, height = Image.open(path).size
    assert width >= 800 and height >= 300
    assert not [p.name for p in trained_run.iterdir() if p.name.startswith(".curves.png")]  # written atomically


def test_curves_are_redrawn_after_every_epoch_with_the_metrics_so_far(tmp_path, monkeypatch):
    from neurallm.training import loop

    drawn: list[list[int]] = []
    real = loop.write_run_curves

    def spy(run_dir, records, level):
        drawn.append([r["epoch"] for r in records])
        return real(run_dir, records, level)

    monkeypatch.setattr(loop, "write_run_curves", spy)
    corpus = write_patterned_corpus(tmp_path / "corpus", lines=60)
    neurallm.train(corpus, tmp_path / "run", progress=False, **{**TINY_MODEL, "epochs": 2})
    assert drawn == [[1], [1, 2]]
    assert (tmp_path / "run" / "curves.png").is_file()


def test_plot_overlays_two_runs_in_one_png(trained_run, tmp_path, capsys):
    other = tmp_path / "other-run"
    shutil.copytree(trained_run, other)
    records = [json.loads(line) for line in (other / "metrics.jsonl").read_text().splitlines()]
    shifted = [{**r, "train_loss": r["train_loss"] + 0.5, "valid_loss": r["valid_loss"] + 0.5} for r in records]
    (other / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in shifted))

    assert main(["plot", str(trained_run), "--out", str(tmp_path / "one.png")]) == 0
    assert main(["plot", str(trained_run), str(other), "--out", str(tmp_path / "both.png")]) == 0
    assert "both.png" in capsys.readouterr().out
    assert (tmp_path / "both.png").read_bytes().startswith(PNG_MAGIC)
    assert _pixels_of(tmp_path / "one.png", ORANGE) == 0
    assert _pixels_of(tmp_path / "both.png", ORANGE) > 200  # the second run's curves are drawn


def test_plot_of_a_folder_that_is_not_a_run_is_one_clean_line(tmp_path, capsys):
    assert main(["plot", str(tmp_path), "--out", str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("neurallm plot: error:") and "not a neurallm run directory" in err and "\n" not in err
    assert not (tmp_path / "x.png").exists()


def test_a_resumed_epoch_is_drawn_once_with_its_complete_record():
    records = [{"epoch": 1, "train_loss": 3.0, "valid_loss": 2.9, "lr": 20.0, "complete": True},
               {"epoch": 2, "train_loss": 9.0, "valid_loss": 9.0, "lr": 20.0, "complete": False},
               {"epoch": 2, "train_loss": 2.5, "valid_loss": 2.4, "lr": 5.0, "complete": True}]
    curves = Curves.from_metrics("run", "word", records)
    assert curves.epochs == [1, 2] and curves.valid_loss == [2.9, 2.4] and curves.lr == [20.0, 5.0]


@pytest.mark.parametrize("levels", [("char",), ("word", "char")])
def test_character_runs_and_mixed_levels_plot_too(levels, tmp_path):
    records = [{"epoch": e, "train_loss": 2.0 / e, "valid_loss": 2.1 / e, "lr": 1e-3} for e in (1, 2, 3)]
    runs = [Curves.from_metrics(f"run{i}", level, records) for i, level in enumerate(levels)]
    out = plot_curves(runs, tmp_path / "curves.png")
    assert out.read_bytes().startswith(PNG_MAGIC)


@pytest.mark.integration
def test_plot_is_a_light_command_that_never_imports_torch(trained_run, tmp_path):
    import subprocess
    import sys

    code = ("import sys; from neurallm.cli import main; "
            f"assert main(['plot', {str(trained_run)!r}, '--out', {str(tmp_path / 'c.png')!r}]) == 0; "
            "assert 'torch' not in sys.modules, 'plot imported torch'")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=120)
    assert (tmp_path / "c.png").read_bytes().startswith(PNG_MAGIC)

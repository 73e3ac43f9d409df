"""``--tensorboard``: the training scalars as event files in RUN/tensorboard/, read back with TensorBoard's own
reader; a resumed run continues the same curves."""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

import pytest

import neurallm
from neurallm.cli import main
from neurallm.errors import ConfigError
from neurallm.training.loop import Trainer

from conftest import TINY_MODEL, write_patterned_corpus

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

SETTINGS = {**TINY_MODEL, "epochs": 2, "log_interval": 5, "tensorboard": True}


def read_curves(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar curve of the run's event files: tag -> [(step, value)], as TensorBoard shows them."""
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})  # 0: keep every point
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_patterned_corpus(tmp_path_factory.mktemp("tb") / "corpus", lines=60)


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("tb-run") / "run"
    neurallm.train(corpus, run, progress=False, **SETTINGS)
    return run


def test_the_epoch_records_and_progress_figures_are_tensorboard_scalars(uninterrupted):
    curves = read_curves(uninterrupted)
    records = metrics(uninterrupted)
    windows = curves["epoch/valid_loss"][0][0]  # the first epoch ends after all its windows
    assert [step for step, _ in curves["epoch/valid_loss"]] == [windows, 2 * windows]
    for key in ("train_loss", "valid_loss", "valid_ppl", "lr", "tokens_per_s"):
        assert [value for _, value in curves[f"epoch/{key}"]] == pytest.approx([r[key] for r in records], rel=1e-6)
    assert "epoch/mfu" not in curves  # unknown on a CPU, as metrics.jsonl's null
    # every --log-interval windows and each epoch's last, as the progress line
    per_epoch = [*range(5, windows, 5), windows]
    assert [step for step, _ in curves["train/loss"]] == per_epoch + [windows + s for s in per_epoch]
    for (_, loss), (_, ppl) in zip(curves["train/loss"], curves["train/ppl"]):
        assert ppl == pytest.approx(math.exp(loss), rel=1e-5)
    assert {"train/lr", "train/tokens_per_s"} <= curves.keys()
    assert all(value > 0 for _, value in curves["train/tokens_per_s"])


def test_a_resumed_run_continues_the_same_curves_and_drops_what_came_after_its_checkpoint(corpus, uninterrupted, tmp_path,
                                                                                           monkeypatch):
    run = tmp_path / "run"
    original, calls = Trainer._step, {"n": 0}
    windows = read_curves(uninterrupted)["epoch/valid_loss"][0][0]

    def step_or_crash(self, inputs, targets):
        calls["n"] += 1
        if calls["n"] == windows + 12:  # in epoch 2, after two progress points past the epoch-1 checkpoint
            raise KeyboardInterrupt("killed")
        return original(self, inputs, targets)

    monkeypatch.setattr(Trainer, "_step", step_or_crash)
    with pytest.raises(KeyboardInterrupt):
        neurallm.train(corpus, run, progress=False, save_every=math.inf, **SETTINGS)
    crashed = read_curves(run)
    assert max(step for step, _ in crashed["train/loss"]) == windows + 10  # written past the checkpoint at `windows`
    monkeypatch.setattr(Trainer, "_step", original)

    neurallm.train(None, run, resume=True)
    resumed, reference = read_curves(run), read_curves(uninterrupted)
    assert len(os.listdir(run / "tensorboard")) == 2  # one event file per process that wrote
    for tag in ("train/loss", "train/lr", "epoch/train_loss", "epoch/valid_loss"):
        steps = [step for step, _ in resumed[tag]]
        assert steps == [step for step, _ in reference[tag]], tag  # no step twice, none missing
        assert [v for _, v in resumed[tag]] == pytest.approx([v for _, v in reference[tag]], rel=1e-6), tag


def test_force_replaces_a_run_that_holds_a_tensorboard_folder(corpus, uninterrupted, tmp_path):
    run = tmp_path / "run"
    import shutil

    shutil.copytree(uninterrupted, run)
    assert (run / "tensorboard").is_dir()
    neurallm.train(corpus, run, force=True, progress=False, **{**SETTINGS, "epochs": 1})
    assert len(read_curves(run)["epoch/valid_loss"]) == 1  # the old run's curves went with it


def test_a_folder_of_other_files_named_tensorboard_is_not_deleted_by_force(corpus, uninterrupted, tmp_path):
    run = tmp_path / "run"
    import shutil

    shutil.copytree(uninterrupted, run)
    (run / "tensorboard" / "notes.txt").write_text("mine")
    with pytest.raises(neurallm.RunDirError, match="tensorboard"):
        neurallm.train(corpus, run, force=True, progress=False, **{**SETTINGS, "epochs": 1})
    assert (run / "tensorboard" / "notes.txt").read_text() == "mine"


def test_without_the_package_it_is_one_line_before_any_run_folder_is_made(corpus, tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install 'neurallm\[tensorboard\]'"):
        neurallm.train(corpus, tmp_path / "run", progress=False, **SETTINGS)
    assert not (tmp_path / "run").exists()
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY_MODEL.items()]
    assert main(["train", "--data", str(corpus), "--out", str(tmp_path / "run"), *flags, "--tensorboard"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tensorboard" in err[0]


def test_without_the_flag_no_tensorboard_folder_is_written(corpus, tmp_path):
    neurallm.train(corpus, tmp_path / "run", progress=False, **{**SETTINGS, "tensorboard": False, "epochs": 1})
    assert not (tmp_path / "run" / "tensorboard").exists()


def test_under_torchrun_only_rank_0_writes_the_curves(corpus, tmp_path):
    from training.test_distributed import DDP_FLAGS, torchrun

    torchrun("train", "--data", str(corpus), "--out", "run", "--epochs", "2", "--tensorboard", *DDP_FLAGS, cwd=tmp_path)
    run = tmp_path / "run"
    assert len(list((run / "tensorboard").iterdir())) == 1  # one writer: rank 0's
    curves = read_curves(run)
    assert [v for _, v in curves["epoch/valid_loss"]] == pytest.approx([r["valid_loss"] for r in metrics(run)], rel=1e-6)
    # the figures of all ranks together, at rank 0's step count (each rank trains its own half of the columns)
    assert [v for _, v in curves["epoch/tokens_per_s"]] == pytest.approx([r["tokens_per_s"] for r in metrics(run)], rel=1e-6)


def test_a_tensorboard_symlink_in_a_run_is_never_followed(corpus, uninterrupted, tmp_path):
    import shutil

    run, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    shutil.copytree(uninterrupted, run)
    shutil.move(run / "tensorboard", elsewhere)
    (run / "tensorboard").symlink_to(elsewhere)
    before = sorted(p.name for p in elsewhere.iterdir())
    with pytest.raises(neurallm.RunDirError, match="tensorboard is not a folder of TensorBoard event files"):
        neurallm.train(None, run, resume=True, epochs=3)
    assert sorted(p.name for p in elsewhere.iterdir()) == before

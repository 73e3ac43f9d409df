"""A `kill -9` at any moment, or a planted or mismatched file, costs nothing and runs no code.

* Every file of a run directory is written to a temp file beside it, fsynced and renamed
  (:mod:`neurallm.fileio`), so a killed ``neurallm train`` leaves a run that ``eval``, ``generate`` and
  ``train --resume`` accept; leftover ``.NAME.*.tmp`` files are never read.
* Nothing is unpickled: weights are safetensors, everything else JSON. A pickle planted under a checkpoint's
  name is refused with one line; one planted beside the checkpoints is ignored; in neither case does it run.
* A checkpoint that does not fit its ``config.json`` is refused with an error naming the weight and shapes.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import neurallm
from neurallm import runfolder
from neurallm.cli import main
from neurallm.errors import RunDirError
from neurallm.fileio import atomic_write, atomic_write_text

from conftest import TINY_MODEL, TRAINED_RUN_EPOCHS, write_patterned_corpus

SRC = Path(neurallm.__file__).resolve().parent
RUN_FILES = set(runfolder.RUN_FILES)  # curves.png too: a kill during its write leaves its temp file
LOCK_FILE = ".neurallm.lock"  # a killed process leaves it; the kernel has released its lock
# neurallm's own temp files (.NAME.XXXX.tmp) and safetensors' (.tmpXXXXXX: its writer also goes through a temp file)
NEXT_EPOCH = str(TRAINED_RUN_EPOCHS + 1)  # `--resume --epochs NEXT_EPOCH` trains one more epoch of the session run
TEMP_FILE = re.compile(r"^\.(" + "|".join(re.escape(name) for name in RUN_FILES) + r")\..+\.tmp$|^\.tmp\w{6}$")


# --- atomic writes -------------------------------------------------------------------------------------------


def test_atomic_write_that_fails_midway_keeps_the_old_file(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"old content")

    def write_half_then_fail(tmp: Path) -> None:
        tmp.write_bytes(b"new cont")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, write_half_then_fail)
    assert path.read_bytes() == b"old content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.bin"]  # the temp file is cleaned up


def test_atomic_write_replaces_the_file_and_keeps_usual_permissions(tmp_path):
    path = tmp_path / "config.json"
    atomic_write_text(path, "one")
    atomic_write_text(path, "two")
    assert path.read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


# --- kill -9 ---------------------------------------------------------------------------------------------------

CLI_MODEL = ["--emsize", "16", "--nhid", "16", "--nlayers", "1", "--dropout", "0.3", "--bptt", "8", "--batch-size", "4",
             "--eval-batch-size", "2", "--context", "16", "--lr", "2", "--seed", "7"]
KILLS = 4


def _wait_for(condition, process: subprocess.Popen, stderr: Path, what: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"neurallm train exited ({process.returncode}) before {what}: {stderr.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def _check_run_is_usable(run: Path, capsys) -> None:
    capsys.readouterr()
    for checkpoint in ("best", "last"):
        assert main(["eval", str(run), "--json", "--checkpoint", checkpoint]) == 0, capsys.readouterr().err
        result = json.loads(capsys.readouterr().out)
        assert result["tokens"] > 0 and result["loss"] == result["loss"]  # not NaN
    assert main(["generate", str(run), "--tokens", "5", "--seed", "3"]) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.strip()


@pytest.mark.integration
def test_kill_9_at_random_moments_leaves_a_run_that_eval_generate_and_resume_accept(tmp_path, capsys):
    corpus = write_patterned_corpus(tmp_path / "corpus", lines=150)
    run = tmp_path / "run"
    stdout, stderr = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    train = [sys.executable, "-m", "neurallm", "train", "--out", str(run), "--save-every", "0", "--no-progress", "--epochs", "50"]
    delays = random.Random(2024).sample([0.05, 0.2, 0.4, 0.7, 1.0, 1.3], KILLS)
    for kill in range(KILLS):
        argv = train + ["--data", str(corpus), *CLI_MODEL] if kill == 0 else train + ["--resume"]
        with open(stdout, "w") as out, open(stderr, "w") as err:
            process = subprocess.Popen(argv, stdout=out, stderr=err, env=env)
        try:
            if kill == 0:
                _wait_for(lambda: (run / "last.safetensors").exists(), process, stderr, "the first checkpoint")
            else:  # the resumed process got past loading the killed run's checkpoint
                _wait_for(lambda: "resuming" in stdout.read_text(), process, stderr, "the resume")
            time.sleep(delays[kill])
            assert process.poll() is None, f"training ended before the kill: {stderr.read_text()[-2000:]}"
            os.kill(process.pid, signal.SIGKILL)
            assert process.wait(timeout=30) == -signal.SIGKILL
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        _check_run_is_usable(run, capsys)
        strays = {p.name for p in run.iterdir()} - RUN_FILES - {LOCK_FILE}
        assert all(TEMP_FILE.match(name) for name in strays), strays  # at most hidden temp files of a cut write

    with safe_open(str(run / "last.safetensors"), "pt") as checkpoint:
        state = json.loads(checkpoint.metadata()["neurallm_state"])
    epochs = state["epoch"] + 1
    assert main(["train", "--out", str(run), "--resume", "--epochs", str(epochs), "--no-progress"]) == 0, capsys.readouterr().err
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["complete"]] == list(range(1, epochs + 1))
    assert json.loads((run / "results.json").read_text())["stopped_by"] == "epochs"
    _check_run_is_usable(run, capsys)


DIE_WHILE_WRITING = """
import os, signal, sys
from pathlib import Path
from neurallm.cli import main
from neurallm.training import checkpoint

target, count, real_save_file = sys.argv[1], int(sys.argv[2]), checkpoint.save_file
writes = 0

def save_file_then_die(tensors, filename, metadata=None):
    # write the file, cut it in half as a disk write interrupted by the kill would, and die without cleanup
    global writes
    real_save_file(tensors, filename, metadata=metadata)
    if target in Path(filename).name:
        writes += 1
        if writes == count:
            os.truncate(filename, os.path.getsize(filename) // 2)
            os.kill(os.getpid(), signal.SIGKILL)

checkpoint.save_file = save_file_then_die
sys.exit(main(sys.argv[3:]))
"""


# last.safetensors: its 3rd write (after step 3 of the resumed epoch); model.safetensors: its 1st write, at the end
# of the resumed epoch (which improves on the ones before, so the best model is saved)
@pytest.mark.parametrize("target, count", [("last.safetensors", 3), ("model.safetensors", 1)])
@pytest.mark.integration
def test_kill_9_in_the_middle_of_a_checkpoint_write(run_copy, capsys, target, count):
    """The worst moment, made certain: the process dies with a half-written checkpoint on disk."""
    run = run_copy
    argv = ["train", "--out", str(run), "--resume", "--epochs", NEXT_EPOCH, "--save-every", "0", "--no-progress"]
    result = subprocess.run([sys.executable, "-c", DIE_WHILE_WRITING, target, str(count), *argv],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr
    _check_run_is_usable(run, capsys)
    assert main(argv) == 0, capsys.readouterr().err
    _check_run_is_usable(run, capsys)


# --- no code from data -------------------------------------------------------------------------------------------


class Payload:
    """Unpickling this creates ``marker``: the stand-in for arbitrary code run by a malicious pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_the_planted_payload_would_run_if_unpickled(tmp_path):
    marker = tmp_path / "control-marker"
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()  # so the marker staying absent below means nothing unpickled it


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("name, writer", [("model.safetensors", "pickle"), ("model.safetensors", "torch.save"),
                                          ("last.safetensors", "pickle"), ("last.safetensors", "torch.save")])
def test_a_pickle_planted_as_a_checkpoint_is_refused_and_never_runs(run_copy, tmp_path, capsys, name, writer):
    marker = tmp_path / "marker"
    if writer == "pickle":
        (run_copy / name).write_bytes(pickle.dumps(Payload(marker)))
    else:
        torch.save({"state_dict": Payload(marker)}, run_copy / name)
    checkpoint = "best" if name == "model.safetensors" else "last"
    commands = [["eval", str(run_copy), "--checkpoint", checkpoint], ["generate", str(run_copy), "--checkpoint", checkpoint]]
    if name == "last.safetensors":
        commands.append(["train", "--out", str(run_copy), "--resume", "--epochs", NEXT_EPOCH])
    for argv in commands:
        capsys.readouterr()
        assert main(argv) == 1
        assert f"{name} is not a readable safetensors file" in _one_error_line(capsys)
    assert not marker.exists()


def test_pickles_planted_beside_the_checkpoints_are_ignored(run_copy, tmp_path, capsys):
    marker = tmp_path / "marker"
    for name in ("model.pt", "pytorch_model.bin", "optimizer.pt", "vocab.pkl", "training_args.bin"):
        torch.save(Payload(marker), run_copy / name)
    assert main(["eval", str(run_copy), "--json"]) == 0
    assert main(["generate", str(run_copy), "--tokens", "3"]) == 0
    assert main(["train", "--out", str(run_copy), "--resume", "--epochs", NEXT_EPOCH, "--no-progress"]) == 0
    assert not marker.exists()


def test_the_source_never_unpickles():
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            code = line.split("#", 1)[0]
            if re.search(r"\bpickle\.loads?\(|\bimport pickle\b|\bdill\b|\bjoblib\b|allow_pickle\s*=\s*True", code):
                offenders.append(f"{path.name}:{number}: {line.strip()}")
            if "torch.load(" in code and "weights_only=True" not in code:
                offenders.append(f"{path.name}:{number}: {line.strip()}")
            if re.search(r"\bnp\.load\(", code) and "allow_pickle=False" not in code:
                offenders.append(f"{path.name}:{number}: {line.strip()}")
    assert not offenders, offenders


# --- checkpoint against config ---------------------------------------------------------------------------------------


def _edit_config(run: Path, section: str, key: str, value) -> None:
    config = json.loads((run / "config.json").read_text())
    config[section][key] = value
    (run / "config.json").write_text(json.dumps(config))


def test_a_config_with_other_layer_sizes_is_refused_naming_the_weight_shapes(run_copy, capsys):
    _edit_config(run_copy, "model", "nhid", 32)
    # the LSTM's input weights stack 4 gates: (4·nhid, emsize)
    expected = r"model.safetensors: weight rnn.weight_ih_l0 has shape \(64, 16\) but config.json implies \(128, 16\)"
    with pytest.raises(RunDirError, match=expected):
        neurallm.load_run(run_copy)
    assert main(["eval", str(run_copy)]) == 1
    assert "the checkpoint and config do not match" in _one_error_line(capsys)


def test_a_config_with_another_vocabulary_size_is_refused(run_copy, capsys):
    size = len(json.loads((run_copy / "vocab.json").read_text())["tokens"])
    _edit_config(run_copy, "model", "vocab_size", size + 5)
    assert main(["generate", str(run_copy)]) == 1
    assert f"vocab.json has {size} tokens but config.json says {size + 5}" in _one_error_line(capsys)


def test_a_vocabulary_that_grew_is_refused_naming_the_embedding_shape(run_copy):
    vocab = json.loads((run_copy / "vocab.json").read_text())
    vocab["tokens"].append("newword")
    (run_copy / "vocab.json").write_text(json.dumps(vocab))
    _edit_config(run_copy, "model", "vocab_size", len(vocab["tokens"]))
    n, d = len(vocab["tokens"]) - 1, TINY_MODEL["emsize"]
    with pytest.raises(RunDirError, match=re.escape(f"has shape ({n}, {d}) but config.json implies ({n + 1}, {d})")):
        neurallm.load_run(run_copy)


def test_a_checkpoint_from_another_run_is_refused_on_resume(run_copy, tmp_path):
    other = tmp_path / "other"
    neurallm.train(write_patterned_corpus(tmp_path / "corpus2", lines=60), other,
                   **{**TINY_MODEL, "eval_context": 8, "nhid": 24})
    shutil.copy(other / "last.safetensors", run_copy / "last.safetensors")
    with pytest.raises(RunDirError, match="last.safetensors: weight .* has shape"):
        neurallm.train(None, run_copy, resume=True, epochs=TRAINED_RUN_EPOCHS + 1)


def test_weights_without_training_state_cannot_be_resumed(run_copy):
    shutil.copy(run_copy / "model.safetensors", run_copy / "last.safetensors")
    with pytest.raises(RunDirError, match="holds no training state"):
        neurallm.train(None, run_copy, resume=True, epochs=TRAINED_RUN_EPOCHS + 1)


@pytest.mark.parametrize("name, content, expected", [
    ("config.json", '{"model": {"nhid": 1', "config.json cannot be read as JSON"),
    ("config.json", '{"model": {}}', "not a complete neurallm run configuration"),
    ("vocab.json", '{"words": []}', "vocab.json is not a neurallm vocabulary"),
    ("vocab.json", b"\xff\xfe\x00", "vocab.json cannot be read"),
    ("model.safetensors", b"", "model.safetensors is not a readable safetensors file"),
], ids=["config-truncated", "config-incomplete", "vocab-wrong-key", "vocab-binary", "weights-empty"])
def test_a_damaged_run_file_is_one_clean_line(run_copy, capsys, name, content, expected):
    path = run_copy / name
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    assert main(["eval", str(run_copy)]) == 1
    assert expected in _one_error_line(capsys)


# --- crafted folders are refused before anything big is built; a full disk is one line ----------------------


def _set_model_config(run: Path, **model) -> None:
    config = json.loads((run / "config.json").read_text())
    config["model"].update(model)
    (run / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("checkpoint", ["best", "last"])
def test_the_checkpoint_header_is_compared_with_the_config_before_the_model_is_built(run_copy, monkeypatch, checkpoint):
    """nhid 20000 in config.json would allocate gigabytes; the header's shapes refuse it first."""
    import neurallm.api

    def no_build(config):
        raise AssertionError(f"built a model of nhid {config.nhid} before comparing the checkpoint's shapes")

    monkeypatch.setattr(neurallm.api, "build_model", no_build)
    _set_model_config(run_copy, nhid=20000)
    with pytest.raises(RunDirError, match=r"weight rnn\.weight_ih_l0 has shape \(64, 16\) but config.json implies \(80000, 16\)"):
        neurallm.load_run(run_copy, checkpoint=checkpoint)


def test_resume_compares_the_header_before_the_trainer_builds_the_model(run_copy, monkeypatch):
    import neurallm.training.loop

    monkeypatch.setattr(neurallm.training.loop, "build_model", lambda config: pytest.fail("model built before the check"))
    _set_model_config(run_copy, nhid=20000)
    with pytest.raises(RunDirError, match=r"config.json implies \(80000, 16\)"):
        neurallm.train(None, run_copy, resume=True)


def test_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_previous_checkpoint(run_copy, monkeypatch, capsys):
    """safetensors raises its own error type for a full disk; it reaches the user as one line, nothing lost."""
    from safetensors import SafetensorError

    import neurallm.training.checkpoint as ckpt

    before = (run_copy / "last.safetensors").read_bytes()
    real_save_file = ckpt.save_file

    def fill_the_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"the first bytes of a checkpoint")
        raise SafetensorError('Error while serializing: I/O error: No space left on device (os error 28) at path "x"')

    monkeypatch.setattr(ckpt, "save_file", fill_the_disk)
    assert main(["train", "--out", str(run_copy), "--resume", "--epochs", NEXT_EPOCH, "--save-every", "0", "--no-progress"]) == 1
    err = _one_error_line(capsys)
    assert "no space left on the device" in err.lower()
    monkeypatch.setattr(ckpt, "save_file", real_save_file)
    assert (run_copy / "last.safetensors").read_bytes() == before
    assert not [p.name for p in run_copy.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]

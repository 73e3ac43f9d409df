"""Prepared folders are all-old or all-new, are checked when loaded, survive a full disk, and never overwrite
anything prepare did not write (issue 11, items 1, 2 and 4)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

from conftest import write_patterned_corpus
from neurallm.data import stream
from neurallm.data.prepare import prepare
from neurallm.data.sources import SPLITS
from neurallm.data.stream import load_prepared
from neurallm.errors import DataError, DiskFullError
from neurallm.fileio import atomic_write

REPO = Path(__file__).resolve().parents[2]


def _corpus(folder: Path, lines: int, seed: int) -> Path:
    return write_patterned_corpus(folder, lines=lines, seed=seed)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _leftovers(parent: Path, *keep: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name not in keep)


# --- all-old or all-new ------------------------------------------------------------------------------------


class Interrupted(BaseException):
    """Stands for Ctrl-C or a kill in the middle of writing the splits."""


def test_an_interrupted_re_prepare_leaves_the_previous_folder_whole(tmp_path, monkeypatch):
    a, b = _corpus(tmp_path / "a", 60, 1), _corpus(tmp_path / "b", 90, 2)
    out = tmp_path / "prepared"
    prepare(a, out)
    before = _snapshot(out)
    real_write_split = stream._Writer._write_split

    def write_train_then_die(self, spool, bounds, remap, unknown, path, split):
        if split == "valid":  # train.npy of B is written by now
            raise Interrupted
        return real_write_split(self, spool, bounds, remap, unknown, path, split)

    monkeypatch.setattr(stream._Writer, "_write_split", write_train_then_die)
    with pytest.raises(Interrupted):
        prepare(b, out)
    assert _snapshot(out) == before  # A's train.npy, vocabulary and meta, nothing of B
    assert _leftovers(tmp_path, "a", "b", "prepared") == []  # the temp folder is gone
    monkeypatch.undo()
    assert load_prepared(out).meta["key"] == prepare(a, tmp_path / "again").meta["key"]


def test_a_finished_re_prepare_replaces_the_whole_folder(tmp_path):
    a, b = _corpus(tmp_path / "a", 60, 1), _corpus(tmp_path / "b", 90, 2)
    out = tmp_path / "prepared"
    prepare(a, out)
    new = prepare(b, out)
    assert load_prepared(out).meta == new.meta
    assert new.meta["key"] == prepare(b, tmp_path / "b-alone").meta["key"]
    assert _leftovers(tmp_path, "a", "b", "prepared", "b-alone") == []


# --- loading checks the folder -----------------------------------------------------------------------------


def _other_train_ids(tmp: Path, out: Path) -> None:
    other = prepare(_corpus(tmp / "other-corpus", 90, 2), tmp / "other")
    shutil.copy(other.folder / "train.npy", out / "train.npy")


def _shorter(tmp: Path, out: Path) -> None:
    np.save(out / "valid.npy", np.load(out / "valid.npy")[:-1])


def _wider_dtype(tmp: Path, out: Path) -> None:
    np.save(out / "valid.npy", np.load(out / "valid.npy").astype(np.uint32))


def _two_dimensional(tmp: Path, out: Path) -> None:
    ids = np.load(out / "test.npy")
    np.save(out / "test.npy", ids[: len(ids) // 2 * 2].reshape(2, -1))


def _one_id_changed(tmp: Path, out: Path) -> None:
    ids = np.load(out / "train.npy")
    ids[5] = (ids[5] + 1) % 20
    np.save(out / "train.npy", ids)


def _id_beyond_the_vocabulary(tmp: Path, out: Path) -> None:
    """An id ≥ the vocabulary size, with meta.json rewritten to match the new digest: the max-id check catches it."""
    ids = np.load(out / "train.npy")
    ids[0] = 250
    np.save(out / "train.npy", ids)
    meta = json.loads((out / "meta.json").read_text())
    meta["arrays"]["train"]["max_id"] = 250
    meta["arrays"]["train"]["sha256"] = __import__("hashlib").sha256(ids.tobytes()).hexdigest()
    (out / "meta.json").write_text(json.dumps(meta))


def _truncated(tmp: Path, out: Path) -> None:
    data = (out / "train.npy").read_bytes()
    (out / "train.npy").write_bytes(data[:-7])


@pytest.mark.parametrize("damage, file, what", [
    (_other_train_ids, "train.npy", "ids, meta.json says"),
    (_shorter, "valid.npy", "ids, meta.json says"),
    (_wider_dtype, "valid.npy", "dtype uint32, meta.json says |u1"),
    (_two_dimensional, "test.npy", "expected one dimension"),
    (_one_id_changed, "train.npy", "SHA-256 differs"),
    (_id_beyond_the_vocabulary, "train.npy", "largest id 250 is not below the vocabulary size"),
    (_truncated, "train.npy", "size does not match its header"),
], ids=lambda v: v.__name__.strip("_") if callable(v) else None)
def test_a_folder_whose_arrays_do_not_match_its_meta_is_refused_with_one_line(damage, file, what, tmp_path):
    out = tmp_path / "prepared"
    prepare(_corpus(tmp_path / "corpus", 60, 1), out)
    damage(tmp_path, out)
    with pytest.raises(DataError) as error:
        load_prepared(out)
    message = str(error.value)
    assert "\n" not in message
    assert f"{out / file} does not match {out / 'meta.json'}" in message
    assert what in message
    assert "run `neurallm prepare` again" in message


def test_preparing_again_over_a_damaged_folder_rebuilds_it(tmp_path):
    corpus = _corpus(tmp_path / "corpus", 60, 1)
    out = tmp_path / "prepared"
    good = prepare(corpus, out)
    _other_train_ids(tmp_path, out)
    again = prepare(corpus, out)  # the same files and settings, but the folder fails its check: rebuilt
    assert np.array_equal(again.ids("train"), np.load(tmp_path / "other" / "train.npy")) is False
    assert again.meta == good.meta
    load_prepared(out)


def test_a_folder_from_the_previous_format_asks_for_prepare_again(tmp_path):
    out = tmp_path / "prepared"
    prepare(_corpus(tmp_path / "corpus", 60, 1), out)
    meta = json.loads((out / "meta.json").read_text())
    (out / "meta.json").write_text(json.dumps({**meta, "format_version": 1}))
    with pytest.raises(DataError, match="prepared by another neurallm version .* run `neurallm prepare` again"):
        load_prepared(out)


# --- prepare --out writes only into its own folders ---------------------------------------------------------


def test_prepare_refuses_a_run_folder_and_leaves_its_files_alone(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "vocab.json").write_text('{"tokens": ["<unk>", "<eos>", "the"]}', encoding="utf-8")
    (run / "config.json").write_text("{}", encoding="utf-8")
    before = _snapshot(run)
    with pytest.raises(DataError, match="holds files prepare did not write \\(config.json\\)"):
        prepare(_corpus(tmp_path / "corpus", 60, 1), run)
    assert _snapshot(run) == before


def test_prepare_refuses_a_folder_whose_meta_json_is_not_ours(tmp_path):
    out = tmp_path / "other-tool"
    out.mkdir()
    (out / "meta.json").write_text('{"author": "someone else"}', encoding="utf-8")
    with pytest.raises(DataError, match="a meta.json that is not neurallm's"):
        prepare(_corpus(tmp_path / "corpus", 60, 1), out)
    assert (out / "meta.json").read_text(encoding="utf-8") == '{"author": "someone else"}'


def test_prepare_refuses_its_own_output_with_a_stranger_added(tmp_path):
    out = tmp_path / "prepared"
    prepare(_corpus(tmp_path / "corpus", 60, 1), out)
    (out / "notes.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(DataError, match="notes.txt"):
        prepare(_corpus(tmp_path / "corpus", 60, 1), out, lowercase=True)
    assert (out / "notes.txt").read_text(encoding="utf-8") == "mine"


def test_prepare_writes_into_an_empty_folder(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    prepare(_corpus(tmp_path / "corpus", 60, 1), out)
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "test.npy", "train.npy", "valid.npy", "vocab.json"]


# --- a full disk -------------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MB tmpfs: a real full disk (needs root); skipped where mounting is not allowed."""
    mount_point = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
                             capture_output=True).returncode == 0
    if not mounted:
        pytest.skip("cannot mount a tmpfs here (not root); test_a_full_disk_simulated covers the same path")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=False)


@pytest.mark.integration
def test_a_full_disk_during_prepare_is_one_line_and_keeps_the_previous_folder(small_disk, shared_data, tmp_path):
    out = small_disk / "prepared"
    prepare(_corpus(tmp_path / "corpus", 60, 1), out)
    before = _snapshot(out)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    # a subprocess: a SIGBUS (what filling a memory map of a full disk gets) would kill pytest itself
    done = subprocess.run([sys.executable, "-m", "neurallm", "prepare", "--data", str(shared_data / "wt2-lite"),
                           "--out", str(out)], capture_output=True, text=True, env=env)
    assert done.returncode == 1, (done.returncode, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"neurallm prepare: error: {out}: no space left on the device (")
    assert " free, about " in lines[0] and " MB needed)" in lines[0]
    assert _snapshot(out) == before
    assert _leftovers(small_disk, "prepared") == []  # no temp folder, no temp file


def test_a_full_disk_simulated(tmp_path, monkeypatch):
    """Where no tmpfs can be mounted: the space reservation before writing ids says the disk is full."""
    out = tmp_path / "prepared"
    prepare(_corpus(tmp_path / "corpus", 60, 1), out)
    before = _snapshot(out)

    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    with pytest.raises(DiskFullError, match=f"{out}: no space left on the device"):
        prepare(_corpus(tmp_path / "corpus-b", 90, 2), out)
    assert _snapshot(out) == before
    assert _leftovers(tmp_path, "prepared", "corpus", "corpus-b") == []


def test_a_full_disk_during_a_checkpoint_write_is_one_error_and_keeps_the_previous_file(small_disk):
    from safetensors.torch import save_file
    import torch

    path = small_disk / "model.safetensors"
    save_file({"w": torch.zeros(1000)}, str(path))
    before = path.read_bytes()
    big = {"w": torch.zeros(1 << 19)}  # 2 MB on a 1 MB disk: safetensors raises its own SafetensorError
    with pytest.raises(DiskFullError) as error:
        atomic_write(path, lambda tmp: save_file(big, str(tmp)), size=2_097_240)
    assert str(error.value).startswith(f"{path}: no space left on the device (")
    assert "about 2.1 MB needed" in str(error.value)
    assert path.read_bytes() == before
    assert _leftovers(small_disk, "model.safetensors") == []


def test_a_full_disk_during_a_plain_atomic_write(small_disk):
    path = small_disk / "metrics.json"
    path.write_text("old", encoding="utf-8")
    with pytest.raises(DiskFullError, match="metrics.json: no space left on the device"):
        atomic_write(path, lambda tmp: tmp.write_bytes(b"x" * (2 << 20)))
    assert path.read_text(encoding="utf-8") == "old"
    assert _leftovers(small_disk, "metrics.json") == []


def test_every_split_is_checked_in_a_fresh_folder(tmp_path):
    prepared = prepare(_corpus(tmp_path / "corpus", 60, 1), tmp_path / "p")
    assert set(prepared.meta["arrays"]) == set(SPLITS)
    for split in SPLITS:
        ids = prepared.ids(split)
        assert prepared.meta["arrays"][split]["max_id"] == int(ids.max()) < len(prepared.vocab)


def test_the_temp_folder_of_a_killed_prepare_is_removed_by_the_next_one(tmp_path):
    corpus = _corpus(tmp_path / "corpus", 60, 1)
    out = tmp_path / "prepared"
    killed = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    orphan = tmp_path / f".prepared.{killed.pid}.abc123.tmp"  # what a prepare killed with -9 leaves
    orphan.mkdir()
    (orphan / "train.npy").write_bytes(b"half")
    killed.kill()
    killed.wait()
    alive = tmp_path / f".prepared.{os.getpid()}.def456.tmp"  # a prepare still running: left alone
    alive.mkdir()
    prepare(corpus, out)
    assert not orphan.exists()
    assert alive.exists()


def test_a_run_preparing_the_cached_copy_that_another_process_is_writing_waits_and_reuses_it(tmp_path, caplog):
    """Two runs of a sweep started together on one corpus: the second waits for the cache, it is not refused."""
    import threading
    from neurallm.locking import lock_folder

    corpus = _corpus(tmp_path / "a", 60, 1)
    folder = prepare(corpus).folder  # the cache folder of this corpus, which the other run is about to write
    written = tmp_path / "written"
    folder.rename(written)
    results = []
    with caplog.at_level("INFO", logger="neurallm.locking"):
        with lock_folder(folder, "a prepared corpus", beside=True):  # the other run, in the middle of writing it
            waiter = threading.Thread(target=lambda: results.append(prepare(corpus)))
            waiter.start()
            waiter.join(timeout=2.0)
            assert waiter.is_alive() and results == [] and not folder.exists()  # waiting, writing nothing
            written.rename(folder)  # the other run swaps its finished folder in, then releases the lock
            inode = folder.stat().st_ino
        waiter.join(timeout=60)
    assert not waiter.is_alive()
    [prepared] = results
    assert prepared.folder == folder and folder.stat().st_ino == inode  # reused, not written again
    assert [r.getMessage() for r in caplog.records if "waiting for another neurallm process" in r.getMessage()] == [
        f"waiting for another neurallm process (PID {os.getpid()}, writing a prepared corpus) to finish {folder}"]


def test_a_second_process_writing_the_same_prepared_folder_is_refused_naming_the_first(tmp_path, capsys):
    """The lock lies beside the folder (the folder itself is swapped in whole) and is taken only to write."""
    from neurallm.cli import main
    from neurallm.locking import lock_folder

    corpus, out = _corpus(tmp_path / "a", 60, 1), tmp_path / "prepared"
    with lock_folder(out, "a prepared corpus", beside=True):  # another process in the middle of writing it
        assert main(["prepare", "--data", str(corpus), "--out", str(out)]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"PID {os.getpid()}, writing a prepared corpus" in err[0] and str(out) in err[0]
        assert not out.exists()
    assert main(["prepare", "--data", str(corpus), "--out", str(out)]) == 0  # released: it goes ahead
    assert load_prepared(out).meta["splits"]["train"]["tokens"] > 0
    assert _leftovers(tmp_path) == ["a", "prepared"]  # the lock file went with its release
    # a finished folder is read without the lock, so readers never wait for a writer elsewhere
    with lock_folder(out, "a prepared corpus", beside=True):
        assert main(["prepare", "--data", str(corpus), "--out", str(out)]) == 0

"""One writer per folder: a second process is refused with the holder's PID; a dead holder blocks nobody."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from neurallm.errors import FolderInUseError
from neurallm.locking import LOCK_FILE, check_not_locked, lock_folder

HOLD = "import sys, time; from neurallm.locking import lock_folder; lock_folder(sys.argv[1], 'a test'); print('held', flush=True); time.sleep(60)"


@pytest.fixture
def holder(tmp_path):
    """Another process holding the lock of tmp_path/folder."""
    folder = tmp_path / "folder"
    folder.mkdir()
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    yield folder, process
    if process.poll() is None:
        process.kill()
    process.wait()


@pytest.mark.integration
def test_a_second_process_is_refused_with_the_holders_pid(holder):
    folder, process = holder
    with pytest.raises(FolderInUseError, match=f"in use by another neurallm process \\(PID {process.pid}, writing a test\\)"):
        lock_folder(folder, "a run")
    with pytest.raises(FolderInUseError, match=f"PID {process.pid}"):
        check_not_locked(folder)


@pytest.mark.integration
def test_the_lock_of_a_killed_process_is_free_at_once(holder):
    folder, process = holder
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert (folder / LOCK_FILE).exists()  # kill -9 leaves the file, but the kernel dropped the lock
    check_not_locked(folder)
    with lock_folder(folder, "a run"):
        assert (folder / LOCK_FILE).read_text().strip() == f"{os.getpid()} a run"


def test_release_removes_the_lock_file_and_a_released_folder_can_be_locked_again(tmp_path):
    with lock_folder(tmp_path, "a run"):
        with pytest.raises(FolderInUseError, match=f"PID {os.getpid()}"):
            lock_folder(tmp_path, "a run")  # a second lock in the same process is refused too
    assert not (tmp_path / LOCK_FILE).exists()
    lock_folder(tmp_path, "a run").release()


def test_checking_a_folder_creates_nothing(tmp_path):
    check_not_locked(tmp_path)
    assert list(tmp_path.iterdir()) == []


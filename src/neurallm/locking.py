"""One writer per folder: an exclusive lock held for as long as a process writes a run or a prepared corpus.

Two processes writing one run folder (``--force`` on a run that is training, two ``--resume``) used to mix
two runs' files, and one process's temp-file cleanup deleted the other's half-written checkpoint. Now a writer
holds ``fcntl.flock`` on ``FOLDER/.neurallm.lock``, which holds its PID, from before its first write until it
is done; a second writer gets one line naming that PID. The kernel drops the lock when the holder dies, even
by ``kill -9``, so a stale lock file never blocks anyone: the next writer simply takes it.

Readers (``eval``, ``generate``, loading a prepared corpus) take no lock: every file is replaced atomically,
so they see whole files, each either the old or the new version.

The one writer that waits instead of being refused is a run preparing the shared cache's copy of a corpus
(``wait=True``): two runs of a sweep started together on one corpus both want the same cache folder, the user
chose neither that folder nor the order, and the second can use what the first writes.

The lock file is removed on release. A process that opened it just before may then hold a lock on a file
that is no longer in the folder, so :func:`lock_folder` checks, once it holds the lock, that the file it
locked is still the one at the path, and tries again if not.
"""

from __future__ import annotations

import fcntl
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from neurallm.errors import FolderInUseError

LOCK_FILE = ".neurallm.lock"

logger = logging.getLogger(__name__)


@dataclass
class FolderLock:
    """An exclusive lock on ``folder``, held until :meth:`release` (or the process ends).

    Attributes:
        folder: the locked folder.
        fd: the open lock file that carries the ``flock``.
        path: that lock file (inside the folder, or beside it for a folder that is replaced whole).
    """

    folder: Path
    fd: int
    path: Path

    def release(self) -> None:
        if self.fd < 0:
            return
        # unlink while still holding the lock: a waiter that opened this file notices and opens the new one
        try:
            if _same_file(self.fd, self.path):
                self.path.unlink()
        except OSError:
            pass
        os.close(self.fd)
        self.fd = -1

    def __enter__(self) -> "FolderLock":
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.release()


def _same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (on_disk.st_dev, on_disk.st_ino)


def _holder(path: Path) -> str:
    """"PID 1234, writing a training run", from the lock file's "PID WHAT" line."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            pid, _, what = f.read(200).strip().partition(" ")
    except OSError:
        pid, what = "", ""
    if not pid.isdigit():
        return "a process that is just starting"
    return f"PID {pid}, writing {what}" if what else f"PID {pid}"


def _busy(folder: Path, path: Path) -> FolderInUseError:
    return FolderInUseError(
        f"{folder} is in use by another neurallm process ({_holder(path)}); "
        "wait for it to finish or stop it (Ctrl-C), or use another folder"
    )


def lock_folder(folder: Path, what: str, *, beside: bool = False, wait: bool = False) -> FolderLock:
    """Take the exclusive lock of ``folder`` for this process, or raise naming the holder's PID.

    Args:
        folder: the folder to lock (must exist unless ``beside``).
        what: what this process writes, kept in the lock file for the error a second process gets ("a training run").
        beside: keep the lock file next to the folder (``.NAME.neurallm.lock``) rather than in it: for a folder that
            is written elsewhere and swapped in whole (a prepared corpus), which would swap a lock inside it away.
        wait: wait for the holder to release the lock (saying so once) instead of raising.
    """
    folder = Path(folder)
    path = folder.parent / f".{folder.name}{LOCK_FILE}" if beside else folder / LOCK_FILE
    said_waiting = False
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not wait:
                    raise _busy(folder, path) from None
                if not said_waiting:
                    logger.info(f"waiting for another neurallm process ({_holder(path)}) to finish {folder}")
                    said_waiting = True
                fcntl.flock(fd, fcntl.LOCK_EX)  # Ctrl-C interrupts the wait
        except BaseException:
            os.close(fd)
            raise
        if _same_file(fd, path):
            break
        os.close(fd)  # the holder released and unlinked it between our open and flock: take the new file
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()} {what}\n".encode())
    return FolderLock(folder, fd, path)


def check_not_locked(folder: Path) -> None:
    """Raise naming the holder's PID if another process holds ``folder``'s lock; create and change nothing."""
    path = Path(folder) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return  # no lock file: nobody holds it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _busy(Path(folder), path) from None
    finally:
        os.close(fd)

"""Crash-safe file writes: temp file in the same folder, fsync, rename.

A reader (or a `kill -9`) at any moment sees either the old file or the new one, never half a file,
because ``os.replace`` within one file system is atomic. :func:`atomic_folder` does the same for a whole
folder. A full disk is reported as one :class:`DiskFullError` line naming the path and the space needed;
the previous version stays and the temp files are removed.

The atomic writer renames only over a regular file (or nothing): whatever path it is given, it never turns a
device, a FIFO, a socket, a folder or a symlink into a regular file. Which paths a user may name as outputs is
:mod:`neurallm.outputs`'s decision.

Reads of files a user or a crafted folder may have replaced go through :func:`read_bounded_text`: a size cap,
a regular file only, and an open that cannot hang on a FIFO.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from neurallm.errors import DiskFullError, NeurallmError, OutputPathError, RunDirError


TEMP_SUFFIX = ".tmp"
# safetensors' writer goes through a temp file of its own, named like tempfile's default: ".tmp" + 6 characters
_TEMP_NAMES = re.compile(r"\..+" + re.escape(TEMP_SUFFIX) + r"|\.tmp\w{6}")


def is_temp_file(name: str) -> bool:
    """Whether ``name`` is a temp file of an atomic write (ours or safetensors'), left behind if the writer died."""
    return _TEMP_NAMES.fullmatch(name) is not None


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` says the disk (or the user's quota) is full; safetensors raises its own type for it."""
    if isinstance(exc, NeurallmError):
        return False  # already a message for the user
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(exc)
    return "(os error 28)" in text or "No space left on device" in text or "(os error 122)" in text


def format_size(n_bytes: float) -> str:
    """``2_097_240`` → ``"2.1 MB"`` (decimal units, as disk sizes are sold and ``df -H`` shows them)."""
    units = ("bytes", "KB", "MB", "GB", "TB")
    step = 0
    while n_bytes >= 1000 and step < len(units) - 1:
        n_bytes, step = n_bytes / 1000, step + 1
    return f"{n_bytes:,.0f} bytes" if step == 0 else f"{n_bytes:,.1f} {units[step]}"


def disk_full_error(path: Path, needed: int) -> DiskFullError:
    """The one-line error for a write to ``path`` that ran out of space; ``needed``: bytes the write takes."""
    try:
        free = shutil.disk_usage(Path(path).parent).free
    except OSError:
        free = 0
    return DiskFullError(f"{path}: no space left on the device ({format_size(free)} free, about "
                         f"{format_size(needed)} needed); free some space or write elsewhere, then run it again")


@contextmanager
def atomic_path(path: Path, size: int | None = None, *, create_parent: bool = True) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success fsync it and rename it over ``path``.

    ``size`` (bytes the write will take, when known) goes into the message should the disk fill up.
    ``create_parent=False`` raises FileNotFoundError when the folder is gone instead of making it again: a run
    folder deleted while training must not come back holding one stray file.
    """
    path = Path(path)
    check_replaceable(path)  # before the work: a refusal costs nothing
    if create_parent:
        path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        os.chmod(tmp, 0o666 & ~_current_umask())  # mkstemp makes 0600 files; give the user's usual permissions
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        check_replaceable(path)  # and again: the path may have changed while the file was written
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except Exception as exc:
        if not is_disk_full(exc):
            raise
        written = tmp.stat().st_size if tmp.exists() else 0
        previous = path.stat().st_size if path.is_file() else 0
        raise disk_full_error(path, size or max(written, previous)) from exc
    finally:
        if tmp.exists():
            tmp.unlink()


def file_kind(mode: int) -> str:
    """What a file of ``mode`` is, in the words of an error message."""
    for test, name in ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a folder"), (stat.S_ISLNK, "a symlink"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def check_replaceable(path: Path) -> None:
    """Raise unless ``path`` is absent or a regular file: the only things an atomic rename may replace.

    A rename over a device, FIFO, socket or symlink would silently swap it for a regular file (as root,
    ``/dev/null`` itself); over a folder it fails with an unhelpful OS error.
    """
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise OutputPathError(f"{path} cannot be checked ({exc.strerror or exc}); nothing was written") from None
    if not stat.S_ISREG(mode):
        raise OutputPathError(f"{path} is {file_kind(mode)}; neurallm replaces only regular files, so nothing was written: "
                              "remove it or write elsewhere")


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    # The rename itself lives in the directory entry; without this a power cut can undo it.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], None], size: int | None = None, *, create_parent: bool = True) -> None:
    """Call ``write(temp_path)`` and move the result to ``path`` atomically (arguments: see :func:`atomic_path`)."""
    with atomic_path(path, size, create_parent=create_parent) as tmp:
        write(tmp)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


@contextmanager
def atomic_folder(folder: Path) -> Iterator[Path]:
    """Yield a fresh temp folder beside ``folder``; on success it takes ``folder``'s place in one step.

    Readers see the old folder or the new one, never a mix of their files. Where Linux can swap two folders
    atomically (``renameat2`` with ``RENAME_EXCHANGE``) it does; elsewhere the old folder is first renamed
    aside, so a crash between the two renames leaves no ``folder`` (never a mixed one) and the old one under a
    temp name. The old folder is deleted after the swap; on failure the temp folder is.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphans(folder)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.{os.getpid()}.", suffix=TEMP_SUFFIX, dir=folder.parent))
    try:
        os.chmod(tmp, 0o777 & ~_current_umask())
        yield tmp
        for child in tmp.iterdir():
            with open(child, "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(tmp)
        if folder.exists() and _exchange(tmp, folder):
            pass  # tmp now names the old folder
        elif folder.exists():
            aside = Path(tempfile.mkdtemp(prefix=f".{folder.name}.{os.getpid()}.", suffix=TEMP_SUFFIX, dir=folder.parent))
            os.replace(folder, aside)  # replaces the empty placeholder folder
            os.replace(tmp, folder)
            tmp = aside
        else:
            os.replace(tmp, folder)
        _fsync_dir(folder.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_orphans(folder: Path) -> None:
    """Delete temp folders of :func:`atomic_folder` for ``folder`` whose process is gone (killed with -9)."""
    orphan = re.compile(re.escape(f".{folder.name}.") + r"(\d+)\.\w+" + re.escape(TEMP_SUFFIX))
    for sibling in folder.parent.iterdir():
        match = orphan.fullmatch(sibling.name)
        if match and sibling.is_dir() and not _process_alive(int(match.group(1))):
            shutil.rmtree(sibling, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # alive, another user's (or not a pid we can judge): leave it
    return True


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def read_bounded_text(path: Path, max_bytes: int, what: str, *, error: type[NeurallmError] = RunDirError) -> str:
    """The UTF-8 text of the regular file ``path`` (symlinks followed), refused with one line otherwise.

    Refused: larger than ``max_bytes``, not a regular file (``/dev/zero`` is never read to the end, a FIFO
    never waited on), unreadable, not UTF-8. ``what`` ends the message (what the failure means and the fix);
    ``error`` is the exception raised.
    """
    path = Path(path)
    try:
        # O_NONBLOCK: a FIFO planted under the name must not hang the open
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            if not stat.S_ISREG(mode):
                raise error(f"{path} cannot be read: not a regular file (it is {file_kind(mode)}); {what}")
            data = f.read(max_bytes + 1)
    except OSError as exc:
        raise error(f"{path} cannot be read ({exc.strerror or exc}); {what}") from None
    if len(data) > max_bytes:
        raise error(f"{path} cannot be read: larger than {max_bytes:,} bytes, far more than neurallm writes; {what}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{path} cannot be read: not UTF-8 text ({exc.reason} at byte {exc.start}); {what}") from None

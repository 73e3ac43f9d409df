"""Crash-safe file writes: temp file in the same folder, fsync, rename.

A reader (or a `kill -9`) at any moment sees either the old file or the new one, never half a file,
because ``os.replace`` within one file system is atomic. :func:`atomic_folder` does the same for a whole
folder. A full disk is reported as one :class:`DiskFullError` line naming the path and the space needed;
the previous version stays and the temp files are removed.

Outputs a user names (``generate --out``, ``plot --out``, ``export --onnx``, ``train --save``/``--onnx-export``,
folders such as ``export --hf``) all go through :func:`check_output_path`, which decides what a path may be:

* a run folder's own files (``config.json``, ``model.safetensors``, … in a folder that is a run, symlinks
  resolved) are never a target: one line naming the file;
* a symlink is followed: the file it points to is written (and replaced atomically), the link itself stays;
* a character device or a FIFO (``/dev/null``, ``/dev/stdout``, a named pipe, ``>(gzip)``) is written through,
  never replaced; a block device, a socket or a folder (where a file is expected) is refused;
* ``-`` is standard output, for the commands whose output makes sense there.

The atomic writer itself renames only over a regular file (or nothing): whatever path it is given, it never
turns a device, a FIFO, a socket, a folder or a symlink into a regular file.

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
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from neurallm.errors import DiskFullError, NeurallmError, OutputPathError, RunDirError


_TEMP_SUFFIX = ".tmp"
# safetensors' writer goes through a temp file of its own, named like tempfile's default: ".tmp" + 6 characters
_TEMP_NAMES = re.compile(r"\..+" + re.escape(_TEMP_SUFFIX) + r"|\.tmp\w{6}")


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
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_TEMP_SUFFIX, dir=path.parent)
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


def _kind(mode: int) -> str:
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
        raise OutputPathError(f"{path} is {_kind(mode)}; neurallm replaces only regular files, so nothing was written: "
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
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.{os.getpid()}.", suffix=_TEMP_SUFFIX, dir=folder.parent))
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
            aside = Path(tempfile.mkdtemp(prefix=f".{folder.name}.{os.getpid()}.", suffix=_TEMP_SUFFIX, dir=folder.parent))
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
    orphan = re.compile(re.escape(f".{folder.name}.") + r"(\d+)\.\w+" + re.escape(_TEMP_SUFFIX))
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
                raise error(f"{path} cannot be read: not a regular file (it is {_kind(mode)}); {what}")
            data = f.read(max_bytes + 1)
    except OSError as exc:
        raise error(f"{path} cannot be read ({exc.strerror or exc}); {what}") from None
    if len(data) > max_bytes:
        raise error(f"{path} cannot be read: larger than {max_bytes:,} bytes, far more than neurallm writes; {what}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{path} cannot be read: not UTF-8 text ({exc.reason} at byte {exc.start}); {what}") from None


# --- output paths a user names ----------------------------------------------------------------------------

STDOUT = "-"


@dataclass(frozen=True)
class OutputTarget:
    """Where an output named by a user goes, as :func:`check_output_path` found it.

    Attributes:
        flag: the flag that named it (``--out``), for messages.
        given: the path as the user wrote it.
        path: the path to write (symlinks resolved); None for standard output.
        through: write through it (an existing character device or FIFO): opened and written, never replaced.
        runs: the run folders it was checked against besides those that are runs already (``train --out``).
    """

    flag: str
    given: str
    path: Path | None
    through: bool = False
    runs: tuple[Path, ...] = ()

    @property
    def is_stdout(self) -> bool:
        return self.path is None


def check_output_path(path: str | Path, flag: str, *, stdout: bool = False, folder: bool = False,
                      runs: Iterable[Path] = (), what: str = "the output") -> OutputTarget:
    """Check an output path a user named, before any work is done; every command's outputs go through here.

    Args:
        path: the path given (``-``: standard output, where ``stdout`` allows it).
        flag: the flag that named it, for the one-line error (``--onnx``).
        stdout: whether ``-`` may mean standard output for this output.
        folder: the output is a folder (``export --hf``, a TensorBoard folder) rather than a file.
        runs: run folders this command writes that may not be runs yet (``train --out``): their run files are
            protected too.
        what: what is written, for messages ("the text").

    Raises:
        OutputPathError: the path is a run's own file (or folder), a block device, a socket, a folder where a
            file is expected (or a file where a folder is), or its folder does not exist.
    """
    from neurallm.runfolder import run_file_named  # the run folder's file list builds on this module

    given, runs = str(path), tuple(Path(run) for run in runs)
    if given == STDOUT:
        if not stdout:
            raise OutputPathError(f"{flag} -: this output cannot go to standard output; name a file")
        return OutputTarget(flag, given, None, runs=runs)
    path = Path(path)
    # symlinks are followed: the file they point to is what gets written, so that is what is checked
    resolved = Path(os.path.realpath(path))
    for candidate in (Path(os.path.realpath(path.parent)) / path.name, resolved):
        owner = run_file_named(candidate, extra_runs=runs)
        if owner is not None:
            raise OutputPathError(f"{flag} {given}: that is {owner}, which neurallm never writes over; "
                                  "name a path outside the run's files")
    try:
        mode = os.stat(path).st_mode  # follows symlinks, /dev/stdout's /proc link included
    except FileNotFoundError:
        mode = None
    except OSError as exc:
        raise OutputPathError(f"{flag} {given} cannot be checked ({exc.strerror or exc}); name another path") from None
    if mode is None:
        if not resolved.parent.is_dir():
            raise OutputPathError(f"{flag} {given}: the folder {path.parent} does not exist; create it or name another path")
        return OutputTarget(flag, given, resolved, runs=runs)
    if folder:
        if not stat.S_ISDIR(mode):
            raise OutputPathError(f"{flag} {given} is {_kind(mode)}; name a folder")
        return OutputTarget(flag, given, resolved, runs=runs)
    if stat.S_ISREG(mode):
        return OutputTarget(flag, given, resolved, runs=runs)
    if stat.S_ISCHR(mode) or stat.S_ISFIFO(mode):
        # /dev/null, a terminal, a pipe: written through, never replaced (keep the given path: a /proc link to a
        # pipe opens the pipe, while its resolved name is no path at all)
        return OutputTarget(flag, given, path, through=True, runs=runs)
    if stat.S_ISDIR(mode):
        raise OutputPathError(f"{flag} {given} is a folder; name a file for {what}")
    raise OutputPathError(f"{flag} {given} is {_kind(mode)}; neurallm writes only files, character devices and FIFOs: "
                          "name another path")


@contextmanager
def output_path(target: OutputTarget, size: int | None = None) -> Iterator[Path]:
    """Yield a temp path to write ``target``'s content into; on success it becomes ``target``.

    A file is renamed into place atomically (the path is checked again first: a run may have appeared
    there meanwhile); a character device or FIFO, or standard output, receives a copy of the bytes and is
    never replaced. For writers that need a file name (ONNX, safetensors, matplotlib).
    """
    if target.path is not None and not target.through:
        target = check_output_path(target.given, target.flag, runs=target.runs)  # again, at the moment of writing
    if target.path is not None and not target.through:
        with atomic_path(target.path, size) as tmp:
            yield tmp
        return
    scratch = Path(tempfile.mkdtemp(prefix=".neurallm-output.", suffix=_TEMP_SUFFIX))
    try:
        tmp = scratch / "output"
        yield tmp
        with open(tmp, "rb") as source, _opened_through(target, "b") as dest:
            shutil.copyfileobj(source, dest)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@contextmanager
def output_text(target: OutputTarget) -> Iterator[IO[str]]:
    """A text stream to write ``target`` as it is made (``generate --out``): standard output, the device or FIFO
    itself, or a temp file renamed over the file when the block ends (also on Ctrl-C: what was written is kept)."""
    if target.path is None or target.through:
        with _opened_through(target, "") as stream:
            yield stream
        return
    with output_path(target) as tmp, open(tmp, "w", encoding="utf-8") as f:
        yield f


@contextmanager
def _opened_through(target: OutputTarget, binary: str) -> Iterator[IO]:
    """Standard output, or the existing device/FIFO of ``target`` opened for writing (never created or truncated)."""
    if target.path is None:
        stream = sys.stdout.buffer if binary else sys.stdout
        yield stream
        stream.flush()
        return
    try:
        fd = os.open(target.path, os.O_WRONLY | os.O_NOCTTY | os.O_CLOEXEC)  # no O_CREAT: never makes a file
    except OSError as exc:
        raise OutputPathError(f"{target.flag} {target.given} cannot be opened for writing ({exc.strerror or exc})") from None
    if not (stat.S_ISCHR(os.fstat(fd).st_mode) or stat.S_ISFIFO(os.fstat(fd).st_mode)):
        os.close(fd)  # replaced by a regular file since it was checked: never write into it unchecked
        raise OutputPathError(f"{target.flag} {target.given} changed while neurallm ran; nothing was written, run it again")
    with os.fdopen(fd, "w" + binary, **({} if binary else {"encoding": "utf-8"})) as stream:
        yield stream

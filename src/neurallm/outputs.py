"""Output paths a user names: one check that every command's outputs go through.

``generate --out``, ``plot --out``, ``export --onnx``, ``train --save`` and ``--onnx-export``, and folders such as
``export --hf`` or a TensorBoard folder are checked by :func:`check_output_path` before any work is done, and
written with :func:`output_path` or :func:`output_text`, which check again at the moment of writing:

* a run folder's own files (``config.json``, ``model.safetensors``, … in a folder that is a run, symlinks
  resolved; :data:`neurallm.runfolder.RUN_FILES`) are never a target: one line naming the file;
* a symlink is followed: the file it points to is written (replaced atomically), the link itself stays;
* a character device or a FIFO (``/dev/null``, ``/dev/stdout``, a named pipe, ``>(gzip)``) is written through,
  never replaced; a block device, a socket, or a folder where a file is expected is refused;
* ``-`` is standard output, for the outputs whose bytes make sense there.

This sits beside :mod:`neurallm.runfolder` rather than in :mod:`neurallm.fileio` because it needs the run folder's
file list, and the plain file helpers come before the run folder in the package's layers.
"""

from __future__ import annotations

import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from neurallm.errors import OutputPathError
from neurallm.fileio import TEMP_SUFFIX, atomic_path, file_kind
from neurallm.runfolder import run_file_named

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
            raise OutputPathError(f"{flag} {given} is {file_kind(mode)}; name a folder")
        return OutputTarget(flag, given, resolved, runs=runs)
    if stat.S_ISREG(mode):
        return OutputTarget(flag, given, resolved, runs=runs)
    if stat.S_ISCHR(mode) or stat.S_ISFIFO(mode):
        # /dev/null, a terminal, a pipe: written through, never replaced (keep the given path: a /proc link to a
        # pipe opens the pipe, while its resolved name is no path at all)
        return OutputTarget(flag, given, path, through=True, runs=runs)
    if stat.S_ISDIR(mode):
        raise OutputPathError(f"{flag} {given} is a folder; name a file for {what}")
    raise OutputPathError(f"{flag} {given} is {file_kind(mode)}; neurallm writes only files, character devices and FIFOs: "
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
    scratch = Path(tempfile.mkdtemp(prefix=".neurallm-output.", suffix=TEMP_SUFFIX))
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

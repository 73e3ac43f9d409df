"""Where text comes from: a folder of splits, one text file, a CSV, a JSONL file or a registered dataset.

Every source ends up as the same thing, a :class:`Corpus`: for each split (train/valid/test) a way to read
its lines of text. Sources that are a single file are cut into three contiguous blocks of lines by
``split_ratios`` (first 90% train, next 5% valid, last 5% test by default) so that the split is deterministic
and each block stays running text, as BPTT needs.

Encoding policy: files are read as strict UTF-8 (or the ``--encoding`` given); a byte sequence that does not
decode is an error naming the file and the byte offset, never silently replaced.
"""

from __future__ import annotations

import csv
import hashlib
import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from neurallm.data import registry
from neurallm.errors import ConfigError, DataError

SPLITS = ("train", "valid", "test")

# File names of the split files in a corpus folder, in order of preference.
_SPLIT_FILE_NAMES = {
    "train": ("train.txt", "wiki.train.tokens", "ptb.train.txt", "wiki.train.raw"),
    "valid": ("valid.txt", "wiki.valid.tokens", "ptb.valid.txt", "wiki.valid.raw"),
    "test": ("test.txt", "wiki.test.tokens", "ptb.test.txt", "wiki.test.raw"),
}
FORMATS = ("auto", "dir", "text", "csv", "jsonl", "registry")

# The csv module refuses fields over 128 KiB by default; long articles in one cell are normal.
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


@dataclass(frozen=True)
class SourceSettings:
    """How to read ``--data``; part of the key under which a prepared corpus is cached.

    Attributes:
        data: a folder, a file, or a registered dataset name.
        format: ``auto`` detects from the path; or one of ``dir text csv jsonl registry``.
        text_column: CSV columns joined (with a space) into one document per row, e.g. ``"title,description"``.
        text_field: JSONL key holding the text of each record.
        split_ratios: train/valid/test fractions for single-file sources.
        encoding: text encoding of the files (strict decoding).
    """

    data: str
    format: str = "auto"
    text_column: str | None = None
    text_field: str | None = None
    split_ratios: tuple[float, float, float] = (0.9, 0.05, 0.05)
    encoding: str = "utf-8"

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        ratios = tuple(float(r) for r in self.split_ratios)
        # `not 0 < r <= 1` rather than `r <= 0`: NaN fails every comparison, so only this form refuses nan,nan,nan
        if len(ratios) != 3 or not all(0 < r <= 1 for r in ratios) or abs(sum(ratios) - 1) > 1e-6:
            raise ConfigError(
                f"--split-ratios must be three positive fractions that sum to 1, like 0.9,0.05,0.05; got {self.split_ratios}"
            )
        object.__setattr__(self, "split_ratios", ratios)
        try:
            "".encode(self.encoding)
        except LookupError:
            raise ConfigError(f"--encoding {self.encoding!r} is not a known text encoding; try utf-8 or latin-1") from None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Corpus:
    """The three splits of a source, each readable as an iterator over lines of text (without line breaks)."""

    description: str
    files: list[Path]
    read_split: dict[str, Callable[[], Iterator[str]]] = field(repr=False)

    def lines(self, split: str) -> Iterator[str]:
        return self.read_split[split]()

    def fingerprint(self, settings: SourceSettings) -> str:
        """Hash of the source files' bytes and of how they are read (not of their path or mtime)."""
        digest = hashlib.sha256()
        reading = {k: v for k, v in settings.to_dict().items() if k != "data"}
        digest.update(json.dumps(reading, sort_keys=True).encode())
        for path in self.files:
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            digest.update(b"\0")
        return digest.hexdigest()


def open_corpus(settings: SourceSettings) -> Corpus:
    """Detect the kind of ``settings.data`` and return its splits.

    Raises:
        DataError: the path does not exist, a split file is missing, a file is empty or binary, a CSV
            column or JSONL field is missing.
    """
    kind = settings.format if settings.format != "auto" else _detect_format(settings.data)
    path = Path(settings.data)
    if kind == "registry":
        return _open_registered(settings)
    if not path.exists():
        raise DataError(f"--data {settings.data}: no such file or folder, and not a registered dataset "
                        f"({', '.join(sorted(registry.DATASETS))})")
    if kind == "dir":
        return _open_folder(path, settings)
    if path.is_dir():
        raise DataError(f"--data {path} is a folder but --format {kind} expects a file")
    _check_text_file(path)
    if kind == "text":
        return _split_single_source(path, settings, lambda: _read_text_lines(path, settings.encoding))
    if kind == "csv":
        columns = _csv_columns(path, settings)
        return _split_single_source(path, settings, lambda: _read_csv_rows(path, columns, settings.encoding))
    if kind == "jsonl":
        if not settings.text_field:
            raise DataError(f"--data {path} is JSONL: name the key holding the text with --text-field")
        return _split_single_source(path, settings, lambda: _read_jsonl(path, settings.text_field, settings.encoding))
    raise AssertionError(kind)


def _detect_format(data: str) -> str:
    path = Path(data)
    if path.is_dir():
        return "dir"
    if path.exists():
        suffix = path.suffix.lower()
        if suffix in (".csv", ".tsv"):
            return "csv"
        if suffix in (".jsonl", ".ndjson"):
            return "jsonl"
        return "text"
    # a registered name, or the name of a folder in the data folders (``--data wt2-lite`` finds ../shared/data/wt2-lite)
    if registry.is_registered(data) or registry.find_local(data) is not None:
        return "registry"
    return "text"  # does not exist: open_corpus reports it


def _open_registered(settings: SourceSettings) -> Corpus:
    spec = registry.DATASETS.get(settings.data)
    if spec is None and (local := registry.find_local(settings.data)) is not None:
        return _open_folder(local, settings)
    if spec is None:
        raise DataError(f"--data {settings.data}: not a registered dataset; known: {', '.join(sorted(registry.DATASETS))}")
    folder = registry.resolve_dataset(settings.data)
    # a downloaded copy has the archive's own layout (wikitext-2/wiki.train.tokens); a local folder may not
    spec_layout = {split: folder / spec.split_files[split] for split in SPLITS if split in spec.split_files}
    if len(spec_layout) == len(SPLITS) and all(path.is_file() for path in spec_layout.values()):
        return _open_split_files(folder, spec_layout, settings)
    if "all" in spec.split_files and not any(_find_split_file(folder, s) for s in SPLITS):
        path = folder / spec.split_files["all"]
        _check_text_file(path)
        return _split_single_source(path, settings, lambda: _read_text_lines(path, settings.encoding))
    return _open_folder(folder, settings)


def _find_split_file(folder: Path, split: str) -> Path | None:
    for name in _SPLIT_FILE_NAMES[split]:
        if (folder / name).is_file():
            return folder / name
    return None


def _open_folder(folder: Path, settings: SourceSettings) -> Corpus:
    found = {split: _find_split_file(folder, split) for split in SPLITS}
    missing = [s for s, p in found.items() if p is None]
    if missing:
        present = sorted(p.name for p in folder.iterdir() if p.is_file()) or ["no files"]
        raise DataError(
            f"--data {folder}: no {'/'.join(missing)} split; expected files named like "
            f"{', '.join(_SPLIT_FILE_NAMES[missing[0]][:3])}; found: {', '.join(present[:10])}"
        )
    return _open_split_files(folder, found, settings)


def _open_split_files(folder: Path, paths: dict[str, Path], settings: SourceSettings) -> Corpus:
    for path in paths.values():
        _check_text_file(path)
    readers = {split: (lambda p=path: _read_text_lines(p, settings.encoding)) for split, path in paths.items()}
    return Corpus(description=str(folder), files=[paths[s] for s in SPLITS], read_split=readers)


def _split_single_source(path: Path, settings: SourceSettings, read_all: Callable[[], Iterator[str]]) -> Corpus:
    """Cut one sequence of lines into contiguous train/valid/test blocks by ``settings.split_ratios``."""
    total = sum(1 for _ in read_all())
    n_train = int(total * settings.split_ratios[0])
    n_valid = int(total * settings.split_ratios[1])
    if n_train == 0 or n_valid == 0 or total - n_train - n_valid == 0:
        raise DataError(
            f"--data {path}: {total} lines/records are too few to split {settings.split_ratios}; "
            "give more text or a folder with train.txt/valid.txt/test.txt"
        )
    bounds = {"train": (0, n_train), "valid": (n_train, n_train + n_valid), "test": (n_train + n_valid, total)}

    def reader(start: int, stop: int) -> Iterator[str]:
        for i, line in enumerate(read_all()):
            if i >= stop:
                break
            if i >= start:
                yield line

    readers = {split: (lambda b=b: reader(*b)) for split, b in bounds.items()}
    return Corpus(description=f"{path} (lines split {settings.split_ratios})", files=[path], read_split=readers)


def _check_text_file(path: Path) -> None:
    if not path.is_file():
        raise DataError(f"{path}: not a file")
    with open(path, "rb") as f:
        head = f.read(8192)
    if not head:
        raise DataError(f"{path} is empty; give a file with text in it")
    if b"\0" in head:
        raise DataError(f"{path} looks binary (it contains NUL bytes); give a text file")


def _decode_errors(path: Path, encoding: str):
    """Context that turns a decoding failure into a DataError naming the file."""

    class _Guard:
        def __enter__(self):
            return self

        def __exit__(self, exc_type, exc, tb):
            if isinstance(exc, UnicodeDecodeError):
                raise DataError(
                    f"{path} is not valid {encoding} (byte {exc.start} of a read block: {exc.reason}); "
                    "convert it to UTF-8 or pass --encoding (e.g. --encoding latin-1)"
                ) from exc
            return False

    return _Guard()


def _read_text_lines(path: Path, encoding: str) -> Iterator[str]:
    with _decode_errors(path, encoding), open(path, encoding=encoding, errors="strict", newline=None) as f:
        for line in f:
            yield line.rstrip("\n")


def _csv_columns(path: Path, settings: SourceSettings) -> list[int]:
    if not settings.text_column:
        raise DataError(f"--data {path} is a CSV: name the text columns with --text-column (e.g. title,description)")
    with _decode_errors(path, settings.encoding), open(path, encoding=settings.encoding, newline="") as f:
        header = next(csv.reader(f, dialect=_csv_dialect(path)), None)
    if not header:
        raise DataError(f"{path}: the CSV has no header row; its first row must name the columns")
    wanted = [c.strip() for c in settings.text_column.split(",") if c.strip()]
    missing = [c for c in wanted if c not in header]
    if missing:
        raise DataError(f"--text-column {','.join(missing)}: not in {path}; its columns are: {', '.join(header)}")
    return [header.index(c) for c in wanted]


def _csv_dialect(path: Path) -> type[csv.Dialect]:
    return csv.excel_tab if path.suffix.lower() == ".tsv" else csv.excel


def _read_csv_rows(path: Path, columns: list[int], encoding: str) -> Iterator[str]:
    """One line of text per CSV row: the chosen columns joined by a space, inner line breaks made spaces."""
    with _decode_errors(path, encoding), open(path, encoding=encoding, newline="") as f:
        rows = csv.reader(f, dialect=_csv_dialect(path))
        next(rows, None)
        for row_number, row in enumerate(rows, start=2):
            if not row:
                continue
            if len(row) <= max(columns):
                raise DataError(f"{path}, row {row_number}: has {len(row)} fields, fewer than the header; fix that row")
            text = " ".join(row[i] for i in columns)
            yield " ".join(text.splitlines())


def _read_jsonl(path: Path, field_name: str, encoding: str) -> Iterator[str]:
    with _decode_errors(path, encoding), open(path, encoding=encoding) as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}, line {line_number}: not valid JSON ({exc.msg}); each line must be one JSON object") from None
            except RecursionError:  # json's decoder recurses once per nesting level
                raise DataError(f"{path}, line {line_number}: JSON nested too deeply to read; each line must be one JSON object") from None
            if not isinstance(record, dict) or field_name not in record:
                keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
                raise DataError(f"--text-field {field_name}: not in {path} line {line_number}; it has: {keys}")
            yield " ".join(str(record[field_name]).splitlines())

"""Where text comes from: a folder of splits, one text file, a CSV, a JSONL file or a registered dataset.

Every source ends up as the same thing, a :class:`Corpus`: its files, each read once from start to end as
lines of text, and which split each line belongs to. Sources that are a single file are cut into three
contiguous blocks of lines by ``split_ratios`` (first 90% train, next 5% valid, last 5% test by default) so
that the split is deterministic and each block stays running text, as BPTT needs. Many CSVs are sorted (by
date, by class, with the empty rows last), so that a contiguous cut gives a test split unlike the rest:
``split_by="documents"`` shuffles whole documents (CSV rows, JSONL records, a text file's paragraphs) with
``split_seed`` before cutting, keeping each document's lines together and in order.

Empty CSV rows and JSONL records (blank text after joining the columns) are dropped and counted, not turned into
lines that hold only an end-of-line token.

Encoding policy: files are read as strict UTF-8 (or the ``--encoding`` given, UTF-16 included); a UTF-8
byte-order mark is dropped; a byte sequence that does not decode is an error naming the file and the byte's
offset in it, never silently replaced.
"""

from __future__ import annotations

import codecs
import csv
import functools
import io
import itertools
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from neurallm.data import registry
from neurallm.errors import ConfigError, DataError
from neurallm.settings import setting

if TYPE_CHECKING:
    import numpy as np

SPLITS = ("train", "valid", "test")

# File names of the split files in a corpus folder, in order of preference.
_SPLIT_FILE_NAMES = {
    "train": ("train.txt", "wiki.train.tokens", "ptb.train.txt", "wiki.train.raw", "ptb.char.train.txt"),
    "valid": ("valid.txt", "wiki.valid.tokens", "ptb.valid.txt", "wiki.valid.raw", "ptb.char.valid.txt"),
    "test": ("test.txt", "wiki.test.tokens", "ptb.test.txt", "wiki.test.raw", "ptb.char.test.txt"),
}
FORMATS = ("auto", "dir", "text", "csv", "jsonl", "registry")
SPLIT_BY = ("lines", "documents")

# The csv module refuses fields over 128 KiB by default; long articles in one cell are normal. The limit is
# process-wide state, so it is raised only while a CSV of ours is being parsed (see _csv_field_limit).
_CSV_FIELD_LIMIT = min(sys.maxsize, 2**31 - 1)


def parse_ratios(text: str) -> tuple[float, ...]:
    """``--split-ratios 0.9,0.05,0.05`` → ``(0.9, 0.05, 0.05)`` (checked in ``SourceSettings``)."""
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"expected three fractions like 0.9,0.05,0.05, got {text!r}") from None


@dataclass(frozen=True)
class SourceSettings:
    """How to read ``--data``; part of the key under which a prepared corpus is cached (each field's ``help``
    documents it)."""

    data: str = setting(help="folder with train/valid/test, a text/CSV/JSONL file, a prepared folder, or a dataset "
                             "name (wikitext-2, wikitext-103, ptb, tinyshakespeare)")
    format: str = setting("auto", help="how to read --data; auto detects it from the path", choices=FORMATS)
    text_column: str | None = setting(None, help="CSV columns joined (with a space) into one document per row, e.g. title,description")
    text_field: str | None = setting(None, help="JSONL key holding the text of each record")
    split_ratios: tuple[float, float, float] = setting((0.9, 0.05, 0.05), help="train,valid,test fractions for a single-file source",
                                                       parse=parse_ratios, metavar="TRAIN,VALID,TEST")
    split_by: str = setting("lines", help="how a single-file source is cut: lines, contiguous blocks in file order; "
                            "documents, whole CSV rows, JSONL records or paragraphs shuffled with --split-seed first "
                            "(for sorted files)", choices=SPLIT_BY)
    split_seed: int = setting(1111, help="seed of the document shuffle of --split-by documents")
    encoding: str = setting("utf-8", help="text encoding of the files, decoded strictly")
    # Recorded so that a run trained on `--data tinyshakespeare` (found in ../shared/data) can be evaluated from
    # any folder, offline: the name alone is looked up relative to the working directory.
    location: str | None = setting(None, help="absolute path of the folder where a dataset name was found", derived=True)

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
        if self.split_by not in SPLIT_BY:
            raise ConfigError(f"--split-by must be one of {', '.join(SPLIT_BY)}, got {self.split_by!r}")
        if not isinstance(self.split_seed, int) or isinstance(self.split_seed, bool) or not 0 <= self.split_seed < 2**63:
            raise ConfigError(f"--split-seed must be a whole number from 0 to 2**63-1, got {self.split_seed!r}")
        try:
            "".encode(self.encoding)
        except LookupError:
            raise ConfigError(f"--encoding {self.encoding!r} is not a known text encoding; try utf-8 or latin-1") from None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SourceFile:
    """One file of a corpus and how its bytes become lines of text.

    Attributes:
        path: the file.
        split: the split it holds; None when it holds all three, cut by ``split_ratios`` (see :class:`Corpus`).
        read: lines of text (without line breaks) from the opened text stream; called as ``read(f, on_empty)``,
            where ``on_empty()`` is called once per empty row or record it drops.
        encoding: text encoding, decoded strictly.
        newline: ``newline`` argument of :func:`open` (the csv module wants ``""``).
        documents: what a document is for ``split_by="documents"``: ``rows`` (each line: a CSV row or JSONL
            record) or ``paragraphs`` (blocks of lines separated by blank lines, in a text file).
    """

    path: Path
    split: str | None
    read: Callable[[TextIO, Callable[[], None]], Iterator[str]] = field(repr=False)
    encoding: str = "utf-8"
    newline: str | None = None
    documents: str = "paragraphs"

    def lines(self, digest=None, on_empty: Callable[[], None] | None = None) -> Iterator[str]:
        """Read the file once from start to end; ``digest`` (a hashlib object) sees every byte read, ``on_empty``
        is called for each empty row or record dropped."""
        try:
            with _open_text(self.path, self.encoding, self.newline, digest) as f:
                yield from self.read(f, on_empty or _ignore)
        except UnicodeDecodeError:
            raise _decoding_error(self.path, self.encoding) from None

    def starts_document(self) -> Callable[[str], bool]:
        """A fresh predicate, called on each line in order: does this line begin a new document?"""
        if self.documents == "rows":
            return lambda line: True
        after_blank = [True]

        def starts(line: str) -> bool:  # a paragraph begins at a non-blank line after a blank one (or the first)
            blank = not line.strip()
            begins, after_blank[0] = after_blank[0] and not blank, blank
            return begins

        return starts


def _ignore() -> None:
    pass


@dataclass
class Corpus:
    """The files of a source, each read once in order, and how their lines fall into train/valid/test.

    A folder source has one file per split. A single-file source has one file holding every split: its
    lines are cut by ``split_ratios`` once their number is known.
    """

    description: str
    sources: list[SourceFile]
    split_ratios: tuple[float, float, float]
    split_by: str = "lines"
    split_seed: int = 1111

    @property
    def files(self) -> list[Path]:
        return [source.path for source in self.sources]

    def lines(self, split: str) -> Iterator[str]:
        """The lines of one split (a single-file source is read twice here: once to count its lines or documents).
        With ``split_by="documents"`` the split's documents come in file order (not shuffled)."""
        whole = self.sources[0]
        if whole.split is not None:
            yield from next(source for source in self.sources if source.split == split).lines()
            return
        if self.split_by == "lines":
            start, stop = split_bounds(sum(1 for _ in whole.lines()), self.split_ratios, whole.path)[split]
            yield from itertools.islice(whole.lines(), start, stop)
            return
        import numpy as np  # here: `neurallm --help` imports this module and needs no numpy

        starts = whole.starts_document()
        n_documents = sum(1 for line in whole.lines() if starts(line))
        chosen = np.zeros(n_documents, dtype=bool)
        chosen[document_splits(n_documents, self.split_ratios, self.split_seed, whole.path)[split]] = True
        starts, document = whole.starts_document(), -1
        for line in whole.lines():
            document += starts(line)
            if chosen[max(document, 0)]:
                yield line

    def identity(self) -> list[list]:
        """Cheap identity of the files: path, size, modification and change times, inode (as make and git use).

        Equal identities mean the bytes were not touched, so a prepared copy may be reused without reading them.
        """
        out = []
        for path in self.files:
            st = path.stat()
            out.append([str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev])
        return out


def split_bounds(total: int, ratios: tuple[float, float, float], path: Path) -> dict[str, tuple[int, int]]:
    """Contiguous [start, stop) line ranges of train/valid/test for a single file of ``total`` lines."""
    n_train = int(total * ratios[0])
    n_valid = int(total * ratios[1])
    if n_train == 0 or n_valid == 0 or total - n_train - n_valid == 0:
        raise DataError(
            f"--data {path}: {total} lines/records are too few to split {ratios}; "
            "give more text or a folder with train.txt/valid.txt/test.txt"
        )
    return {"train": (0, n_train), "valid": (n_train, n_train + n_valid), "test": (n_train + n_valid, total)}


def document_splits(total: int, ratios: tuple[float, float, float], seed: int, path: Path) -> dict[str, np.ndarray]:
    """Indices of the documents of train/valid/test for ``split_by="documents"``: the ``total`` documents of a file
    shuffled with ``seed`` and cut by ``ratios``; each split lists its documents in the shuffled order."""
    import numpy as np  # here: `neurallm --help` imports this module and needs no numpy

    order = np.random.default_rng(seed).permutation(total)
    return {split: order[start:stop] for split, (start, stop) in split_bounds(total, ratios, path).items()}


def open_corpus(settings: SourceSettings) -> Corpus:
    """Detect the kind of ``settings.data`` and return its files; only the first bytes of each file are read here.

    Raises:
        DataError: the path does not exist, a split file is missing, a file is empty or binary, a CSV
            column or JSONL field is missing.
    """
    kind = settings.format if settings.format != "auto" else _detect_format(settings.data, settings.location)
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
    _check_text_file(path, settings.encoding)
    if kind == "text":
        return _single_file(path, settings, _text_lines)
    if kind == "csv":
        columns = _csv_columns(path, settings)
        return _single_file(path, settings, functools.partial(_csv_rows, path=path, columns=columns), newline="",
                            documents="rows")
    if kind == "jsonl":
        if not settings.text_field:
            raise DataError(f"--data {path} is JSONL: name the key holding the text with --text-field")
        return _single_file(path, settings, functools.partial(_jsonl_texts, path=path, field_name=settings.text_field),
                            documents="rows")
    raise AssertionError(kind)


def _detect_format(data: str, location: str | None = None) -> str:
    path = Path(data)
    if location is not None and Path(location).is_dir() and not path.exists():
        return "registry"  # a dataset name whose folder was recorded
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


def dataset_location(settings: SourceSettings) -> Path | None:
    """The folder a dataset name was recorded at (if it still exists) or is found in now; None if neither."""
    if settings.location is not None and Path(settings.location).is_dir():
        return Path(settings.location)
    try:
        return registry.resolve_dataset(settings.data, download=False).resolve()
    except DataError:
        return None


def _open_registered(settings: SourceSettings) -> Corpus:
    spec = registry.DATASETS.get(settings.data)
    local = dataset_location(settings)
    if spec is None and local is not None:
        return _open_folder(local, settings)
    if spec is None:
        raise DataError(f"--data {settings.data}: not a registered dataset; known: {', '.join(sorted(registry.DATASETS))}")
    folder = local or registry.resolve_dataset(settings.data)
    # a downloaded copy has the archive's own layout (wikitext-2/wiki.train.tokens); a local folder may not
    spec_layout = {split: folder / spec.split_files[split] for split in SPLITS if split in spec.split_files}
    if len(spec_layout) == len(SPLITS) and all(path.is_file() for path in spec_layout.values()):
        return _open_split_files(folder, spec_layout, settings)
    if "all" in spec.split_files and not any(_find_split_file(folder, s) for s in SPLITS):
        path = folder / spec.split_files["all"]
        _check_text_file(path, settings.encoding)
        return _single_file(path, settings, _text_lines)
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
        _check_text_file(path, settings.encoding)
    files = [SourceFile(paths[split], split, _text_lines, settings.encoding) for split in SPLITS]
    return Corpus(description=str(folder), sources=files, split_ratios=settings.split_ratios)


def _single_file(path: Path, settings: SourceSettings, read: Callable[[TextIO, Callable[[], None]], Iterator[str]],
                 newline: str | None = None, documents: str = "paragraphs") -> Corpus:
    """A file holding all three splits: contiguous blocks of lines by ``settings.split_ratios``, so that the
    split is deterministic and each block stays running text, as BPTT needs (or, with ``split_by="documents"``,
    its documents shuffled with ``split_seed`` and then cut)."""
    how = "lines" if settings.split_by == "lines" else f"{documents} shuffled with seed {settings.split_seed}"
    return Corpus(description=f"{path} ({how}, split {settings.split_ratios})",
                  sources=[SourceFile(path, None, read, settings.encoding, newline, documents)],
                  split_ratios=settings.split_ratios, split_by=settings.split_by, split_seed=settings.split_seed)


def _decoding(encoding: str) -> str:
    """The codec to read ``encoding`` with: UTF-8 also drops a leading byte-order mark (Windows editors and Excel
    write one), which would otherwise stick to the first word or to the first CSV column's name."""
    return "utf-8-sig" if codecs.lookup(encoding).name == "utf-8" else encoding


class _HashingReader(io.RawIOBase):
    """A binary file that shows every byte it reads to a hashlib object: the bytes are hashed while they are
    parsed, so preparing a corpus reads each file once."""

    def __init__(self, path: Path, digest) -> None:
        self._file = open(path, "rb")
        self._digest = digest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self._file.readinto(buffer)
        if n:
            self._digest.update(memoryview(buffer)[:n])
        return n

    def close(self) -> None:
        self._file.close()
        super().close()


def _open_text(path: Path, encoding: str, newline: str | None = None, digest=None) -> TextIO:
    if digest is None:
        return open(path, encoding=_decoding(encoding), errors="strict", newline=newline)
    raw = io.BufferedReader(_HashingReader(path, digest), buffer_size=1 << 20)
    return io.TextIOWrapper(raw, encoding=_decoding(encoding), errors="strict", newline=newline)


def _decoding_error(path: Path, encoding: str) -> DataError:
    """The error for a file that does not decode, with the offset of the first bad byte in the *file*.

    Python's text reader reports offsets within the block it was decoding, which mean nothing to the user;
    so the file is decoded again, block by block, to find where the bad bytes are (only on this error path).
    """
    decoder = codecs.getincrementaldecoder(encoding)(errors="strict")
    with open(path, "rb") as f:
        offset = 3 if _decoding(encoding) == "utf-8-sig" and f.read(3) == codecs.BOM_UTF8 else 0
        f.seek(offset)
        for block in itertools.chain(iter(lambda: f.read(1 << 16), b""), [None]):
            pending = len(decoder.getstate()[0])  # bytes of a character cut by the previous block's end
            try:
                decoder.decode(block or b"", final=block is None)
            except UnicodeDecodeError as exc:
                where, reason = f"byte {offset - pending + exc.start} of the file", exc.reason
                break
            offset += len(block or b"")
        else:
            where, reason = "somewhere", "it does not decode"
    return DataError(f"{path} is not valid {encoding} ({where}: {reason}); "
                     "convert it to UTF-8 or pass --encoding (e.g. --encoding latin-1)")


def _check_text_file(path: Path, encoding: str = "utf-8") -> None:
    if not path.is_file():
        raise DataError(f"{path}: not a file")
    with open(path, "rb") as f:
        head = f.read(8192)
    if not head:
        raise DataError(f"{path} is empty; give a file with text in it")
    wide = _wide_encoding_by_mark(head)
    if wide and not codecs.lookup(encoding).name.startswith(wide):
        raise DataError(f"{path} starts with a {wide.upper()} byte-order mark; read it with --encoding {wide}")
    # NUL characters mark a binary file; look for them in the decoded text, since UTF-16 and UTF-32 text is full
    # of NUL bytes (a bad byte here is reported, with its offset, when the file is read)
    if "\0" in codecs.getincrementaldecoder(_decoding(encoding))(errors="replace").decode(head):
        raise DataError(f"{path} looks binary (it contains NUL bytes); give a text file")


def _wide_encoding_by_mark(head: bytes) -> str | None:
    """``utf-16``/``utf-32`` when ``head`` starts with their byte-order mark (UTF-32 LE's begins like UTF-16 LE's)."""
    if head.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):
        return "utf-32"
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16"
    return None


def _text_lines(f: TextIO, on_empty: Callable[[], None] = _ignore) -> Iterator[str]:
    # blank lines of a text file are kept: they are the paragraph breaks of running text (WikiText has them)
    for line in f:
        yield line.rstrip("\n")


@contextmanager
def _csv_field_limit() -> Iterator[None]:
    """Raise the csv module's process-wide field size limit while our code parses, and restore the caller's."""
    before = csv.field_size_limit(_CSV_FIELD_LIMIT)
    try:
        yield
    finally:
        csv.field_size_limit(before)


def _csv_reader(f: TextIO, path: Path) -> Iterator[list[str]]:
    """Rows of a CSV; the field limit is raised around each row's parsing only, so that no other code (the
    caller's own csv use between two rows of this generator) runs under our setting."""
    rows = csv.reader(f, dialect=_csv_dialect(path))
    while True:
        with _csv_field_limit():
            row = next(rows, None)
        if row is None:
            return
        yield row


def _csv_columns(path: Path, settings: SourceSettings) -> list[int]:
    if not settings.text_column:
        raise DataError(f"--data {path} is a CSV: name the text columns with --text-column (e.g. title,description)")
    try:
        with _open_text(path, settings.encoding, newline="") as f:
            header = next(_csv_reader(f, path), None)
    except UnicodeDecodeError:
        raise _decoding_error(path, settings.encoding) from None
    if not header:
        raise DataError(f"{path}: the CSV has no header row; its first row must name the columns")
    wanted = [c.strip() for c in settings.text_column.split(",") if c.strip()]
    missing = [c for c in wanted if c not in header]
    if missing:
        raise DataError(f"--text-column {','.join(missing)}: not in {path}; its columns are: {', '.join(header)}")
    return [header.index(c) for c in wanted]


def _csv_dialect(path: Path) -> type[csv.Dialect]:
    return csv.excel_tab if path.suffix.lower() == ".tsv" else csv.excel


def _csv_rows(f: TextIO, on_empty: Callable[[], None] = _ignore, *, path: Path, columns: list[int]) -> Iterator[str]:
    """One line of text per CSV row: the chosen columns joined by a space, inner line breaks made spaces. A row
    whose chosen columns are blank is dropped (``on_empty`` counts it): it would be a line of one ``<eos>``."""
    rows = _csv_reader(f, path)
    next(rows, None)
    for row_number, row in enumerate(rows, start=2):
        if not row:
            continue
        if len(row) <= max(columns):
            raise DataError(f"{path}, row {row_number}: has {len(row)} fields, fewer than the header; fix that row")
        text = " ".join(" ".join(row[i] for i in columns).splitlines())
        if not text.strip():
            on_empty()
            continue
        yield text


def _jsonl_texts(f: TextIO, on_empty: Callable[[], None] = _ignore, *, path: Path, field_name: str,
                 drop_empty: bool = True) -> Iterator[str]:
    """The text of each record (inner line breaks made spaces); a record whose text is blank or null is dropped
    (``on_empty`` counts it) unless ``drop_empty`` is false (``score --jsonl`` keeps one line per record)."""
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
        value = record[field_name]
        text = "" if value is None else " ".join(str(value).splitlines())
        if not text.strip() and drop_empty:
            on_empty()
            continue
        yield text

"""Id streams on disk: a prepared corpus is a folder of ``{split}.npy`` files plus ``vocab.json`` and ``meta.json``.

The ids of a split are one flat array in the smallest unsigned dtype that holds the vocabulary, read back
memory-mapped, so a corpus never has to fit in memory as Python lists.

Preparing reads each source file once, streaming::

    bytes ─► lines ─► tokens ─► provisional ids ──► temp file (4 bytes a token)
      └─ hashed on the way (the content key)         │
                              train's provisional ids ─► counts ─► vocabulary ─► remap table
                                             every split's provisional ids ─► remap ─► {split}.npy

Provisional ids number the token types in order of first appearance, from a growing dictionary. They exist
because the real ids (ordered by frequency in train) are known only once train has been read, and the
split points of a single-file source only once all its lines are counted: holding the tokens until then
costs memory in proportion to the corpus, reading the source a second time costs time. Memory stays bounded
by the vocabulary and a few blocks of ids, whatever the corpus size.

Reuse: a folder records the identity of the files it was made from (path, size, modification and change
times, inode) with the settings; while they are unchanged, preparing again only checks the folder and
reads no source byte. Its ``key`` hashes the source bytes and the settings, whatever the path.

Guarantees (see the README's Reliability section): a prepared folder is written into a temp folder beside it
and swapped in whole, so it is all-old or all-new; loading checks every array against ``meta.json`` (length,
dtype, 1-D shape, largest id below the vocabulary size, SHA-256 of the ids) and refuses a mismatch with one
line; ``prepare --out`` writes only into a new or empty folder or into its own earlier output.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import logging
import os
import tempfile
from array import array
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from neurallm.data.bpe import BPE, TOKENIZER_FILE, load_bpe_beside
from neurallm.data.registry import cache_dir
from neurallm.data.sources import SPLITS, Corpus, SourceFile, SourceSettings, document_splits, open_corpus, split_bounds
from neurallm.data.tokenizers import TokenizerSettings, tokenize_line
from neurallm.data.vocab import MAX_VOCAB_BYTES, VOCAB_FILE, Vocab, VocabSettings, build_vocab, check_vocab_has_tokens
from neurallm.errors import DataError
from neurallm.fileio import atomic_folder, disk_full_error, is_disk_full, read_bounded_text
from neurallm.locking import lock_folder

logger = logging.getLogger(__name__)

META_FILE = "meta.json"
SPLIT_FILES = tuple(f"{split}.npy" for split in SPLITS)
FORMAT_VERSION = 3  # 2: whole-folder swap, per-split dtype, max_id and sha256 in meta; 3: chars and bytes per split, BPE
_PROVISIONAL = np.dtype(np.uint32)
_SPOOL_ITEMS = 1 << 18  # provisional ids held in memory before they are appended to the temp file
_BLOCK = 1 << 20  # ids remapped and written per step (4 MB of provisional ids)
_MAX_META_BYTES = 1 << 20


@dataclass
class PreparedCorpus:
    """A prepared corpus folder: vocabulary, per-split id arrays and how they were made."""

    folder: Path
    vocab: Vocab
    meta: dict

    def ids(self, split: str) -> np.ndarray:
        """The split's ids, memory-mapped (read-only)."""
        if split not in self.meta["splits"]:
            raise DataError(f"{self.folder} holds the {', '.join(self.meta['splits'])} split(s) only, not {split}")
        return np.load(self.folder / f"{split}.npy", mmap_mode="r", allow_pickle=False)

    @property
    def tokenizer(self) -> TokenizerSettings:
        return TokenizerSettings(**self.meta["tokenizer"])


def _hash(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def settings_key(source: SourceSettings, tokenizer: TokenizerSettings, vocab: VocabSettings | Vocab) -> str:
    """Hash of how the source is read, tokenized and given ids (not of where it is)."""
    reading = {k: v for k, v in source.to_dict().items() if k not in ("data", "location")}
    vocab_part = vocab.to_json() if isinstance(vocab, Vocab) else asdict(vocab)
    return _hash(FORMAT_VERSION, reading, tokenizer.to_dict(), vocab_part)


def is_prepared(folder: Path) -> bool:
    return (Path(folder) / META_FILE).is_file() and (Path(folder) / VOCAB_FILE).is_file()


def _read_meta(folder: Path) -> dict:
    path = Path(folder) / META_FILE
    try:
        if path.stat().st_size > _MAX_META_BYTES:
            raise DataError(f"{path} is {path.stat().st_size:,} bytes, too large for a neurallm meta.json; "
                            "run `neurallm prepare` again")
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise DataError(f"{path} cannot be read ({exc}); run `neurallm prepare` again") from None
    if not isinstance(meta, dict) or "format_version" not in meta:
        raise DataError(f"{path} is not the meta.json of a neurallm prepared corpus; run `neurallm prepare` again")
    return meta


def load_prepared(folder: Path) -> PreparedCorpus:
    """Open a prepared folder after checking each array against ``meta.json``.

    Raises:
        DataError: the folder is incomplete, from another format version, or its files do not belong together
            (one line naming the file and what differs).
    """
    folder = Path(folder)
    meta = _read_meta(folder)
    if meta["format_version"] != FORMAT_VERSION:
        raise DataError(f"{folder} was prepared by another neurallm version (format {meta['format_version']}, this one "
                        f"reads {FORMAT_VERSION}); run `neurallm prepare` again")
    vocab = Vocab.from_json(read_bounded_text(folder / VOCAB_FILE, MAX_VOCAB_BYTES, "run `neurallm prepare` again",
                                              error=DataError), folder / VOCAB_FILE)
    # a folder encoded for evaluation may hold only the split asked for (prepare_corpus's `splits`)
    splits = list(meta.get("splits") or SPLITS)
    missing = [f"{split}.npy" for split in splits if not (folder / f"{split}.npy").is_file()]
    vocab.bpe = load_bpe_beside(folder)
    if missing:
        raise DataError(f"{folder}: prepared corpus lacks {', '.join(missing)}; run `neurallm prepare` again")
    try:
        if meta["vocab_size"] != len(vocab):
            raise _Mismatch(folder / VOCAB_FILE, f"{len(vocab):,} tokens, meta.json says {meta['vocab_size']:,}")
        for split in splits:
            _check_split(folder / f"{split}.npy", meta["splits"][split]["tokens"], meta["arrays"][split], len(vocab))
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{folder / META_FILE} lacks or garbles an entry ({exc!r}); run `neurallm prepare` again") from None
    except _Mismatch as exc:
        raise DataError(f"{exc.path} does not match {folder / META_FILE} ({exc.what}): the folder is damaged or mixes "
                        "two preparations; run `neurallm prepare` again") from None
    return PreparedCorpus(folder, vocab, meta)


class _Mismatch(Exception):
    def __init__(self, path: Path, what: str) -> None:
        super().__init__(what)
        self.path, self.what = path, what


def _check_split(path: Path, n_tokens: int, entry: dict, vocab_size: int) -> None:
    """Header, length and digest of one ``.npy`` against its meta entry; the ids are read once, in blocks
    (ordinary reads: nothing stays mapped), which costs about 5 ms per million uint16 ids."""
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            if version not in read_header:
                raise ValueError(f"format version {version}")
            shape, fortran_order, dtype = read_header[version](f)
        except ValueError as exc:
            raise _Mismatch(path, f"not a NumPy array file: {exc}") from None
        if dtype != np.dtype(entry["dtype"]) or dtype.kind != "u" or dtype.hasobject:
            raise _Mismatch(path, f"dtype {dtype}, meta.json says {entry['dtype']}")
        if len(shape) != 1 or fortran_order:
            raise _Mismatch(path, f"shape {shape}, expected one dimension")
        if shape[0] != n_tokens:
            raise _Mismatch(path, f"{shape[0]:,} ids, meta.json says {n_tokens:,}")
        if not 0 <= int(entry["max_id"]) < vocab_size:
            raise _Mismatch(path, f"largest id {entry['max_id']} is not below the vocabulary size {vocab_size:,}")
        digest, remaining = hashlib.sha256(), shape[0] * dtype.itemsize
        for block in iter(lambda: f.read(min(remaining, 1 << 22)), b""):
            digest.update(block)
            remaining -= len(block)
        if remaining or f.read(1):
            raise _Mismatch(path, "the file's size does not match its header")
        if digest.hexdigest() != entry["sha256"]:
            raise _Mismatch(path, "the ids' SHA-256 differs")


def check_out_folder(folder: Path) -> None:
    """``prepare --out`` writes only into a new or empty folder or into its own earlier output.

    Its own output is a folder whose meta.json parses as a neurallm prepared corpus and that holds nothing
    else than the files prepare writes: replacing anything else could destroy a run's vocab.json or a user's files.
    """
    folder = Path(folder)
    if not folder.exists():
        return
    if not folder.is_dir():
        raise DataError(f"--out {folder} is a file; prepare writes a folder: choose a new or empty folder")
    names = {p.name for p in folder.iterdir()}
    if not names:
        return
    foreign = sorted(names - {META_FILE, VOCAB_FILE, *SPLIT_FILES})
    own = not foreign and META_FILE in names and _parses_as_meta(folder)
    if not own:
        shown = ", ".join(foreign[:3]) if foreign else "a meta.json that is not neurallm's"
        raise DataError(f"--out {folder} holds files prepare did not write ({shown}); prepare writes only into a new "
                        "or empty folder or its own earlier output: choose another --out")


def _parses_as_meta(folder: Path) -> bool:
    try:
        meta = _read_meta(folder)
    except DataError:
        return False
    return isinstance(meta.get("splits"), dict) and "tokenizer" in meta and "vocab_size" in meta


def cached_corpus(source: SourceSettings, tokenizer: TokenizerSettings, vocab_settings: VocabSettings) -> PreparedCorpus | None:
    """The cache folder :func:`prepare_corpus` made from these files and settings, if it is still there and sound;
    None otherwise. Nothing is tokenised (evaluating a run on its own data reuses what training prepared)."""
    corpus = open_corpus(source)
    source_key = _hash(settings_key(source, tokenizer, vocab_settings), corpus.identity())
    folder = cache_dir() / "prepared" / source_key
    try:
        prepared = load_prepared(folder) if is_prepared(folder) else None
    except DataError:
        return None
    return prepared if prepared is not None and prepared.meta.get("source_key") == source_key else None


def prepare_corpus(
    source: SourceSettings,
    tokenizer: TokenizerSettings,
    vocab_settings: VocabSettings = VocabSettings(),
    *,
    out_dir: Path | None = None,
    vocab: Vocab | None = None,
    splits: tuple[str, ...] = SPLITS,
) -> PreparedCorpus:
    """Tokenize and encode every split of ``source``, or reuse a folder prepared from the same files and settings.

    Args:
        source: where the text is and how to read it.
        tokenizer: how text becomes tokens.
        vocab_settings: how the vocabulary is built from the train split (ignored when ``vocab`` is given).
        out_dir: where to write (a new or empty folder, or an earlier output of prepare); default: the cache
            folder ``<cache>/prepared/<source_key>``.
        vocab: encode with this vocabulary instead of building one (evaluating a trained model).
        splits: the splits to encode; fewer than all only with ``vocab`` given (evaluating one split).

    Raises:
        DataError: unreadable source, too little text, or an ``out_dir`` that holds other files.
        DiskFullError: the disk filled up; the previous folder is left as it was and the temp files are removed.
    """
    if tuple(splits) != SPLITS and vocab is None:
        raise ValueError("prepare_corpus encodes fewer than all splits only with a given vocabulary")
    corpus = open_corpus(source)
    settings = settings_key(source, tokenizer, vocab if vocab is not None else vocab_settings)
    source_key = _hash(settings, corpus.identity()) if tuple(splits) == SPLITS else _hash(settings, corpus.identity(), list(splits))
    folder = Path(out_dir) if out_dir is not None else cache_dir() / "prepared" / source_key
    if out_dir is not None:
        check_out_folder(folder)
    prepared = _reusable(folder, source_key, replacing=out_dir is not None)
    if prepared is not None:
        return prepared
    folder.parent.mkdir(parents=True, exist_ok=True)
    # One writer at a time: a second process preparing into the same --out folder gets one line naming the first;
    # into the cache (two runs of a sweep started together) it waits, then reuses what the first wrote. The lock
    # file lies beside the folder, which is replaced whole. Taken only to write, so readers of a finished folder (a
    # cache hit, the other ranks under torchrun) never wait for it.
    with lock_folder(folder, "a prepared corpus", beside=True, wait=out_dir is None):
        prepared = _reusable(folder, source_key, replacing=False)  # another process may have just written it
        if prepared is not None:
            return prepared
        return _write_prepared(folder, corpus, source, tokenizer, vocab_settings, vocab, splits, settings, source_key)


def _reusable(folder: Path, source_key: str, *, replacing: bool) -> PreparedCorpus | None:
    """The corpus already in ``folder`` if it was prepared from the same files and settings, else None."""
    if not is_prepared(folder):
        return None
    try:
        prepared = load_prepared(folder)
    except DataError as exc:
        logger.info(f"preparing again: {exc}")
        return None
    if prepared.meta.get("source_key") == source_key:
        return prepared
    if replacing:
        logger.info(f"{folder} holds a corpus prepared from other files or settings; replacing it")
    return None


def _write_prepared(folder: Path, corpus: Corpus, source: SourceSettings, tokenizer: TokenizerSettings,
                    vocab_settings: VocabSettings, vocab: Vocab | None, splits: tuple[str, ...], settings,
                    source_key: str) -> PreparedCorpus:
    """Encode ``corpus`` into a temp folder and swap it in as ``folder`` (see :func:`prepare_corpus`)."""
    vocab_given = vocab
    if vocab is None and tokenizer.level == "bpe":
        # the merges are learned from the train split only: valid and test text must not shape the tokens
        bpe = BPE.train((line.lower() if tokenizer.lowercase else line for line in corpus.lines("train")), tokenizer.vocab_size)
        vocab = Vocab(bpe.vocabulary(), bpe=bpe)
    writer = _Writer(corpus, tokenizer, tuple(splits), bpe=vocab.bpe if vocab is not None else None)
    try:
        with atomic_folder(folder) as tmp:
            vocab = writer.write(tmp, vocab, vocab_settings)
            meta = {
                "format_version": FORMAT_VERSION,
                "key": _hash(settings, writer.source_digest.hexdigest()),
                "source_key": source_key,
                "source": source.to_dict(),
                "description": corpus.description,
                "tokenizer": tokenizer.to_dict(),
                "vocab_settings": asdict(vocab_settings),
                "vocab_size": len(vocab),
                # unk: tokens replaced by <unk> because the vocabulary lacks them; unk_targets: scored targets
                # (every token but the first) that are <unk>, whatever made them so (a corpus's own "<unk>" too)
                "splits": {split: {"tokens": a["tokens"], "unk": a["unk"], "unk_targets": a["unk_targets"],
                                   **writer.text_units[split]}
                           for split, a in writer.arrays.items()},
                "empty_dropped": writer.empty_dropped,
                **({"char_space_share": round(writer.char_space_share, 4)} if writer.char_space_share is not None else {}),
                "arrays": {split: {k: a[k] for k in ("dtype", "max_id", "sha256")} for split, a in writer.arrays.items()},
            }
            # plain writes: the temp folder is swapped in whole, after atomic_folder has fsynced every file
            (tmp / VOCAB_FILE).write_text(vocab.to_json(), encoding="utf-8")
            if vocab.bpe is not None:
                (tmp / TOKENIZER_FILE).write_text(vocab.bpe.to_json(), encoding="utf-8")
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        raise disk_full_error(folder, writer.bytes_needed()) from None
    # encoding with a given vocabulary is a step of evaluation, whose output (e.g. `eval --json`) is its result alone
    level = logging.INFO if vocab_given is None else logging.DEBUG
    if writer.empty_dropped:
        logger.log(level, f"dropped {writer.empty_dropped:,} empty row(s)/record(s) of {corpus.description} "
                          "(blank text: they would be lines of one end-of-line token)")
    for split, entry in meta["splits"].items():
        logger.log(level, f"{split}: {entry['tokens']:,} tokens, {entry['unk']:,} replaced by <unk>, "
                          f"{entry['unk_targets']:,} <unk> in all")
    return load_prepared(folder)  # what a later run will see, checked once now


class _CountingDigest:
    """SHA-256 of the source bytes, counting them (to estimate the space a full disk lacked)."""

    def __init__(self) -> None:
        self._sha = hashlib.sha256()
        self.n_bytes = 0

    def update(self, data) -> None:
        self._sha.update(data)
        self.n_bytes += len(data)

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


class _Writer:
    """One preparation: source → provisional ids in a temp file → vocabulary → ``{split}.npy``."""

    def __init__(self, corpus: Corpus, tokenizer: TokenizerSettings, splits: tuple[str, ...] = SPLITS,
                 bpe: BPE | None = None) -> None:
        self.corpus, self.tokenizer, self.splits, self.bpe = corpus, tokenizer, splits, bpe
        self.source_digest = _CountingDigest()
        self.n_provisional = 0
        self.id_itemsize = 4
        self.arrays: dict[str, dict] = {}  # per split: tokens, unk, dtype, max_id, sha256
        # per split: characters and UTF-8 bytes of its text, each line with its line break (the units of bits per
        # character and per byte, see neurallm.evaluation.with_text_units), counted in the same single read
        self.text_units: dict[str, dict[str, int]] = {}
        self._file_units = (0, 0)  # characters and bytes of the file _append read last
        self.unk_id = 0  # the vocabulary's, once it is known
        self.char_space_share: float | None = None  # share of spaces among train's characters (char level)
        self.empty_dropped = 0  # CSV rows and JSONL records with blank text, not turned into lines

    def write(self, tmp: Path, vocab: Vocab | None, vocab_settings: VocabSettings) -> Vocab:
        with tempfile.TemporaryFile(dir=tmp) as spool:
            types, bounds = self._read_provisional(spool, tmp)
            if vocab is None:
                counts = np.zeros(len(types), dtype=np.int64)
                for block in _ranges_blocks(spool, bounds["train"]):
                    counts += np.bincount(block, minlength=len(types))
                if not counts.any():
                    raise DataError(f"{self.corpus.description}: the train split has no text")
                train_counts = Counter({types[i]: int(counts[i]) for i in np.flatnonzero(counts)})
                vocab = build_vocab(train_counts, self.tokenizer.level, min_freq=vocab_settings.min_freq,
                                    max_vocab=vocab_settings.max_vocab)
                check_vocab_has_tokens(vocab, train_counts, vocab_settings, self.tokenizer.level)
                if self.tokenizer.level == "char":  # for the hint on space-separated character files (data/trust.py)
                    self.char_space_share = train_counts.get(" ", 0) / max(1, counts.sum())
            self.id_itemsize = vocab.id_dtype().itemsize
            self.unk_id = vocab.unk_id
            # provisional id → final id; types outside the vocabulary become <unk> (and are counted)
            final = np.fromiter((vocab.index.get(t, -1) for t in types), dtype=np.int64, count=len(types))
            unknown = final < 0
            remap = np.where(unknown, vocab.unk_id, final).astype(vocab.id_dtype())
            for split in self.splits:
                self.arrays[split] = self._write_split(spool, bounds[split], remap, unknown, tmp / f"{split}.npy", split)
        return vocab

    def _read_provisional(self, spool: BinaryIO, tmp: Path) -> tuple[list[str], dict[str, list[tuple[int, int]]]]:
        """Append every file's provisional ids to ``spool``; the token types and each split's [start, stop) ranges
        (one range, except for the documents of a single file split by documents)."""
        table: defaultdict[str, int] = defaultdict(itertools.count().__next__)  # type → provisional id
        bounds: dict[str, list[tuple[int, int]]] = {}
        for source_file in self.corpus.sources:
            first = self.n_provisional
            if source_file.split is not None and source_file.split not in self.splits:
                continue  # a split file nobody asked for is not even read
            if source_file.split is not None:
                self._append(source_file, table, spool, None)
                bounds[source_file.split] = [(first, self.n_provisional)]
                self.text_units[source_file.split] = dict(zip(("chars", "bytes"), self._file_units))
                continue
            # a single file's split points are lines (or documents), known once all are counted: keep where each
            # one ends (in tokens, characters and bytes)
            with tempfile.TemporaryFile(dir=tmp) as ends_file:
                by_documents = self.corpus.split_by == "documents"
                n_units = self._append(source_file, table, spool, ends_file, by_documents)
                if by_documents:
                    self._document_bounds(ends_file, n_units, first, source_file.path, bounds)
                    continue
                for split, (start, stop) in split_bounds(n_units, self.corpus.split_ratios, source_file.path).items():
                    before = _line_end(ends_file, start - 1) if start else (first, 0, 0)
                    after = _line_end(ends_file, stop - 1)
                    bounds[split] = [(before[0], after[0])]
                    self.text_units[split] = {"chars": after[1] - before[1], "bytes": after[2] - before[2]}
        return list(table), bounds

    def _document_bounds(self, ends_file: BinaryIO, n_documents: int, first: int, path: Path,
                         bounds: dict[str, list[tuple[int, int]]]) -> None:
        """Each split's documents, shuffled (see :func:`document_splits`), as ranges of provisional ids. The ends
        are read whole here: 24 bytes per document, not per token."""
        ends_file.flush()
        ends_file.seek(0)
        ends = np.fromfile(ends_file, dtype=np.uint64, count=3 * n_documents).reshape(n_documents, 3).astype(np.int64)
        begins = np.vstack(([first, 0, 0], ends[:-1]))
        for split, chosen in document_splits(n_documents, self.corpus.split_ratios, self.corpus.split_seed, path).items():
            bounds[split] = list(zip(begins[chosen, 0].tolist(), ends[chosen, 0].tolist()))
            sizes = (ends[chosen] - begins[chosen]).sum(axis=0)
            self.text_units[split] = {"chars": int(sizes[1]), "bytes": int(sizes[2])}

    def _append(self, source_file: SourceFile, table: defaultdict[str, int], spool: BinaryIO,
                ends_file: BinaryIO | None, by_documents: bool = False) -> int:
        """Append one file's provisional ids to ``spool`` (and, given ``ends_file``, where each line, or each
        document when ``by_documents``, ends in them, in tokens, characters and bytes); return the number of lines
        (documents). The file's characters and bytes are left in ``self._file_units``."""
        lookup, tokenizer, bpe = table.__getitem__, self.tokenizer, self.bpe
        buffer, unit_ends = array("I"), array("Q")
        starts_unit = source_file.starts_document() if by_documents else (lambda line: True)
        n_units = n_chars = n_bytes = n_lines = 0

        def count_empty() -> None:
            self.empty_dropped += 1

        try:
            for line in source_file.lines(self.source_digest, count_empty):
                begins = starts_unit(line)  # called on every line: a paragraph's start depends on the line before
                if ends_file is not None and n_lines and begins:
                    # the unit before this line ends here
                    unit_ends.extend((self.n_provisional + len(buffer), n_chars, n_bytes))
                    if len(unit_ends) >= _SPOOL_ITEMS:
                        n_units += _flush(unit_ends, ends_file) // 3
                n_lines += 1
                buffer.extend(map(lookup, tokenize_line(line, tokenizer, bpe)))
                n_chars += len(line) + 1
                n_bytes += len(line.encode("utf-8")) + 1
                if len(buffer) >= _SPOOL_ITEMS:
                    self.n_provisional += _flush(buffer, spool)
            if ends_file is not None and n_lines:
                unit_ends.extend((self.n_provisional + len(buffer), n_chars, n_bytes))
            self.n_provisional += _flush(buffer, spool)
            if ends_file is not None:
                n_units += _flush(unit_ends, ends_file) // 3
            self._file_units = (n_chars, n_bytes)
        except OSError:
            self.n_provisional += len(buffer)  # counted for bytes_needed() should the disk be full
            raise
        return n_units

    def _write_split(self, spool: BinaryIO, ranges: list[tuple[int, int]], remap: np.ndarray, unknown: np.ndarray,
                     path: Path, split: str) -> dict:
        """Remap a split's provisional ids into ``path`` with ordinary writes (a memory map of a file the disk
        cannot back dies of SIGBUS); the file's full size is reserved first, so a full disk fails at once."""
        n_tokens = sum(stop - start for start, stop in ranges)
        if n_tokens < 2:
            raise DataError(f"{self.corpus.description}: the {split} split has {n_tokens} token(s); "
                            "a language model needs at least 2")
        header = {"descr": np.lib.format.dtype_to_descr(remap.dtype), "fortran_order": False, "shape": (n_tokens,)}
        digest, n_unk, n_unk_ids, max_id, first_id = hashlib.sha256(), 0, 0, 0, None
        with open(path, "wb") as f:
            np.lib.format.write_array_header_1_0(f, header)
            f.flush()
            _reserve(f, f.tell() + n_tokens * remap.dtype.itemsize)
            for block in _ranges_blocks(spool, ranges):
                if not block.size:
                    continue
                ids = remap[block]
                n_unk += int(np.count_nonzero(unknown[block]))
                n_unk_ids += int(np.count_nonzero(ids == self.unk_id))
                first_id = int(ids[0]) if first_id is None else first_id
                max_id = max(max_id, int(ids.max()))
                data = ids.tobytes()
                digest.update(data)
                f.write(data)
        # the first token is never a target (nothing predicts it)
        return {"tokens": n_tokens, "unk": n_unk, "unk_targets": n_unk_ids - (first_id == self.unk_id),
                "dtype": remap.dtype.str, "max_id": max_id, "sha256": digest.hexdigest()}

    def bytes_needed(self) -> int:
        """Peak disk space of this preparation (provisional ids + id arrays); estimated from the bytes read so
        far when the disk filled up before the whole source was read."""
        total_source = sum(f.stat().st_size for f in self.corpus.files)
        read = max(self.source_digest.n_bytes, 1)
        tokens = self.n_provisional * max(total_source / read, 1.0)
        return int(tokens * (_PROVISIONAL.itemsize + self.id_itemsize)) + (1 << 20)


def _flush(items: array, f: BinaryIO) -> int:
    """Append ``items`` to ``f``, empty them, return how many there were."""
    n = len(items)
    items.tofile(f)
    del items[:]
    return n


def _blocks(spool: BinaryIO, start: int, stop: int):
    """Provisional ids ``[start, stop)`` of ``spool`` in blocks, by ordinary reads (a memory map would count the
    whole file in the process's resident memory as it is read)."""
    spool.flush()
    for first in range(start, stop, _BLOCK):
        spool.seek(first * _PROVISIONAL.itemsize)
        yield np.fromfile(spool, dtype=_PROVISIONAL, count=min(_BLOCK, stop - first))


def _ranges_blocks(spool: BinaryIO, ranges: list[tuple[int, int]]):
    """Provisional ids of each range of ``ranges`` in turn, in blocks (see :func:`_blocks`)."""
    for start, stop in ranges:
        yield from _blocks(spool, start, stop)


def _line_end(ends_file: BinaryIO, line: int) -> tuple[int, int, int]:
    """Where ``line`` ends: (provisional ids, characters, bytes) from the start of its file's records."""
    ends_file.flush()
    ends_file.seek(line * 24)
    return tuple(int(x) for x in np.fromfile(ends_file, dtype=np.uint64, count=3))


def _reserve(f: BinaryIO, size: int) -> None:
    """Reserve ``size`` bytes for ``f`` so that a full disk fails here, before any id is written."""
    if not hasattr(os, "posix_fallocate"):
        return
    try:
        os.posix_fallocate(f.fileno(), 0, size)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS):  # a file system that cannot reserve
            raise

"""Id streams on disk: a prepared corpus is a folder of ``{split}.npy`` files plus ``vocab.json`` and ``meta.json``.

The ids of a split are one flat array in the smallest unsigned dtype that holds the vocabulary, read back
memory-mapped, so a corpus never has to fit in memory as Python lists. The folder is keyed by a hash of the
source bytes and of the tokenizer and vocabulary settings: training on the same data with the same settings
reuses it, any change prepares a new one.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from neurallm.data.registry import cache_dir
from neurallm.data.sources import SPLITS, Corpus, SourceSettings, open_corpus
from neurallm.data.bpe import BPE, TOKENIZER_FILE, load_bpe_beside
from neurallm.data.tokenizers import TokenizerSettings, tokenize_line
from neurallm.data.vocab import Vocab, build_vocab
from neurallm.errors import ConfigError, DataError
from neurallm.fileio import atomic_path, atomic_write_json, atomic_write_text
from neurallm.runtime import log_line
from neurallm.settings import setting

META_FILE = "meta.json"
VOCAB_FILE = "vocab.json"
FORMAT_VERSION = 2  # 2: per-split bytes and chars in meta.json (for bits per byte), BPE
_CHUNK = 1 << 16  # tokens encoded per write


@dataclass(frozen=True)
class VocabSettings:
    """How the vocabulary is built from the training split (each field's ``help`` documents it)."""

    min_freq: int = setting(1, help="drop tokens seen fewer times than this in train")
    max_vocab: int | None = setting(None, help="keep at most this many tokens, specials included",
                                       default_text="none, no cap")

    def __post_init__(self) -> None:
        if self.min_freq < 1:
            raise ConfigError(f"--min-freq must be at least 1, got {self.min_freq}")
        if self.max_vocab is not None and self.max_vocab < 3:
            raise ConfigError(f"--max-vocab must be at least 3 (room for <unk>, <eos> and one word), got {self.max_vocab}")


@dataclass
class PreparedCorpus:
    """A prepared corpus folder: vocabulary, per-split id arrays and how they were made."""

    folder: Path
    vocab: Vocab
    meta: dict

    def ids(self, split: str) -> np.ndarray:
        """The split's ids, memory-mapped (read-only)."""
        return np.load(self.folder / f"{split}.npy", mmap_mode="r", allow_pickle=False)

    @property
    def tokenizer(self) -> TokenizerSettings:
        return TokenizerSettings(**self.meta["tokenizer"])


def corpus_key(fingerprint: str, tokenizer: TokenizerSettings, vocab: VocabSettings | Vocab) -> str:
    """Hash naming a prepared corpus: same source bytes and settings, same key."""
    vocab_part = vocab.to_json() if isinstance(vocab, Vocab) else json.dumps(asdict(vocab), sort_keys=True)
    payload = json.dumps([FORMAT_VERSION, fingerprint, tokenizer.to_dict(), vocab_part], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def is_prepared(folder: Path) -> bool:
    return (Path(folder) / META_FILE).is_file() and (Path(folder) / VOCAB_FILE).is_file()


def load_prepared(folder: Path) -> PreparedCorpus:
    folder = Path(folder)
    try:
        meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{folder / META_FILE} cannot be read ({exc}); run `neurallm prepare` again") from None
    vocab = Vocab.from_json((folder / VOCAB_FILE).read_text(encoding="utf-8"), folder / VOCAB_FILE)
    vocab.bpe = load_bpe_beside(folder)
    missing = [s for s in SPLITS if not (folder / f"{s}.npy").is_file()]
    if missing:
        raise DataError(f"{folder}: prepared corpus lacks {', '.join(missing)}.npy; run `neurallm prepare` again")
    return PreparedCorpus(folder, vocab, meta)


def prepare_corpus(
    source: SourceSettings,
    tokenizer: TokenizerSettings,
    vocab_settings: VocabSettings = VocabSettings(),
    *,
    out_dir: Path | None = None,
    vocab: Vocab | None = None,
    log=log_line,
) -> PreparedCorpus:
    """Tokenize and encode every split of ``source``, or reuse a folder already prepared with the same key.

    Args:
        source: where the text is and how to read it.
        tokenizer: how text becomes tokens.
        vocab_settings: how the vocabulary is built from the train split (ignored when ``vocab`` is given).
        out_dir: where to write; default: the cache folder ``<cache>/prepared/<key>``.
        vocab: encode with this vocabulary instead of building one (evaluating a trained model).
        log: where progress messages go.
    """
    corpus = open_corpus(source)
    key = corpus_key(corpus.fingerprint(source), tokenizer, vocab if vocab is not None else vocab_settings)
    folder = Path(out_dir) if out_dir is not None else cache_dir() / "prepared" / key
    if is_prepared(folder):
        prepared = load_prepared(folder)
        if prepared.meta.get("key") == key:
            return prepared
        if out_dir is not None:
            log(f"{folder} holds a corpus prepared with other settings; replacing it")
    folder.mkdir(parents=True, exist_ok=True)

    if vocab is None and tokenizer.level == "bpe":
        # the merges are learned from the train split only: valid and test text must not shape the tokens
        bpe = BPE.train((line.lower() if tokenizer.lowercase else line for line in corpus.lines("train")), tokenizer.vocab_size)
        vocab = Vocab(bpe.vocabulary(), bpe=bpe)
    if vocab is None:
        counts = Counter()
        for line in corpus.lines("train"):
            counts.update(tokenize_line(line, tokenizer))
        if not counts:
            raise DataError(f"{corpus.description}: the train split has no text")
        vocab = build_vocab(counts, tokenizer.level, min_freq=vocab_settings.min_freq, max_vocab=vocab_settings.max_vocab)

    splits = {split: _encode_split(corpus, split, tokenizer, vocab, folder / f"{split}.npy") for split in SPLITS}
    meta = {
        "format_version": FORMAT_VERSION,
        "key": key,
        "source": source.to_dict(),
        "description": corpus.description,
        "tokenizer": tokenizer.to_dict(),
        "vocab_settings": asdict(vocab_settings),
        "vocab_size": len(vocab),
        "splits": splits,
    }
    atomic_write_text(folder / VOCAB_FILE, vocab.to_json())
    if vocab.bpe is not None:
        atomic_write_text(folder / TOKENIZER_FILE, vocab.bpe.to_json())
    atomic_write_json(folder / META_FILE, meta)  # written last: its presence marks the folder complete
    for split, counts_ in splits.items():
        log(f"{split}: {counts_['tokens']:,} tokens, {counts_['unk']:,} replaced by <unk>")
    return PreparedCorpus(folder, vocab, meta)


def _encode_split(corpus: Corpus, split: str, tokenizer: TokenizerSettings, vocab: Vocab, path: Path) -> dict:
    """Encode one split chunk by chunk into ``path`` (a .npy file); return its token and <unk> counts, and the
    characters and UTF-8 bytes of its text (each line with its line break), the units of bits per byte."""
    dtype = vocab.id_dtype()
    n_tokens = n_unk = n_chars = n_bytes = 0
    with tempfile.TemporaryFile(dir=path.parent) as raw:
        buffer: list[int] = []
        for line in corpus.lines(split):
            ids, unknown = vocab.encode(tokenize_line(line, tokenizer, vocab.bpe))
            buffer.extend(ids)
            n_unk += unknown
            n_chars += len(line) + 1
            n_bytes += len(line.encode("utf-8")) + 1
            if len(buffer) >= _CHUNK:
                raw.write(np.asarray(buffer, dtype=dtype).tobytes())
                n_tokens += len(buffer)
                buffer.clear()
        raw.write(np.asarray(buffer, dtype=dtype).tobytes())
        n_tokens += len(buffer)
        if n_tokens < 2:
            raise DataError(f"{corpus.description}: the {split} split has {n_tokens} token(s); a language model needs at least 2")
        raw.flush()
        source = np.memmap(raw, dtype=dtype, mode="r", shape=(n_tokens,))
        with atomic_path(path) as tmp:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(n_tokens,))
            for start in range(0, n_tokens, _CHUNK * 16):
                out[start : start + _CHUNK * 16] = source[start : start + _CHUNK * 16]
            out.flush()
            del out
        del source
    return {"tokens": n_tokens, "unk": n_unk, "chars": n_chars, "bytes": n_bytes}

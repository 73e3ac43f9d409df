"""Byte-level BPE subwords (``--tokenizer bpe --vocab-size N``), trained with Hugging Face ``tokenizers``.

Why byte-level: every string is a sequence of bytes and the 256 bytes are all in the vocabulary, so any text
(another language, an emoji, a typo) encodes without ``<unk>``; the merges learned on the train split only make
frequent byte sequences single tokens. A word that never occurs in train is therefore spelled in pieces — which
is what the tests check to show that valid and test text did not leak into the tokenizer.

A line is encoded with its line break (``line + "\\n"``), as the word level appends ``<eos>``: the model learns
where lines end. ``<unk>`` is kept as a special token (id 0) only because every neurallm vocabulary has one; a
byte-level BPE never produces it.

The trained tokenizer is saved as ``tokenizer.json`` (the ``tokenizers`` library's own format) beside
``vocab.json`` in the prepared corpus folder and in the run directory.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from neurallm.errors import DataError
from neurallm.fileio import read_bounded_text

TOKENIZER_FILE = "tokenizer.json"
# Read cap of a tokenizer.json that may be crafted: ~60 bytes a token and merge (GPT-2's 50k tokens: 1.4 MB).
MAX_TOKENIZER_BYTES = 64 << 20
# The tokenizers library holds a whole input string and its pre-tokenized pieces at once: a corpus that is one
# 48 MB line made it abort the process past 6.6 GB. Longer lines are fed (and encoded) in pieces of at most this
# many characters, cut before a space, where the byte-level pre-tokenizer cuts anyway, so the tokens are the same.
PIECE_CHARS = 1 << 16
UNK = "<unk>"  # the same spelling as neurallm.data.tokenizers.UNK (not imported: that module imports this one)


def _require_tokenizers():
    try:
        import tokenizers
    except ModuleNotFoundError:
        raise DataError("--tokenizer bpe needs the package tokenizers: pip install tokenizers") from None
    return tokenizers


class BPE:
    """A trained byte-level BPE: text lines → subword tokens (strings) and tokens → text."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer  # a tokenizers.Tokenizer

    @classmethod
    def train(cls, lines: Iterable[str], vocab_size: int) -> "BPE":
        """Learn merges from ``lines`` (the train split, without line breaks) up to ``vocab_size`` tokens."""
        tk = _require_tokenizers()
        tokenizer = tk.Tokenizer(tk.models.BPE(unk_token=None))
        # add_prefix_space=False: a line is encoded exactly as written, so decoding gives it back byte for byte
        tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[UNK], show_progress=False,
                                         initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
        tokenizer.train_from_iterator((piece for line in lines for piece in pieces(line + "\n")), trainer=trainer)
        return cls(tokenizer)

    def tokens(self, line: str) -> list[str]:
        """Subword tokens of one line (without its line break); the line break is encoded at the end."""
        if len(line) < PIECE_CHARS:
            return self.tokenizer.encode(line + "\n", add_special_tokens=False).tokens
        return [token for piece in pieces(line + "\n") for token in self.tokenizer.encode(piece, add_special_tokens=False).tokens]

    def detokenize(self, tokens: list[str]) -> str:
        """Text of a list of tokens (bytes that do not form whole characters yet are shown as U+FFFD)."""
        return self.tokenizer.decoder.decode([t for t in tokens if t != UNK])

    def vocabulary(self) -> list[str]:
        """The tokens in id order (``<unk>`` first)."""
        vocab = self.tokenizer.get_vocab(with_added_tokens=True)
        return sorted(vocab, key=vocab.__getitem__)

    def to_json(self) -> str:
        return self.tokenizer.to_str()

    @classmethod
    def from_json(cls, text: str, source: Path | str = TOKENIZER_FILE) -> "BPE":
        """The BPE saved as ``text`` (the content of a tokenizer.json read from ``source``)."""
        tk = _require_tokenizers()
        try:
            return cls(tk.Tokenizer.from_str(text))
        except Exception as exc:  # tokenizers raises a plain Exception for a malformed file
            raise DataError(f"{source} is not a tokenizers BPE file ({exc}); prepare or train again") from None


def pieces(text: str, size: int | None = None) -> list[str]:
    """``text`` cut into pieces of at most ``size`` characters (default :data:`PIECE_CHARS`), each cut made before a
    space that follows a non-space (where the byte-level pre-tokenizer begins a word anyway); a run of ``size``
    characters with no such space is cut where it must."""
    size = size or PIECE_CHARS
    out, start = [], 0
    while len(text) - start > size:
        cut = text.rfind(" ", start + 1, start + size)
        while cut > start and text[cut - 1].isspace():
            cut = text.rfind(" ", start + 1, cut)
        cut = cut if cut > start else start + size
        out.append(text[start:cut])
        start = cut
    out.append(text[start:])
    return out


def load_bpe_beside(folder: Path) -> BPE | None:
    """The BPE saved in a prepared corpus ``folder``, or None if it has none (read bounded: a tokenizer.json that
    is there but not a regular file, a symlink to ``/dev/zero`` say, is an error, not "no BPE")."""
    path = Path(folder) / TOKENIZER_FILE
    if not os.path.lexists(path):
        return None
    return BPE.from_json(read_bounded_text(path, MAX_TOKENIZER_BYTES, "prepare again", error=DataError), path)

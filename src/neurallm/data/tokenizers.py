"""Turn lines of text into tokens and tokens back into text.

Two levels:

* ``word``: the WikiText convention. A line is split on whitespace and ``<eos>`` is appended at its end, so
  a line break is a token the model learns to predict. ``lowercase`` and ``strip_punctuation`` reproduce the
  news-tutorial preprocessing.
* ``char``: every character is a token and a line break is the token ``"\\n"``.
* ``bpe``: byte-level BPE subwords learned from the train split (:mod:`neurallm.data.bpe`); the line break is
  encoded with each line.
"""

from __future__ import annotations

import re
import string
from dataclasses import asdict, dataclass

from neurallm.data.bpe import BPE
from neurallm.settings import setting

EOS = "<eos>"
UNK = "<unk>"

# Punctuation is replaced by a space rather than deleted, so "well-known" becomes two words, not "wellknown".
# WikiText writes its own markers as " @-@ " etc.; stripping leaves their neighbours as separate words too.
_PUNCTUATION = re.compile("[" + re.escape(string.punctuation) + "]+")
_MARKERS = re.compile(f"({re.escape(UNK)}|{re.escape(EOS)})")
LEVELS = ("word", "char", "bpe")
DEFAULT_BPE_VOCAB = 4096


@dataclass(frozen=True)
class TokenizerSettings:
    """How text becomes tokens; saved with every prepared corpus and every run (each field's ``help`` documents it)."""

    level: str = setting("word", help="word: whitespace split, <eos> at each line end; char: characters; "
                         "bpe: byte-level BPE learned from the train split", choices=LEVELS, aliases=("--tokenizer",))
    bpe_vocab_size: int | None = setting(None, help="BPE vocabulary size, <unk> and the 256 bytes included (--tokenizer bpe only)",
                                         flag="--vocab-size", default_text=f"{DEFAULT_BPE_VOCAB} with --tokenizer bpe")
    lowercase: bool = setting(False, help="lowercase the text before splitting")
    # The special tokens <unk> and <eos> written in a corpus survive --strip-punctuation.
    strip_punctuation: bool = setting(False, help="replace ASCII punctuation by spaces (word level only)")

    def __post_init__(self) -> None:
        from neurallm.errors import ConfigError

        if self.level not in LEVELS:
            raise ConfigError(f"--level (--tokenizer) must be 'word', 'char' or 'bpe', got {self.level!r}")
        if self.level != "word" and self.strip_punctuation:
            raise ConfigError(f"--strip-punctuation applies to --level word only; drop it for --level {self.level}")
        if self.bpe_vocab_size is not None and self.level != "bpe":
            raise ConfigError(f"--vocab-size sets the size of a BPE vocabulary; use it with --tokenizer bpe "
                              f"(--max-vocab caps a {self.level} vocabulary)")
        if self.bpe_vocab_size is not None and self.bpe_vocab_size < 258:
            raise ConfigError(f"--vocab-size must be at least 258 (<unk>, the 256 bytes and one merge), got {self.bpe_vocab_size}")

    @property
    def vocab_size(self) -> int:
        """Size of the BPE vocabulary to learn."""
        return self.bpe_vocab_size or DEFAULT_BPE_VOCAB

    def to_dict(self) -> dict:
        return asdict(self)


def _strip_punctuation(line: str) -> str:
    # Keep the corpus's own <unk> and <eos> markers: stripping "<" and ">" would turn them into the words "unk", "eos".
    parts = _MARKERS.split(line)  # the markers themselves sit at the odd positions
    return "".join(part if i % 2 else _PUNCTUATION.sub(" ", part) for i, part in enumerate(parts))


_LONE_SURROGATES = re.compile("[\ud800-\udfff]")


def replace_undecodable(text: str) -> tuple[str, int]:
    """``text`` with each byte that was not UTF-8 read as U+FFFD, and how many there were.

    Python hands bytes of ``argv`` that do not decode as lone surrogates (``surrogateescape``); they cannot be
    encoded, printed or given to the BPE tokenizer, so they are replaced here, once, at the way in.
    """
    if not _LONE_SURROGATES.search(text):
        return text, 0
    try:
        fixed = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:  # a surrogate that is no escaped byte (from an API caller): replaced alone
        fixed = _LONE_SURROGATES.sub("\ufffd", text)
    return fixed, max(1, fixed.count("\ufffd") - text.count("\ufffd"))


def tokenize_line(line: str, settings: TokenizerSettings, bpe: BPE | None = None) -> list[str]:
    """Tokens of one line of text (without its line break), end-of-line token included.

    ``bpe``: the trained BPE, needed at level ``bpe`` (a vocabulary read from disk carries it as ``vocab.bpe``).
    """
    if settings.lowercase:
        line = line.lower()
    if settings.level == "bpe":
        if bpe is None:
            raise ValueError("level 'bpe' needs the trained BPE (vocab.bpe)")  # a programming error, not a user's
        return bpe.tokens(line)
    if settings.level == "char":
        return list(line) + ["\n"]
    if settings.strip_punctuation:
        line = _strip_punctuation(line)
    return line.split() + [EOS]


class Detokenizer:
    """Tokens to text one at a time (for streamed generation): ``<eos>`` is a line break, words are space-joined.

    ``after_word`` says whether the text so far ends inside a word, so the next word needs a space first. With a
    byte-level ``bpe``, a token may hold part of a character's bytes: such tokens are held back until the
    character is whole (:meth:`flush` gives what is left), so the pieces never show a replacement character.
    """

    def __init__(self, level: str, *, after_word: bool = False, bpe: BPE | None = None) -> None:
        self.level = level
        self.after_word = after_word and level == "word"
        self.bpe = bpe if level == "bpe" else None
        self._held: list[str] = []

    def piece(self, token: str) -> str:
        if self.bpe is not None:
            self._held.append(token)
            text = self.bpe.detokenize(self._held)
            if text.endswith("\ufffd"):
                return ""  # the character is not complete yet
            self._held.clear()
            return text
        if self.level in ("char", "bpe"):
            return token
        if token == EOS:
            self.after_word = False
            return "\n"
        piece = (" " if self.after_word else "") + token
        self.after_word = True
        return piece

    def flush(self) -> str:
        """Text of the tokens still held back (bytes that never became a whole character)."""
        text = self.bpe.detokenize(self._held) if self.bpe is not None and self._held else ""
        self._held.clear()
        return text


def line_break_token(settings: TokenizerSettings, bpe: BPE | None = None) -> str:
    """The token that ends a line: what a document's first token is conditioned on."""
    if settings.level == "bpe" and bpe is not None:
        return bpe.tokens("")[-1]
    return EOS if settings.level == "word" else "\n"


def detokenize(tokens: list[str], level: str, bpe: BPE | None = None) -> str:
    """Text for a list of tokens: ``<eos>`` becomes a line break, words are joined by spaces."""
    detokenizer = Detokenizer(level, bpe=bpe)
    return "".join(detokenizer.piece(token) for token in tokens) + detokenizer.flush()

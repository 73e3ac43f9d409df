"""Turn lines of text into tokens and tokens back into text.

Two levels:

* ``word``: the WikiText convention. A line is split on whitespace and ``<eos>`` is appended at its end, so
  a line break is a token the model learns to predict. ``lowercase`` and ``strip_punctuation`` reproduce the
  news-tutorial preprocessing.
* ``char``: every character is a token and a line break is the token ``"\\n"``.
"""

from __future__ import annotations

import re
import string
from dataclasses import asdict, dataclass

from neurallm.settings import setting

EOS = "<eos>"
UNK = "<unk>"

# Punctuation is replaced by a space rather than deleted, so "well-known" becomes two words, not "wellknown".
# WikiText writes its own markers as " @-@ " etc.; stripping leaves their neighbours as separate words too.
_PUNCTUATION = re.compile("[" + re.escape(string.punctuation) + "]+")
_MARKERS = re.compile(f"({re.escape(UNK)}|{re.escape(EOS)})")
LEVELS = ("word", "char")


@dataclass(frozen=True)
class TokenizerSettings:
    """How text becomes tokens; saved with every prepared corpus and every run (each field's ``help`` documents it)."""

    level: str = setting("word", help="word: whitespace split, <eos> at each line end; char: characters", choices=LEVELS)
    lowercase: bool = setting(False, help="lowercase the text before splitting")
    # The special tokens <unk> and <eos> written in a corpus survive --strip-punctuation.
    strip_punctuation: bool = setting(False, help="replace ASCII punctuation by spaces (word level only)")

    def __post_init__(self) -> None:
        from neurallm.errors import ConfigError

        if self.level not in LEVELS:
            raise ConfigError(f"--level must be 'word' or 'char', got {self.level!r}")
        if self.level == "char" and self.strip_punctuation:
            raise ConfigError("--strip-punctuation applies to --level word only; drop it for --level char")

    def to_dict(self) -> dict:
        return asdict(self)


def _strip_punctuation(line: str) -> str:
    # Keep the corpus's own <unk> and <eos> markers: stripping "<" and ">" would turn them into the words "unk", "eos".
    parts = _MARKERS.split(line)  # the markers themselves sit at the odd positions
    return "".join(part if i % 2 else _PUNCTUATION.sub(" ", part) for i, part in enumerate(parts))


def tokenize_line(line: str, settings: TokenizerSettings) -> list[str]:
    """Tokens of one line of text (without its line break), end-of-line token included."""
    if settings.lowercase:
        line = line.lower()
    if settings.level == "char":
        return list(line) + ["\n"]
    if settings.strip_punctuation:
        line = _strip_punctuation(line)
    return line.split() + [EOS]


class Detokenizer:
    """Tokens to text one at a time (for streamed generation): ``<eos>`` is a line break, words are space-joined.

    ``after_word`` says whether the text so far ends inside a word, so the next word needs a space first.
    """

    def __init__(self, level: str, *, after_word: bool = False) -> None:
        self.level = level
        self.after_word = after_word and level == "word"

    def piece(self, token: str) -> str:
        if self.level == "char":
            return token
        if token == EOS:
            self.after_word = False
            return "\n"
        piece = (" " if self.after_word else "") + token
        self.after_word = True
        return piece


def detokenize(tokens: list[str], level: str) -> str:
    """Text for a list of tokens: ``<eos>`` becomes a line break, words are joined by spaces."""
    detokenizer = Detokenizer(level)
    return "".join(detokenizer.piece(token) for token in tokens)

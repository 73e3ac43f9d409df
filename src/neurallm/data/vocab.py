"""The vocabulary: token ↔ id, built from the training split only."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from neurallm.data.bpe import BPE
from neurallm.data.tokenizers import EOS, UNK
from neurallm.errors import ConfigError, DataError, RunDirError
from neurallm.settings import setting

if TYPE_CHECKING:
    import numpy as np

VOCAB_FILE = "vocab.json"  # in a prepared corpus folder and in a run folder
# Read cap of a vocab.json that may be crafted: about 20 bytes a token (wikitext-103's 267k tokens: ~5 MB).
MAX_VOCAB_BYTES = 256 << 20


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
class Vocab:
    """An ordered list of tokens; a token's id is its index.

    ``<unk>`` is always present (id 0) so that any text can be encoded; at word level ``<eos>`` is id 1.
    At level ``bpe`` the tokens are the BPE's, in its id order, and ``bpe`` is the trained BPE that makes
    them from text (saved beside ``vocab.json`` as ``tokenizer.json``).
    """

    tokens: list[str]
    bpe: BPE | None = field(default=None, repr=False, compare=False)
    index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.index = {token: i for i, token in enumerate(self.tokens)}
        if len(self.index) != len(self.tokens):
            raise RunDirError("the vocabulary lists a token twice; rebuild it with `neurallm prepare`")
        if UNK not in self.index:
            raise RunDirError(f"the vocabulary has no {UNK} token; rebuild it with `neurallm prepare`")

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def unk_id(self) -> int:
        return self.index[UNK]

    def encode(self, tokens: Iterable[str]) -> tuple[list[int], int]:
        """Ids of ``tokens`` and the number of tokens replaced by ``<unk>`` because they are not in the vocabulary."""
        unk = self.unk_id
        ids = [self.index.get(token, -1) for token in tokens]
        unknown = sum(1 for i in ids if i < 0)
        return ([unk if i < 0 else i for i in ids], unknown)

    def decode(self, ids: Iterable[int]) -> list[str]:
        return [self.tokens[i] for i in ids]

    def id_dtype(self) -> np.dtype:
        """Smallest unsigned integer type that holds every id."""
        import numpy as np  # here: the CLI imports this module (for VocabSettings) before it knows it needs numpy

        for dtype in (np.uint8, np.uint16, np.uint32):
            if len(self.tokens) - 1 <= np.iinfo(dtype).max:
                return np.dtype(dtype)
        return np.dtype(np.uint64)

    def to_json(self) -> str:
        return json.dumps({"tokens": self.tokens}, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str, source: Path | str = "vocab.json") -> "Vocab":
        try:
            data = json.loads(text)
            tokens = data["tokens"]
        except (json.JSONDecodeError, RecursionError, KeyError, TypeError) as exc:
            raise RunDirError(f"{source} is not a neurallm vocabulary ({exc}); rebuild it with `neurallm prepare`") from exc
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise RunDirError(f"{source} must hold a list of strings under 'tokens'")
        return cls(tokens)


def build_vocab(counts: Counter, level: str, *, min_freq: int = 1, max_vocab: int | None = None) -> Vocab:
    """Vocabulary from token counts of the training split.

    Tokens are ordered by falling frequency, ties broken alphabetically so that the same corpus always gives
    the same ids. ``min_freq`` drops rare tokens; ``max_vocab`` caps the size, specials included.
    """
    specials = [UNK, EOS] if level == "word" else [UNK]
    ranked = sorted(
        (t for t, c in counts.items() if c >= min_freq and t not in specials),
        key=lambda t: (-counts[t], t),
    )
    tokens = specials + ranked
    if max_vocab is not None:
        tokens = tokens[:max_vocab]
    return Vocab(tokens)


def check_vocab_has_tokens(vocab: Vocab, counts: Counter, settings: VocabSettings, level: str) -> None:
    """Refuse a vocabulary that holds nothing but its special tokens: every text would become ``<unk>``
    (``<eos>``), which a model predicts perfectly and learns nothing from.

    Raises:
        DataError: naming ``--min-freq`` and the largest value that keeps a token.
    """
    specials = {UNK, EOS} if level == "word" else {UNK}
    if any(token not in specials for token in vocab.tokens):
        return
    ordinary = [count for token, count in counts.items() if token not in specials]
    if not ordinary:
        raise DataError("the train split holds no token besides <unk> and <eos>; give a corpus with text in it")
    raise DataError(f"--min-freq {settings.min_freq} leaves only <unk> in the vocabulary (the most frequent train "
                    f"token occurs {max(ordinary):,} times); choose --min-freq {max(ordinary):,} or lower")

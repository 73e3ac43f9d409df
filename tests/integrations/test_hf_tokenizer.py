"""The exported tokenizer (a ``tokenizers`` object) gives neurallm's tokens for any text, at every setting."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from neurallm.data.tokenizers import TokenizerSettings, tokenize_line
from neurallm.data.vocab import Vocab
from neurallm.integrations.hf_tokenizer import build_tokenizer

WORDS = ["the", "The", "cat", "cat,", "well", "known", "x", "<unk>", "<eos>", "<UNK>", "a_b", "Ünï"]
PIECES = WORDS + [" ", "  ", "\t", "\n", "\r\n", "\r", "\x0c", "\x1f", "\u2028", ",", "-", "...", "(", ")", "@-@", "😀", "Σ"]
VOCAB = Vocab(["<unk>", "<eos>", "the", "cat", "well", "known", "x", "The", "cat,", "a", "b", "a_b"])


def neurallm_ids(text: str, tokenizer: TokenizerSettings, vocab: Vocab = VOCAB) -> list[int]:
    """What neurallm reads: each line's tokens, the last line's end-of-line token only if the text ends a line."""
    tokens = [t for line in text.splitlines() for t in tokenize_line(line, tokenizer)]
    if text.splitlines(keepends=True) and text.splitlines(keepends=True)[-1] == text.splitlines()[-1]:
        tokens = tokens[:-1]  # an unfinished last line
    return vocab.encode(tokens)[0]


@pytest.mark.parametrize("lowercase, strip", [(False, False), (True, False), (False, True), (True, True)])
@settings(max_examples=150, deadline=None)
@given(pieces=st.lists(st.sampled_from(PIECES), max_size=25))
def test_word_level_ids_equal_neurallms(lowercase, strip, pieces):
    text = "".join(pieces)
    tokenizer = TokenizerSettings(level="word", lowercase=lowercase, strip_punctuation=strip)
    assert build_tokenizer(VOCAB, tokenizer).encode(text).ids == neurallm_ids(text, tokenizer), repr(text)


@pytest.mark.parametrize("lowercase", [False, True])
@settings(max_examples=150, deadline=None)
@given(pieces=st.lists(st.sampled_from(PIECES), max_size=25))
def test_char_level_ids_equal_neurallms(lowercase, pieces):
    text = "".join(pieces)
    tokenizer = TokenizerSettings(level="char", lowercase=lowercase)
    vocab = Vocab(["<unk>", "\n", " ", "t", "h", "e", "c", "a", "T", ",", "<", ">", "😀"])
    assert build_tokenizer(vocab, tokenizer).encode(text).ids == neurallm_ids(text, tokenizer, vocab), repr(text)

"""Tokens: word level is the WikiText convention, char level is every character; detokenize undoes both."""

from __future__ import annotations

import pytest

from neurallm.data.tokenizers import EOS, UNK, TokenizerSettings, detokenize, tokenize_line
from neurallm.errors import ConfigError

WORD = TokenizerSettings()
NEWS = TokenizerSettings(lowercase=True, strip_punctuation=True)
CHAR = TokenizerSettings(level="char")


def test_word_level_splits_on_whitespace_and_ends_every_line_with_eos():
    assert tokenize_line(" The  cat\tsat on the mat . ", WORD) == ["The", "cat", "sat", "on", "the", "mat", ".", EOS]


def test_an_empty_line_is_one_eos_token():
    assert tokenize_line("", WORD) == [EOS]
    assert tokenize_line("   ", WORD) == [EOS]


def test_wikitext_lines_keep_their_markers_as_words():
    line = " = Valkyria Chronicles III = "
    assert tokenize_line(line, WORD) == ["=", "Valkyria", "Chronicles", "III", "=", EOS]
    assert tokenize_line(" the 1 @,@ 000 @-@ year <unk> ", WORD) == ["the", "1", "@,@", "000", "@-@", "year", UNK, EOS]


def test_news_preprocessing_lowercases_and_turns_punctuation_into_spaces():
    line = "Wall St. Bears Claw Back Into the Black (Reuters), well-known 'sellers' #36;10"
    assert tokenize_line(line, NEWS) == [
        "wall", "st", "bears", "claw", "back", "into", "the", "black", "reuters", "well", "known", "sellers", "36", "10",
        EOS,
    ]


@pytest.mark.parametrize(
    "settings",
    [TokenizerSettings(lowercase=True), TokenizerSettings(strip_punctuation=True), NEWS],
    ids=["lowercase", "strip-punctuation", "both"],
)
def test_unk_in_the_corpus_survives_the_news_preprocessing(settings):
    tokens = tokenize_line("The <unk> said, <unk> .", settings)
    assert tokens.count(UNK) == 2
    assert "unk" not in tokens


def test_eos_written_in_the_corpus_survives_strip_punctuation_as_the_word_level_does():
    line = "one sentence. <eos> another, <unk>."
    assert tokenize_line(line, NEWS) == ["one", "sentence", EOS, "another", UNK, EOS]
    assert tokenize_line(line, WORD).count(EOS) == 2


def test_char_level_has_every_character_and_newline_as_a_token():
    assert tokenize_line("ab c!", CHAR) == ["a", "b", " ", "c", "!", "\n"]
    assert tokenize_line("", CHAR) == ["\n"]


def test_char_level_can_be_lowercased():
    assert tokenize_line("AbC", TokenizerSettings(level="char", lowercase=True)) == ["a", "b", "c", "\n"]


def test_strip_punctuation_at_char_level_is_a_config_error_naming_the_flag():
    with pytest.raises(ConfigError, match="--strip-punctuation"):
        TokenizerSettings(level="char", strip_punctuation=True)


def test_unknown_level_is_a_config_error():
    with pytest.raises(ConfigError, match="--level"):
        TokenizerSettings(level="byte")


def test_detokenize_writes_eos_as_a_line_break():
    assert detokenize(["the", "cat", EOS, "a", "dog", EOS], "word") == "the cat\na dog\n"
    assert detokenize([EOS, EOS, "x"], "word") == "\n\nx"


def test_detokenize_at_char_level_joins_characters():
    assert detokenize(["h", "i", "\n", " ", "!"], "char") == "hi\n !"


@pytest.mark.parametrize("settings", [WORD, CHAR], ids=["word", "char"])
def test_tokenize_then_detokenize_gives_back_the_normalised_text(settings):
    lines = [" = Robert = ", " he was born in 1900 . ", "", " it was <unk> ."]
    tokens = [t for line in lines for t in tokenize_line(line, settings)]
    expected = "".join(" ".join(line.split()) + "\n" for line in lines) if settings.level == "word" else "".join(
        line + "\n" for line in lines
    )
    assert detokenize(tokens, settings.level) == expected

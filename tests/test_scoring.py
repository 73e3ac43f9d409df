"""Scoring texts: exact evaluation's rules applied to given texts, line by line."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from neurallm.config import ModelConfig
from neurallm.data.tokenizers import EOS, UNK, TokenizerSettings
from neurallm.data.vocab import Vocab
from neurallm.evaluation import evaluate
from neurallm.models import build_model
from neurallm.scoring import score_texts

WORD = TokenizerSettings()
VOCAB = Vocab([UNK, EOS, "the", "cat", "sat", "on", "mat", "a", "dog"])
TEXT = "the cat sat on the mat\na dog sat\nthe cat sat on a dog on the mat the cat"


def _model(model: str, **settings) -> torch.nn.Module:
    torch.manual_seed(0)
    base = dict(model=model, vocab_size=len(VOCAB), emsize=16, nhid=16, nlayers=1, dropout=0.0)
    return build_model(ModelConfig(**{**base, **settings})).eval()


def _stream(text: str) -> np.ndarray:
    tokens = [EOS] + [t for line in text.splitlines() for t in line.split() + [EOS]]
    return np.asarray(VOCAB.encode(tokens)[0], dtype=np.int64)


@pytest.mark.parametrize("model,settings", [("LSTM", {}), ("GRU", {}), ("Transformer", {}), ("Transformer", {"memory": 4})])
def test_a_text_scores_exactly_as_evaluation_scores_it_read_after_a_line_break(model, settings):
    net = _model(model, **settings)
    (scored,) = score_texts(net, VOCAB, WORD, [TEXT], bptt=6)
    expected = evaluate(net, _stream(TEXT), batch_size=1, bptt=6)
    assert len(scored.tokens) == expected.tokens == 7 + 4 + 12  # words and an <eos> per line
    assert scored.loss == pytest.approx(expected.loss, rel=1e-5)
    assert scored.ppl == pytest.approx(math.exp(expected.loss), rel=1e-5)
    assert scored.total_loss == pytest.approx(-sum(scored.logprobs))


def test_each_line_is_scored_with_the_lines_before_it_unless_independent():
    net = _model("LSTM")
    (carried,) = score_texts(net, VOCAB, WORD, [TEXT], bptt=6)
    (independent,) = score_texts(net, VOCAB, WORD, [TEXT], bptt=6, independent=True)
    second_alone = score_texts(net, VOCAB, WORD, ["a dog sat"], bptt=6)[0].lines[0]
    assert [line.text for line in carried.lines] == TEXT.splitlines()
    assert independent.lines[1].logprobs == pytest.approx(second_alone.logprobs)
    assert carried.lines[1].logprobs != pytest.approx(second_alone.logprobs)  # the first line is its context
    assert carried.lines[0].logprobs == pytest.approx(independent.lines[0].logprobs)  # nothing before line 1


def test_texts_are_separate_documents():
    net = _model("LSTM")
    together = score_texts(net, VOCAB, WORD, ["the cat sat", "a dog sat"], bptt=6)
    alone = score_texts(net, VOCAB, WORD, ["a dog sat"], bptt=6)
    assert together[1].logprobs == pytest.approx(alone[0].logprobs)


def test_unknown_words_are_scored_as_unk_and_counted():
    net = _model("LSTM")
    (scored,) = score_texts(net, VOCAB, WORD, ["the zebra sat on the moon"], bptt=6)
    (as_unk,) = score_texts(net, VOCAB, WORD, [f"the {UNK} sat on the {UNK}"], bptt=6)
    assert scored.unknown == 2 and scored.lines[0].unknown == 2
    assert scored.tokens[1] == "zebra"
    assert scored.logprobs == pytest.approx(as_unk.logprobs)


def test_line_scores_add_up_and_a_per_line_perplexity_is_its_own_mean():
    net = _model("GRU")
    (scored,) = score_texts(net, VOCAB, WORD, [TEXT], bptt=6)
    assert sum(line.logprob for line in scored.lines) == pytest.approx(scored.logprob)
    line = scored.lines[1]
    assert line.ppl == pytest.approx(math.exp(-sum(line.logprobs) / len(line.tokens)))
    assert line.to_dict()["tokens"] == 4 and all(value <= 0 for value in scored.logprobs)


def test_character_level_texts_score_every_character_and_line_break():
    chars = Vocab([UNK, "\n", "a", "b"])
    torch.manual_seed(0)
    net = build_model(ModelConfig(model="LSTM", vocab_size=len(chars), emsize=8, nhid=8, nlayers=1, dropout=0.0)).eval()
    (scored,) = score_texts(net, chars, TokenizerSettings(level="char"), ["ab\nba"], bptt=4)
    assert scored.tokens == ["a", "b", "\n", "b", "a", "\n"]
    ids = np.asarray(chars.encode(["\n"] + scored.tokens)[0])
    assert scored.loss == pytest.approx(evaluate(net, ids, batch_size=1, bptt=4).loss, rel=1e-5)


def test_scoring_turns_dropout_off_and_gives_the_callers_mode_back():
    torch.manual_seed(0)
    net = build_model(ModelConfig(model="LSTM", vocab_size=len(VOCAB), emsize=16, nhid=16, nlayers=2, dropout=0.5)).train()
    first = score_texts(net, VOCAB, WORD, [TEXT], bptt=6)[0].logprobs
    assert net.training
    assert score_texts(net, VOCAB, WORD, [TEXT], bptt=6)[0].logprobs == pytest.approx(first)  # no dropout noise


@pytest.mark.parametrize("model,settings", [("LSTM", {}), ("Transformer", {}), ("Transformer", {"memory": 4})])
def test_a_long_document_read_in_pieces_scores_as_in_one_piece_and_as_evaluation(model, settings, monkeypatch):
    import neurallm.scoring as scoring

    net = _model(model, **settings)
    long_text = "\n".join([TEXT] * 12)
    (whole,) = score_texts(net, VOCAB, WORD, [long_text], bptt=6)
    monkeypatch.setattr(scoring, "_PIECE_TARGETS", 7)  # pieces of one or two windows: many pieces per line
    monkeypatch.setattr(scoring, "_SLIDING_WINDOWS_PER_PIECE", 1)
    lines = list(scoring.score_lines(net, VOCAB, WORD, iter(long_text.splitlines()), bptt=6))
    assert [line.text for line in lines] == long_text.splitlines()
    assert [v for line in lines for v in line.logprobs] == pytest.approx(whole.logprobs, abs=1e-5)
    expected = evaluate(net, _stream(long_text), batch_size=1, bptt=6)
    assert -sum(v for line in lines for v in line.logprobs) / expected.tokens == pytest.approx(expected.loss, rel=1e-5)


def test_score_lines_yields_each_line_before_reading_the_rest():
    import neurallm.scoring as scoring

    net = _model("LSTM")
    read = []

    def lines():
        for number in range(100_000):
            read.append(number)
            yield "the cat sat on the mat"

    scores = scoring.score_lines(net, VOCAB, WORD, lines(), bptt=6)
    first = next(scores)
    assert first.text == "the cat sat on the mat"
    assert len(read) < 10_000  # streamed: a piece of the document, not all of it, was read for the first line


def test_unk_written_in_a_text_counts_as_unknown_and_bad_bytes_become_replacement_characters():
    net = _model("LSTM")
    (scored,) = score_texts(net, VOCAB, WORD, ["the <unk> sat zebra"], bptt=6)
    assert scored.unknown == 2  # "<unk>" as written and "zebra", not in the vocabulary
    undecodable = b"the cat \xff\xfe sat".decode("utf-8", "surrogateescape")  # as argv hands such bytes over
    (line,) = score_texts(net, VOCAB, WORD, [undecodable], bptt=6)[0].lines
    assert line.text == "the cat \ufffd\ufffd sat" and line.replaced == 2

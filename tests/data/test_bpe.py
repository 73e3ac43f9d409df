"""Byte-level BPE (``--tokenizer bpe --vocab-size N``) and bits per byte, the measure that compares tokenizers."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

import neurallm
from neurallm.data.bpe import BPE, TOKENIZER_FILE
from neurallm.errors import ConfigError
from tests.conftest import TINY_MODEL

pytest.importorskip("tokenizers")

TRAIN_PHRASES = ["the cat sat on the mat", "a dog ran in the park", "café au lait, s'il vous plaît", "naïve résumé"]
TEST_ONLY_WORD = "zyxwvutsrq"


def write_corpus(folder: Path) -> Path:
    """Train text from a few phrases (accents: more bytes than characters); the test split repeats a word that
    train never has, often enough that a BPE trained on the test text would make it one token."""
    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    lines = {"train": [" ".join(rng.choice(TRAIN_PHRASES) for _ in range(2)) for _ in range(200)]}
    lines["valid"] = lines["train"][:40]
    lines["test"] = [f"the {TEST_ONLY_WORD} sat on the mat" for _ in range(40)] + lines["train"][:10]
    for split, text in lines.items():
        (folder / f"{split}.txt").write_text("\n".join(text) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("bpe") / "corpus")


def test_the_bpe_is_learned_from_the_train_split_only(corpus, tmp_path):
    prepared = neurallm.prepare(corpus, tmp_path / "prepared", level="bpe", bpe_vocab_size=300)
    bpe = prepared.vocab.bpe
    assert (tmp_path / "prepared" / TOKENIZER_FILE).is_file()
    assert "Ġcat" in prepared.vocab.index  # a train word became one token
    assert len(bpe.tokens(f"the {TEST_ONLY_WORD}")) > 3  # the test-only word is spelled in pieces...
    leaked = BPE.train(Path(corpus / "test.txt").read_text(encoding="utf-8").splitlines() * 5, 300)
    assert f"Ġ{TEST_ONLY_WORD}" in leaked.tokenizer.get_vocab()  # ...which it would not be, had test been seen


def test_bpe_round_trips_text_byte_for_byte(corpus, tmp_path):
    bpe = neurallm.prepare(corpus, tmp_path / "p", level="bpe", bpe_vocab_size=300).vocab.bpe
    for line in ["naïve résumé", "  two  spaces ", "never seen: 東京 ✓", ""]:
        assert bpe.detokenize(bpe.tokens(line)) == line + "\n"
    assert "<unk>" not in bpe.tokens("東京")  # byte level: nothing is unknown


def test_vocab_size_only_with_bpe():
    with pytest.raises(ConfigError, match="--vocab-size"):
        neurallm.prepare("unused", level="word", bpe_vocab_size=300)
    with pytest.raises(ConfigError, match="at least 258"):
        neurallm.prepare("unused", level="bpe", bpe_vocab_size=100)


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory) -> dict[str, Path]:
    """The same text modelled by a word, a char and a BPE model."""
    root = tmp_path_factory.mktemp("bpe-runs")
    out = {}
    for level, extra in (("word", {}), ("char", {}), ("bpe", {"bpe_vocab_size": 300})):
        neurallm.train(corpus, root / level, progress=False, level=level, **TINY_MODEL, **extra)
        out[level] = root / level
    return out


def test_bpe_trains_evaluates_and_generates_end_to_end(runs):
    folder = runs["bpe"]
    assert (folder / TOKENIZER_FILE).is_file()
    results = json.loads((folder / "results.json").read_text())["test"]
    assert results["bpb"] > 0 and results["bpc"] > 0
    run = neurallm.load_run(folder)
    assert run.vocab.bpe is not None and len(run.vocab) == 300
    result = run.evaluate(split="test")
    assert result.bpb == pytest.approx(results["bpb"])
    text = run.generate("the cat", tokens=20, seed=3).text
    assert text.startswith("the cat") and len(text) > len("the cat")
    assert run.generate("the cat", tokens=20, seed=3).text == text


def test_bits_per_byte_is_total_bits_over_the_texts_bytes_for_every_tokenizer(runs, corpus):
    raw = (corpus / "test.txt").read_text(encoding="utf-8")
    n_bytes, n_chars = len(raw.encode("utf-8")), len(raw)
    assert n_bytes > n_chars  # the accents make the two units differ, so mixing them up would show
    for level, folder in runs.items():
        run = neurallm.load_run(folder)
        result = run.evaluate(split="test")
        split_tokens = len(run.eval_data().ids("test"))
        total_bits = result.loss / math.log(2) * split_tokens  # the loss charged to every token of the split
        assert result.bpb == pytest.approx(total_bits / n_bytes, rel=1e-9), level
        assert result.bpc == pytest.approx(total_bits / n_chars, rel=1e-9), level
        assert result.to_dict(run.level)["bpb"] == result.bpb
    char = neurallm.load_run(runs["char"]).evaluate(split="test")
    assert char.bpc == pytest.approx(char.loss / math.log(2))  # characters are the char model's tokens
    assert char.bpb == pytest.approx(char.bpc * n_chars / n_bytes)


def test_eval_cli_reports_bpb(runs, capsys):
    from neurallm.cli import main

    assert main(["eval", str(runs["word"]), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert {"ppl", "bpb", "bpc"} <= set(summary)


def test_a_single_files_bytes_and_characters_are_split_with_its_lines(tmp_path):
    text = "".join(f"ligne {i} déjà vue\n" if i % 3 else f"line {i}\n" for i in range(100))
    (tmp_path / "book.txt").write_text(text, encoding="utf-8")
    splits = neurallm.prepare(tmp_path / "book.txt", tmp_path / "p").meta["splits"]
    lines = text.splitlines(keepends=True)
    test_text = "".join(lines[95:])  # 90/5/5 by lines
    assert splits["test"]["chars"] == len(test_text) and splits["test"]["bytes"] == len(test_text.encode("utf-8"))
    assert sum(s["chars"] for s in splits.values()) == len(text)
    assert sum(s["bytes"] for s in splits.values()) == len(text.encode("utf-8"))


def test_streamed_bpe_text_never_shows_half_a_character_and_adds_up_to_the_text():
    """A byte-level token can end inside a character (é is two bytes, 語 three): streaming holds it back."""
    import torch

    from neurallm.config import ModelConfig
    from neurallm.data.tokenizers import Detokenizer, TokenizerSettings
    from neurallm.data.vocab import Vocab
    from neurallm.generation import generate
    from neurallm.models import build_model

    bpe = BPE.train(["café déjà vu 日本語のテキスト"] * 20, 300)
    tokens = bpe.tokens("日本語 café")
    assert any("\ufffd" in bpe.detokenize([t]) for t in tokens)  # some token alone is half a character
    detokenizer = Detokenizer("bpe", bpe=bpe)
    pieces = [detokenizer.piece(t) for t in tokens] + [detokenizer.flush()]
    assert not any("\ufffd" in piece for piece in pieces)
    assert "".join(pieces) == bpe.detokenize(tokens) == "日本語 café\n"

    vocab = Vocab(bpe.vocabulary(), bpe=bpe)
    torch.manual_seed(0)
    net = build_model(ModelConfig(model="GRU", vocab_size=len(vocab), emsize=8, nhid=8, nlayers=1, dropout=0.0)).eval()
    streamed: list[str] = []
    result = generate(net, vocab, TokenizerSettings(level="bpe"), prompt="café", tokens=60, seed=5, on_text=streamed.append)
    # an untrained model samples byte sequences that are not UTF-8 at all, so only the sum is checked here
    assert "".join(streamed) == result.text


def test_a_corpus_that_is_one_long_line_is_fed_in_bounded_pieces_with_the_same_tokens(monkeypatch):
    import neurallm.data.bpe as bpe_module
    from neurallm.data.bpe import BPE, pieces

    words = [f"w{i % 97}x{i % 13}" for i in range(6000)]
    line = " ".join(words) + "  double  spaces end"
    cut = pieces(line, 500)
    assert "".join(cut) == line and all(len(p) <= 500 for p in cut) and len(cut) > 10
    assert all(p.startswith(" ") for p in cut[1:])  # cut before a word's leading space
    whole = BPE.train([line], 300)
    expected = whole.tokens(line)
    monkeypatch.setattr(bpe_module, "PIECE_CHARS", 500)
    seen = []
    original = bpe_module.pieces
    monkeypatch.setattr(bpe_module, "pieces", lambda text, size=None: seen.append(original(text, size)) or seen[-1])
    pieced = BPE.train([line], 300)
    assert max(len(p) for p in seen[0]) <= 500  # the tokenizer never saw the whole line
    assert whole.tokens(line) == expected  # encoded in 500-character pieces: the same tokens as in one piece
    assert pieced.vocabulary() == whole.vocabulary()  # and the merges learned from pieces are the same
    assert "".join(pieced.detokenize(pieced.tokens(line))) == line + "\n"

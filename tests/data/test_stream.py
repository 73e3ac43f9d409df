"""Prepared corpora: ``{split}.npy`` id streams in the smallest dtype, vocab.json, meta.json, keyed and reused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from neurallm.api import prepare
from neurallm.data import stream
from neurallm.data.sources import SPLITS
from neurallm.data.stream import load_prepared
from neurallm.data.tokenizers import UNK, TokenizerSettings, detokenize

REPO = Path(__file__).resolve().parents[2]


def _quiet(message: str) -> None:
    pass


def _prepare(data, out=None, **settings):
    return prepare(data, out, log=_quiet, **settings)


def test_prepare_writes_id_streams_vocab_and_meta(tiny_corpus, tmp_path):
    out = tmp_path / "prepared"
    prepared = _prepare(tiny_corpus, out)
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "test.npy", "train.npy", "valid.npy", "vocab.json"]
    meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    assert meta["key"] == prepared.meta["key"]
    assert meta["vocab_size"] == len(prepared.vocab) == len(json.loads((out / "vocab.json").read_text())["tokens"])
    assert meta["tokenizer"] == {"level": "word", "bpe_vocab_size": None, "lowercase": False, "strip_punctuation": False}
    for split in SPLITS:
        assert meta["splits"][split]["tokens"] == len(prepared.ids(split))
        assert meta["splits"][split]["unk"] == 0


def test_ids_read_back_memory_mapped_without_pickle_and_decode_to_the_text(tiny_corpus, tmp_path):
    prepared = _prepare(tiny_corpus, tmp_path / "prepared")
    ids = prepared.ids("valid")
    assert isinstance(ids, np.memmap)
    assert not ids.flags.writeable
    again = np.load(tmp_path / "prepared" / "valid.npy", allow_pickle=False)
    assert np.array_equal(again, ids)
    text = (tiny_corpus / "valid.txt").read_text(encoding="utf-8")
    assert detokenize(prepared.vocab.decode(ids.tolist()), "word") == text


def test_a_word_corpus_with_a_small_vocabulary_is_stored_as_uint8(tiny_corpus, tmp_path):
    assert _prepare(tiny_corpus, tmp_path / "p").ids("train").dtype == np.uint8


def test_a_char_corpus_is_stored_as_uint8(tiny_corpus, tmp_path):
    prepared = _prepare(tiny_corpus, tmp_path / "p", level="char")
    assert prepared.ids("train").dtype == np.uint8
    assert "\n" in prepared.vocab.index
    assert prepared.meta["splits"]["train"]["tokens"] == len((tiny_corpus / "train.txt").read_text(encoding="utf-8"))


def test_13777_words_are_stored_as_uint16(shared_data, tmp_path):
    prepared = _prepare(shared_data / "wt2-lite", tmp_path / "wt2")
    for split in SPLITS:
        ids = np.load(tmp_path / "wt2" / f"{split}.npy", mmap_mode="r", allow_pickle=False)
        assert ids.dtype == np.uint16
        assert int(ids.max()) < len(prepared.vocab)


def test_the_same_corpus_gives_the_same_vocabulary_and_ids(tiny_corpus, tmp_path):
    first = _prepare(tiny_corpus, tmp_path / "first")
    second = _prepare(tiny_corpus, tmp_path / "second")
    assert first.meta["key"] == second.meta["key"]
    assert first.vocab.tokens == second.vocab.tokens
    for split in SPLITS:
        assert np.array_equal(first.ids(split), second.ids(split))


def test_preparing_again_reuses_the_folder_without_rewriting(tiny_corpus, tmp_path, monkeypatch):
    out = tmp_path / "prepared"
    first = _prepare(tiny_corpus, out)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    def must_not_encode(*args, **kwargs):
        raise AssertionError("a prepared corpus was encoded again")

    monkeypatch.setattr(stream, "_encode_split", must_not_encode)
    second = _prepare(tiny_corpus, out)
    assert second.meta["key"] == first.meta["key"]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes


def test_the_default_cache_folder_is_named_by_the_key_and_reused(tiny_corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("NEURALLM_CACHE", str(tmp_path / "cache"))
    first = _prepare(tiny_corpus)
    assert first.folder == tmp_path / "cache" / "prepared" / first.meta["key"]
    monkeypatch.setattr(stream, "_encode_split", lambda *a, **k: pytest.fail("encoded again"))
    assert _prepare(tiny_corpus).folder == first.folder


def test_the_key_depends_on_the_bytes_and_every_setting(tiny_corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("NEURALLM_CACHE", str(tmp_path / "cache"))
    base = _prepare(tiny_corpus).meta["key"]
    variants = [
        _prepare(tiny_corpus, lowercase=True).meta["key"],
        _prepare(tiny_corpus, strip_punctuation=True).meta["key"],
        _prepare(tiny_corpus, level="char").meta["key"],
        _prepare(tiny_corpus, min_freq=2).meta["key"],
    ]
    assert len({base, *variants}) == 5
    with open(tiny_corpus / "test.txt", "a", encoding="utf-8") as f:
        f.write("one more line\n")
    assert _prepare(tiny_corpus).meta["key"] != base


def test_an_out_folder_prepared_with_other_settings_is_replaced(tiny_corpus, tmp_path):
    out = tmp_path / "prepared"
    _prepare(tiny_corpus, out)
    lowered = _prepare(tiny_corpus, out, lowercase=True)
    assert load_prepared(out).meta["key"] == lowered.meta["key"]
    assert load_prepared(out).tokenizer == TokenizerSettings(lowercase=True)


def test_unk_substitutions_of_valid_and_test_are_in_meta(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "train.txt").write_text("a b c\n", encoding="utf-8")
    (corpus / "valid.txt").write_text("a x y\n", encoding="utf-8")
    (corpus / "test.txt").write_text("z b\n", encoding="utf-8")
    meta = json.loads((_prepare(corpus, tmp_path / "p").folder / "meta.json").read_text(encoding="utf-8"))
    assert meta["splits"] == {"train": {"tokens": 4, "unk": 0, "chars": 6, "bytes": 6},
                              "valid": {"tokens": 4, "unk": 2, "chars": 6, "bytes": 6},
                              "test": {"tokens": 3, "unk": 1, "chars": 4, "bytes": 4}}  # each line with its line break


def test_ag_news_prepares_with_the_news_preprocessing(shared_data, tmp_path):
    prepared = _prepare(
        shared_data / "ag_news" / "test.csv", tmp_path / "news",
        text_column="title,description", lowercase=True, strip_punctuation=True,
    )
    splits = prepared.meta["splits"]
    lines = {split: int(np.count_nonzero(prepared.ids(split) == prepared.vocab.index["<eos>"])) for split in SPLITS}
    assert lines == {"train": 6840, "valid": 380, "test": 380}  # 7,600 rows, one line each, split 90/5/5
    assert splits["train"]["unk"] == 0 and splits["valid"]["unk"] > 0  # words seen only outside train
    words = set(prepared.vocab.tokens)
    assert "reuters" in words and "Reuters" not in words
    assert not any(ch in token for token in words - {UNK, "<eos>"} for ch in ",.;:'\"()")
    assert prepared.ids("train").dtype == np.uint16


def test_a_local_folder_name_prepares_like_its_path(shared_data, monkeypatch):
    monkeypatch.delenv("NEURALLM_DATA", raising=False)
    monkeypatch.chdir(REPO)
    by_name = _prepare("wt2-lite")
    by_path = _prepare(shared_data / "wt2-lite")
    assert by_name.meta["key"] == by_path.meta["key"]  # the key is the bytes and settings, not the path
    assert by_name.meta["splits"]["train"]["tokens"] == 217_646

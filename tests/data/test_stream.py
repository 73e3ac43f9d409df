"""Prepared corpora: ``{split}.npy`` id streams in the smallest dtype, vocab.json, meta.json, keyed and reused."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from neurallm.api import prepare
from neurallm.data.sources import SPLITS, SourceFile
from neurallm.data.stream import load_prepared
from neurallm.data.tokenizers import UNK, TokenizerSettings, detokenize

REPO = Path(__file__).resolve().parents[2]


def _prepare(data, out=None, **settings):
    return prepare(data, out, **settings)


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

    def must_not_read(*args, **kwargs):
        raise AssertionError("the source of a prepared corpus was read again")

    monkeypatch.setattr(SourceFile, "lines", must_not_read)
    second = _prepare(tiny_corpus, out)
    assert second.meta["key"] == first.meta["key"]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes


def test_the_default_cache_folder_is_named_by_the_files_and_settings_and_reused_without_reading(tiny_corpus, tmp_path,
                                                                                                 monkeypatch):
    monkeypatch.setenv("NEURALLM_CACHE", str(tmp_path / "cache"))
    first = _prepare(tiny_corpus)
    assert first.folder == tmp_path / "cache" / "prepared" / first.meta["source_key"]
    monkeypatch.setattr(SourceFile, "lines", lambda *a, **k: pytest.fail("the source was read again"))
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
    assert meta["splits"] == {"train": {"tokens": 4, "unk": 0, "unk_targets": 0, "chars": 6, "bytes": 6},
                              "valid": {"tokens": 4, "unk": 2, "unk_targets": 2, "chars": 6, "bytes": 6},
                              # each line with its line break; "z" is the first token, never a target
                              "test": {"tokens": 3, "unk": 1, "unk_targets": 0, "chars": 4, "bytes": 4}}


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


# --- streaming: each source file is read once --------------------------------------------------------------


def _count_reads(monkeypatch) -> list[str]:
    reads: list[str] = []
    real_lines = SourceFile.lines

    def counted(self, *args, **kwargs):
        reads.append(self.path.name)
        return real_lines(self, *args, **kwargs)

    monkeypatch.setattr(SourceFile, "lines", counted)
    return reads


def test_preparing_a_folder_reads_each_split_file_once(tiny_corpus, tmp_path, monkeypatch):
    reads = _count_reads(monkeypatch)
    _prepare(tiny_corpus, tmp_path / "p")
    assert reads == ["train.txt", "valid.txt", "test.txt"]


def test_preparing_a_single_file_reads_it_once_and_splits_it_by_lines(tmp_path, monkeypatch):
    path = tmp_path / "book.txt"
    path.write_text("".join(f"line {i} of the book\n" for i in range(100)), encoding="utf-8")
    reads = _count_reads(monkeypatch)
    prepared = _prepare(path, tmp_path / "p")
    assert reads == ["book.txt"]
    eos = prepared.vocab.index["<eos>"]
    lines = {split: int(np.count_nonzero(prepared.ids(split) == eos)) for split in SPLITS}
    assert lines == {"train": 90, "valid": 5, "test": 5}
    first_valid = detokenize(prepared.vocab.decode(prepared.ids("valid")[:6].tolist()), "word")
    assert first_valid == "line <unk> of the book\n"  # valid starts at line 90; "90" is not in train


def test_the_ids_equal_encoding_each_line_with_the_vocabulary_of_train(shared_data, tmp_path):
    """The provisional-id pipeline gives exactly the ids of the plain method: tokenize, build the vocabulary
    from train's counts, encode line by line."""
    from collections import Counter

    from neurallm.data.tokenizers import tokenize_line
    from neurallm.data.vocab import build_vocab

    prepared = _prepare(shared_data / "wt2-lite", tmp_path / "wt2")
    settings = TokenizerSettings()
    read = {split: (shared_data / "wt2-lite" / f"{split}.txt").read_text(encoding="utf-8").splitlines() for split in SPLITS}
    vocab = build_vocab(Counter(t for line in read["train"] for t in tokenize_line(line, settings)), "word")
    assert prepared.vocab.tokens == vocab.tokens
    for split in SPLITS:
        expected = [i for line in read[split] for i in vocab.encode(tokenize_line(line, settings))[0]]
        assert prepared.ids(split).tolist() == expected


def test_the_key_is_the_bytes_and_settings_not_the_path(tiny_corpus, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_corpus, copy)
    assert _prepare(copy, tmp_path / "p1").meta["key"] == _prepare(tiny_corpus, tmp_path / "p2").meta["key"]
    assert _prepare(copy, tmp_path / "p3", split_ratios=(0.8, 0.1, 0.1)).meta["key"] != _prepare(copy, tmp_path / "p1").meta["key"]


def test_a_touched_source_is_prepared_again_with_the_same_key(tiny_corpus, tmp_path, monkeypatch):
    out = tmp_path / "p"
    first = _prepare(tiny_corpus, out)
    os.utime(tiny_corpus / "valid.txt", ns=(1, 1))  # same bytes, another modification time
    reads = _count_reads(monkeypatch)
    second = _prepare(tiny_corpus, out)
    assert reads == ["train.txt", "valid.txt", "test.txt"]  # the identity changed: the files are read again
    assert second.meta["key"] == first.meta["key"] and second.meta["source_key"] != first.meta["source_key"]


def test_a_utf16_corpus_prepares_with_its_encoding(tmp_path):
    folder = tmp_path / "wide"
    folder.mkdir()
    for split in SPLITS:
        (folder / f"{split}.txt").write_text("größe über alles\nzweite zeile\n" * 3, encoding="utf-16")
    prepared = _prepare(folder, tmp_path / "p", encoding="utf-16")
    assert {"größe", "über", "zweite"} <= set(prepared.vocab.tokens)
    # (3 words + <eos> + 2 words + <eos>) × 3; characters of the text, and its bytes in UTF-8 (ö, ß, ü: 2 each)
    assert prepared.meta["splits"]["test"] == {"tokens": 21, "unk": 0, "unk_targets": 0, "chars": 90, "bytes": 99}

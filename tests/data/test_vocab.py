"""The vocabulary: built from the train split only, deterministic ids, <unk> for everything else."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from neurallm.api import prepare
from neurallm.data.tokenizers import EOS, UNK
from neurallm.data.vocab import Vocab, build_vocab
from neurallm.errors import RunDirError


def _write_splits(folder, train: str, valid: str, test: str):
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in (("train", train), ("valid", valid), ("test", test)):
        (folder / f"{name}.txt").write_text(text, encoding="utf-8")
    return folder


def test_tokens_are_ordered_by_falling_frequency_ties_alphabetically_after_the_specials():
    counts = Counter({"the": 5, "cat": 2, "bat": 2, "zoo": 3, EOS: 4})
    vocab = build_vocab(counts, "word")
    assert vocab.tokens == [UNK, EOS, "the", "zoo", "bat", "cat"]
    assert (vocab.unk_id, vocab.index[EOS]) == (0, 1)


def test_the_same_counts_in_any_order_give_the_same_ids():
    words = "b a c a b a d e e e".split()
    forward, backward = Counter(words), Counter(reversed(words))
    assert build_vocab(forward, "word").tokens == build_vocab(backward, "word").tokens


def test_char_vocabulary_has_unk_but_no_eos():
    vocab = build_vocab(Counter("hello\n"), "char")
    assert vocab.tokens[0] == UNK
    assert EOS not in vocab.index
    assert set(vocab.tokens) == {UNK, "h", "e", "l", "o", "\n"}


def test_min_freq_drops_rare_tokens():
    counts = Counter({"common": 3, "twice": 2, "once": 1})
    assert build_vocab(counts, "word", min_freq=2).tokens == [UNK, EOS, "common", "twice"]


def test_max_vocab_caps_the_size_specials_included():
    counts = Counter({"a": 9, "b": 8, "c": 7, "d": 6})
    vocab = build_vocab(counts, "word", max_vocab=4)
    assert vocab.tokens == [UNK, EOS, "a", "b"]


def test_encode_maps_unknown_tokens_to_unk_and_counts_them():
    vocab = Vocab([UNK, EOS, "the", "cat"])
    ids, unknown = vocab.encode(["the", "dog", "cat", "emu", EOS])
    assert ids == [2, 0, 3, 0, 1]
    assert unknown == 2
    assert vocab.decode(ids) == ["the", UNK, "cat", UNK, EOS]


def test_an_unk_written_in_the_text_is_not_counted_as_a_substitution():
    ids, unknown = Vocab([UNK, EOS, "a"]).encode(["a", UNK])
    assert (ids, unknown) == ([2, 0], 0)


@pytest.mark.parametrize("size,dtype", [(2, np.uint8), (256, np.uint8), (257, np.uint16), (65536, np.uint16), (65537, np.uint32)])
def test_id_dtype_is_the_smallest_unsigned_type_that_holds_every_id(size, dtype):
    vocab = Vocab([UNK] + [f"w{i}" for i in range(size - 1)])
    assert vocab.id_dtype() == np.dtype(dtype)


def test_json_round_trip_keeps_the_ids():
    vocab = Vocab([UNK, EOS, "é", "\n", "word"])
    assert Vocab.from_json(vocab.to_json()).tokens == vocab.tokens


@pytest.mark.parametrize("text", ['{"tokens": ["a", "a", "<unk>"]}', '{"tokens": ["a"]}', "not json", '{"tokens": [1]}'])
def test_a_broken_vocabulary_file_is_a_run_dir_error(text):
    with pytest.raises(RunDirError):
        Vocab.from_json(text)


def test_vocabulary_comes_from_train_only_and_unk_substitutions_are_reported_per_split(tmp_path):
    folder = _write_splits(
        tmp_path / "corpus",
        train="the cat sat\nthe dog sat\n",
        valid="the emu sat\n",  # "emu" never occurs in train
        test="a yak and an ox\n",  # "a", "yak", "and", "an", "ox": five unknown words
    )
    prepared = prepare(folder, tmp_path / "prepared")
    assert prepared.vocab.tokens == [UNK, EOS, "sat", "the", "cat", "dog"]
    assert "emu" not in prepared.vocab.index
    assert prepared.meta["splits"] == {
        "train": {"tokens": 8, "unk": 0, "unk_targets": 0, "chars": 24, "bytes": 24},
        "valid": {"tokens": 4, "unk": 1, "unk_targets": 1, "chars": 12, "bytes": 12},
        "test": {"tokens": 6, "unk": 5, "unk_targets": 4, "chars": 16, "bytes": 16},  # the first, "a", is no target
    }
    valid = prepared.vocab.decode(prepared.ids("valid").tolist())
    assert valid == ["the", UNK, "sat", EOS]


def test_min_freq_and_max_vocab_apply_when_preparing(tmp_path):
    folder = _write_splits(tmp_path / "corpus", train="a a a b b c\n", valid="a b c\n", test="c\n")
    by_freq = prepare(folder, tmp_path / "min", min_freq=2)
    assert by_freq.vocab.tokens == [UNK, EOS, "a", "b"]
    assert by_freq.meta["splits"]["valid"] == {"tokens": 4, "unk": 1, "unk_targets": 1, "chars": 6, "bytes": 6}
    capped = prepare(folder, tmp_path / "cap", max_vocab=3)
    assert capped.vocab.tokens == [UNK, EOS, "a"]
    assert capped.meta["splits"]["train"] == {"tokens": 7, "unk": 3, "unk_targets": 3, "chars": 12, "bytes": 12}


def test_wt2_lite_is_a_closed_vocabulary_of_13777_words(shared_data, tmp_path):
    prepared = prepare(shared_data / "wt2-lite", tmp_path / "wt2")
    assert len(prepared.vocab) == 13_777
    assert prepared.meta["vocab_size"] == 13_777
    counts = {split: {k: entry[k] for k in ("tokens", "unk")} for split, entry in prepared.meta["splits"].items()}
    assert counts == {
        "train": {"tokens": 217_646, "unk": 0},
        "valid": {"tokens": 118_886, "unk": 0},
        "test": {"tokens": 126_683, "unk": 0},
    }
    assert prepared.vocab.tokens[:3] == [UNK, EOS, "the"]
    assert prepared.ids("train").dtype == np.uint16

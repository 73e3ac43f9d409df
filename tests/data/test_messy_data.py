"""What neurallm does with messy real data (issue 21.6): empty rows, sorted files, small splits, <unk> targets,
space-separated character files, and the csv module's process-wide field limit."""

from __future__ import annotations

import csv
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from neurallm.cli import main
from neurallm.data.prepare import prepare
from neurallm.data.sources import SourceSettings, open_corpus
from neurallm.data.stream import prepare_corpus
from neurallm.data.tokenizers import EOS, TokenizerSettings
from neurallm.data.trust import SMALL_SPLIT_TOKENS, corpus_warnings, unk_target_share
from neurallm.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def _write_csv(path: Path, rows: list[list[str]], header=("id", "text", "label")) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _sorted_csv(path: Path, per_class: int = 60) -> Path:
    """A CSV sorted by class, as many real ones are: all "alpha" rows, then all "omega" rows, then empty ones."""
    rows = [[str(i), f"alpha news item {i % 7} about the alpha market", "a"] for i in range(per_class)]
    rows += [[str(i), f"omega report {i % 5} on the omega league", "b"] for i in range(per_class)]
    rows += [[str(i), "", "c"] for i in range(10)] + [[str(i), "  \n ", "c"] for i in range(3)]
    return _write_csv(path, rows)


def _decoded(prepared, split: str) -> list[str]:
    return prepared.vocab.decode(prepared.ids(split).tolist())


def test_empty_csv_rows_are_dropped_counted_and_never_eos_only_lines(tmp_path, caplog):
    data = _sorted_csv(tmp_path / "news.csv")
    with caplog.at_level(logging.INFO, logger="neurallm"):
        prepared = prepare(data, tmp_path / "p", text_column="text")
    assert prepared.meta["empty_dropped"] == 13  # 10 empty cells and 3 of only whitespace
    assert "dropped 13 empty row(s)/record(s)" in caplog.text
    for split in ("train", "valid", "test"):
        tokens = _decoded(prepared, split)
        pairs = zip(tokens, tokens[1:])
        assert not any(a == EOS and b == EOS for a, b in pairs), f"{split} holds an <eos>-only line"
    total_lines = sum(_decoded(prepared, split).count(EOS) for split in ("train", "valid", "test"))
    assert total_lines == 120


def test_empty_jsonl_records_are_dropped_and_counted(tmp_path):
    data = tmp_path / "records.jsonl"
    lines = [json.dumps({"body": f"record number {i} says hello"}) for i in range(40)]
    lines[5] = json.dumps({"body": None})
    lines[9] = json.dumps({"body": "   "})
    lines[20] = json.dumps({"body": ""})
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    prepared = prepare(data, tmp_path / "p", text_field="body")
    assert prepared.meta["empty_dropped"] == 3
    assert sum(_decoded(prepared, split).count(EOS) for split in ("train", "valid", "test")) == 37


def test_a_sorted_csv_split_by_documents_mixes_the_classes_and_keeps_every_row_once(tmp_path):
    data = _sorted_csv(tmp_path / "news.csv")
    by_lines = prepare(data, tmp_path / "lines", text_column="text", split_ratios=(0.8, 0.1, 0.1))
    assert "alpha" not in _decoded(by_lines, "test")  # the contiguous cut: test is all "omega"
    by_documents = prepare(data, tmp_path / "docs", text_column="text", split_ratios=(0.8, 0.1, 0.1),
                           split_by="documents", split_seed=3)
    test = _decoded(by_documents, "test")
    assert "alpha" in test and "omega" in test
    assert [sum(_decoded(by_documents, s).count(EOS) for s in ("train", "valid", "test"))] == [120]
    assert [_decoded(by_documents, s).count(EOS) for s in ("train", "valid", "test")] == [96, 12, 12]
    # every row's words once: the three splits together hold exactly the corpus's tokens
    everything = sorted(t for s in ("train", "valid", "test") for t in _decoded(by_documents, s))
    assert everything == sorted(t for s in ("train", "valid", "test") for t in _decoded(by_lines, s))
    again = prepare(data, tmp_path / "again", text_column="text", split_ratios=(0.8, 0.1, 0.1),
                    split_by="documents", split_seed=3)
    assert np.array_equal(again.ids("test"), by_documents.ids("test"))  # the seed fixes the split
    other = prepare(data, tmp_path / "other", text_column="text", split_ratios=(0.8, 0.1, 0.1),
                    split_by="documents", split_seed=4)
    assert not np.array_equal(other.ids("test"), by_documents.ids("test"))
    # the characters and bytes of each split are those of its own rows
    units = {s: by_documents.meta["splits"][s]["chars"] for s in ("train", "valid", "test")}
    assert sum(units.values()) == sum(by_lines.meta["splits"][s]["chars"] for s in ("train", "valid", "test"))


def test_a_text_file_split_by_documents_keeps_paragraphs_whole(tmp_path):
    paragraphs = [f"paragraph {i} first line\nparagraph {i} second line\n" for i in range(30)]
    data = tmp_path / "book.txt"
    data.write_text("\n".join(paragraphs), encoding="utf-8")
    prepared = prepare(data, tmp_path / "p", split_by="documents", split_seed=1)
    for split in ("train", "valid", "test"):
        text = " ".join(_decoded(prepared, split))
        numbers = {word for word in text.split() if word.isdigit()}
        for number in numbers:  # both lines of each paragraph are in the same split
            assert text.count(f"paragraph {number} first") == text.count(f"paragraph {number} second") == 1
    assert sum(_decoded(prepared, split).count(EOS) for split in ("train", "valid", "test")) == 30 * 3 - 1
    # 30 documents of 2 lines (+ the blank line after each but the last): 27 train, 1 valid, 2 test paragraphs
    assert [_decoded(prepared, s).count("first") for s in ("train", "valid", "test")] == [27, 1, 2]
    for split in ("train", "valid", "test"):  # each split starts with a paragraph's first line
        assert _decoded(prepared, split)[:2] == ["paragraph", _decoded(prepared, split)[1]]
        assert _decoded(prepared, split)[2] == "first"
    corpus = open_corpus(SourceSettings(data=str(data), split_by="documents", split_seed=1))
    train_lines = [line for line in corpus.lines("train") if line.strip()]
    assert len(train_lines) == 2 * 27  # the BPE trainer's view of train: its paragraphs' lines


def test_split_settings_are_checked():
    with pytest.raises(ConfigError, match="--split-by"):
        SourceSettings(data="x", split_by="rows")
    with pytest.raises(ConfigError, match="--split-seed"):
        SourceSettings(data="x", split_seed=-1)


def test_unk_written_in_the_text_counts_as_unk_targets_and_warns(tmp_path):
    folder = tmp_path / "ptb"
    folder.mkdir()
    line = "the <unk> said that <unk> prices rose in N months\n"  # PTB style: 2 of 11 targets are <unk>
    for split in ("train", "valid", "test"):
        (folder / f"ptb.{split}.txt").write_text(line * 50, encoding="utf-8")
    prepared = prepare(folder, tmp_path / "p")
    test = prepared.meta["splits"]["test"]
    assert test["unk"] == 0  # nothing was replaced...
    assert test["unk_targets"] == 100  # ...but 100 of the 549 targets are <unk>
    assert unk_target_share(test) == pytest.approx(100 / 549)
    [warning] = [w for w in corpus_warnings(prepared.meta, ("test",)) if "<unk>" in w]
    assert "18.2% of the test targets are <unk> (0.0% not in the vocabulary, 18.2% written <unk> in the text)" in warning


def test_small_splits_are_warned_about_by_prepare(tmp_path, capsys):
    data = _sorted_csv(tmp_path / "news.csv")
    assert main(["prepare", "--data", str(data), "--text-column", "text", "--out", str(tmp_path / "p")]) == 0
    err = capsys.readouterr().err
    assert "warning: the valid split has only" in err and "warning: the test split has only" in err
    assert "--split-by documents" in err
    big = {"splits": {"test": {"tokens": SMALL_SPLIT_TOKENS, "unk": 0, "unk_targets": 0}}}
    assert corpus_warnings(big) == []


def test_min_freq_that_leaves_only_unk_is_one_line(tmp_path, capsys):
    data = tmp_path / "t.txt"
    data.write_text("hello world, a small text\n" * 40, encoding="utf-8")
    for level in ("char", "word"):
        assert main(["prepare", "--data", str(data), "--level", level, "--min-freq", "1000000",
                     "--out", str(tmp_path / level)]) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--min-freq 1000000 leaves only <unk>" in err[0], err
        assert "choose --min-freq 40 or lower" in err[0] or "or lower" in err[0]


def test_a_vocabulary_mostly_unk_warns_when_training_starts(tmp_path, caplog):
    data = tmp_path / "t.txt"
    # 3 frequent words, the rest each seen once: --min-freq 5 makes most of them <unk>
    lines = [f"the cat sat w{i}a w{i}b w{i}c w{i}d w{i}e w{i}f w{i}g" for i in range(300)]
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="neurallm"):
        import neurallm

        neurallm.train(data, tmp_path / "run", min_freq=5, emsize=8, nhid=8, batch_size=4, bptt=8, epochs=1,
                       max_time=0.001, progress=False)
    assert "of the train targets are <unk>" in caplog.text  # when training starts
    warned_test = [r for r in caplog.records if "of the test targets are <unk>" in r.getMessage()]
    assert len(warned_test) == 2  # when training starts, and again beside the test result


def test_the_ptb_char_file_names_are_split_files_and_spaced_characters_get_a_hint(tmp_path):
    folder = tmp_path / "ptb-char"
    folder.mkdir()
    for split in ("train", "valid", "test"):
        (folder / f"ptb.char.{split}.txt").write_text("a e r _ b a n k n o t e\n" * 30, encoding="utf-8")
    char = prepare(folder, tmp_path / "char", level="char")
    assert char.meta["char_space_share"] > 0.45
    [hint] = [w for w in corpus_warnings(char.meta) if w.startswith("hint:")]
    assert "space-separated character file" in hint and "--level word" in hint
    word = prepare(folder, tmp_path / "word", level="word")
    assert word.meta["splits"]["test"]["tokens"] == 30 * 13  # 12 characters and <eos> per line, no separators
    assert not [w for w in corpus_warnings(word.meta) if w.startswith("hint:")]
    plain = tmp_path / "plain.txt"
    plain.write_text("an ordinary sentence of English text with spaces.\n" * 60, encoding="utf-8")
    assert not [w for w in corpus_warnings(prepare(plain, tmp_path / "plain", level="char").meta) if w.startswith("hint:")]


def test_reading_a_csv_leaves_the_process_wide_field_limit_alone(tmp_path):
    probe = ("import csv, sys; before = csv.field_size_limit(); import neurallm.data.sources; "
             "print(before == csv.field_size_limit())")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          env={"PYTHONPATH": str(REPO / "src")}, check=True)
    assert done.stdout.strip() == "True"  # importing changes nothing
    long_cell = "word " * 60_000  # 300 KB in one cell: over the csv module's default 128 KiB limit
    data = _write_csv(tmp_path / "long.csv", [[str(i), long_cell if i == 3 else f"row {i} text", "x"] for i in range(40)])
    before = csv.field_size_limit()
    prepared = prepare_corpus(SourceSettings(data=str(data), text_column="text"), TokenizerSettings())
    assert csv.field_size_limit() == before  # reading restored it
    assert sum(prepared.meta["splits"][s]["tokens"] for s in ("train", "valid", "test")) > 60_000
    with pytest.raises(csv.Error):  # and the caller's own csv use still has its own limit
        list(csv.reader([long_cell.replace(" ", "x")]))

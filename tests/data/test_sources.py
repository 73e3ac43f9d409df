"""Data in: split folders, single text files, CSV, JSONL and dataset names, all read as three splits of lines."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from neurallm.data.sources import SPLITS, SourceSettings, open_corpus
from neurallm.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[2]


def _lines(corpus) -> dict[str, list[str]]:
    return {split: list(corpus.lines(split)) for split in SPLITS}


def _open(data, **settings):
    return open_corpus(SourceSettings(data=str(data), **settings))


# --- folders -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "names",
    [
        ("train.txt", "valid.txt", "test.txt"),
        ("wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens"),
        ("ptb.train.txt", "ptb.valid.txt", "ptb.test.txt"),
    ],
    ids=["plain", "wikitext", "ptb"],
)
def test_a_folder_of_split_files_is_read_split_by_split(tmp_path, names):
    for name, split in zip(names, SPLITS):
        (tmp_path / name).write_text(f" {split} line one \n {split} line two \n", encoding="utf-8")
    corpus = _open(tmp_path)
    assert _lines(corpus) == {s: [f" {s} line one ", f" {s} line two "] for s in SPLITS}
    assert [p.name for p in corpus.files] == list(names)


def test_a_folder_missing_a_split_names_the_folder_and_the_files_found(shared_data):
    folder = shared_data / "wikitext-2"  # holds only valid.txt and test.txt
    with pytest.raises(DataError) as error:
        _open(folder)
    message = str(error.value)
    assert str(folder) in message
    assert "no train split" in message
    assert "found: test.txt, valid.txt" in message


def test_a_missing_path_that_is_no_dataset_name_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        _open(tmp_path / "nowhere")


# --- a single text file ------------------------------------------------------------------------------------


def _numbered_file(path: Path, n: int) -> Path:
    path.write_text("".join(f"line {i}\n" for i in range(n)), encoding="utf-8")
    return path


def test_a_text_file_is_split_by_lines_90_5_5_into_contiguous_blocks(tmp_path):
    corpus = _open(_numbered_file(tmp_path / "book.txt", 100))
    lines = _lines(corpus)
    assert lines["train"] == [f"line {i}" for i in range(0, 90)]
    assert lines["valid"] == [f"line {i}" for i in range(90, 95)]
    assert lines["test"] == [f"line {i}" for i in range(95, 100)]


def test_splitting_a_text_file_is_deterministic(tmp_path):
    path = _numbered_file(tmp_path / "book.txt", 57)
    assert _lines(_open(path)) == _lines(_open(path))


def test_split_ratios_are_honoured(tmp_path):
    corpus = _open(_numbered_file(tmp_path / "book.txt", 100), split_ratios=(0.8, 0.15, 0.05))
    sizes = {split: len(lines) for split, lines in _lines(corpus).items()}
    assert sizes == {"train": 80, "valid": 15, "test": 5}
    assert next(corpus.lines("valid")) == "line 80"


@pytest.mark.parametrize("ratios", [(0.9, 0.1), (0.9, 0.05, 0.1), (1.0, 0.0, 0.0)])
def test_bad_split_ratios_are_a_config_error(tmp_path, ratios):
    with pytest.raises(ConfigError, match="--split-ratios"):
        SourceSettings(data="x", split_ratios=ratios)


def test_a_file_too_short_to_split_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="too few to split"):
        list(_open(_numbered_file(tmp_path / "short.txt", 5)).lines("train"))


# --- CSV ---------------------------------------------------------------------------------------------------


def _write_csv(path: Path, rows: list[list[str]]) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows(rows)
    return path


def test_csv_text_columns_are_joined_per_row_and_quoted_commas_and_newlines_stay_in_one_line(tmp_path):
    rows = [["label", "title", "description"]]
    rows += [[str(i % 4), f"Title {i}, with a comma", f"first part {i}\nsecond part \"quoted\""] for i in range(40)]
    path = _write_csv(tmp_path / "news.csv", rows)
    assert '"Title 0, with a comma"' in path.read_text(encoding="utf-8")  # the writer did quote the fields
    corpus = _open(path, text_column="title,description")
    lines = [line for split in SPLITS for line in corpus.lines(split)]
    assert len(lines) == 40  # one row, one line, embedded newlines notwithstanding
    assert lines[0] == 'Title 0, with a comma first part 0 second part "quoted"'
    assert [len(v) for v in _lines(corpus).values()] == [36, 2, 2]


def test_csv_with_one_text_column(tmp_path):
    path = _write_csv(tmp_path / "t.csv", [["id", "text"]] + [[str(i), f"row {i}"] for i in range(20)])
    assert next(_open(path, text_column="text").lines("train")) == "row 0"


def test_a_missing_csv_column_lists_the_columns_that_exist(tmp_path):
    path = _write_csv(tmp_path / "news.csv", [["label", "title", "description"], ["1", "a", "b"]])
    with pytest.raises(DataError) as error:
        _open(path, text_column="title,body")
    assert "body" in str(error.value)
    assert "label, title, description" in str(error.value)


def test_a_csv_without_text_column_asks_for_it(tmp_path):
    path = _write_csv(tmp_path / "news.csv", [["label", "title"], ["1", "a"]])
    with pytest.raises(DataError, match="--text-column"):
        _open(path)


def test_ag_news_csv_gives_7600_lines_split_90_5_5(shared_data):
    corpus = _open(shared_data / "ag_news" / "test.csv", text_column="title,description")
    lines = _lines(corpus)
    assert {split: len(v) for split, v in lines.items()} == {"train": 6840, "valid": 380, "test": 380}
    assert lines["train"][0] == (
        "Fears for T N pension after talks Unions representing workers at Turner   Newall say they are "
        "'disappointed' after talks with stricken parent firm Federal Mogul."
    )
    assert all("\n" not in line for v in lines.values() for line in v)


# --- JSONL -------------------------------------------------------------------------------------------------


def test_jsonl_reads_the_text_field_of_each_record(tmp_path):
    path = tmp_path / "docs.jsonl"
    records = [{"id": i, "body": f"record {i}\nwith a break"} for i in range(20)]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n", encoding="utf-8")
    lines = _lines(_open(path, text_field="body"))
    assert lines["train"][0] == "record 0 with a break"
    assert [len(v) for v in lines.values()] == [18, 1, 1]


def test_jsonl_missing_field_names_the_keys_it_has(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"id": 1, "body": "x"}\n', encoding="utf-8")
    with pytest.raises(DataError, match="it has: id, body"):
        list(_open(path, text_field="text").lines("train"))


# --- dataset names -----------------------------------------------------------------------------------------


def test_a_registered_name_is_found_in_the_shared_data_folder_beside_the_working_directory(shared_data, monkeypatch):
    monkeypatch.delenv("NEURALLM_DATA", raising=False)
    monkeypatch.chdir(REPO)  # ../shared/data is searched relative to the working directory
    corpus = _open("tinyshakespeare")
    assert [f.resolve() for f in corpus.files] == [(shared_data / "tinyshakespeare" / "input.txt").resolve()]
    sizes = [sum(1 for _ in corpus.lines(split)) for split in SPLITS]
    assert sizes == [36_000, 2_000, 2_000]  # input.txt has 40,000 lines, split 90/5/5
    assert next(corpus.lines("train")) == "First Citizen:"


def test_a_registered_name_is_found_under_neurallm_data(shared_data, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NEURALLM_DATA", str(shared_data))
    corpus = _open("tinyshakespeare")
    assert corpus.files == [shared_data / "tinyshakespeare" / "input.txt"]


def test_an_unregistered_name_of_a_local_folder_opens_that_folder(shared_data, monkeypatch):
    monkeypatch.delenv("NEURALLM_DATA", raising=False)
    monkeypatch.chdir(REPO)
    corpus = _open("wt2-lite")
    assert [p.name for p in corpus.files] == ["train.txt", "valid.txt", "test.txt"]
    assert corpus.files[0].resolve() == (shared_data / "wt2-lite" / "train.txt").resolve()


def test_an_unregistered_name_under_neurallm_data_opens_that_folder(shared_data, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NEURALLM_DATA", str(shared_data))
    corpus = _open("wt2-lite")
    assert corpus.files == [shared_data / "wt2-lite" / f"{s}.txt" for s in SPLITS]


def test_a_name_found_nowhere_lists_the_known_datasets(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("NEURALLM_DATA", raising=False)
    with pytest.raises(DataError, match="tinyshakespeare"):
        _open("no-such-corpus")

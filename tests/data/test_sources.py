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


# --- encodings (issue 11, item 9) --------------------------------------------------------------------------


def test_a_csv_with_a_byte_order_mark_names_its_first_column_without_the_mark(tmp_path):
    path = tmp_path / "excel.csv"
    rows = "title,text\n" + "".join(f"title {i},body {i}\n" for i in range(40))
    path.write_bytes(b"\xef\xbb\xbf" + rows.encode("utf-8"))  # what Excel's "CSV UTF-8" writes
    lines = _lines(_open(path, text_column="title,text"))
    assert lines["train"][0] == "title 0 body 0"


def test_a_text_file_with_a_byte_order_mark_does_not_glue_it_to_the_first_word(tmp_path):
    path = tmp_path / "notepad.txt"
    path.write_bytes(b"\xef\xbb\xbf" + "".join(f"line {i}\n" for i in range(40)).encode("utf-8"))
    assert _lines(_open(path))["train"][0] == "line 0"


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-32"])
def test_utf16_and_utf32_files_read_with_their_encoding(tmp_path, encoding):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for split in SPLITS:
        (folder / f"{split}.txt").write_text(f"größe {split}\nzweite zeile\n", encoding=encoding)
    lines = _lines(_open(folder, encoding=encoding))
    assert lines == {split: [f"größe {split}", "zweite zeile"] for split in SPLITS}


@pytest.mark.parametrize("encoding", ["utf-16", "utf-32"])
def test_a_utf16_file_read_as_utf8_names_the_encoding_to_pass(tmp_path, encoding):
    path = tmp_path / "wide.txt"
    path.write_text("".join(f"line {i}\n" for i in range(40)), encoding=encoding)
    with pytest.raises(DataError, match=f"wide.txt starts with a {encoding.upper()} byte-order mark; read it with --encoding {encoding}"):
        _open(path)


@pytest.mark.parametrize("bad_at", [5, 8191, 8192, 65_537, 300_003])
def test_a_decoding_error_gives_the_offset_of_the_bad_byte_in_the_file(tmp_path, bad_at):
    """Python's reader reports offsets within the block it was decoding; the user needs the file's offset."""
    text = ("abcdefghi\n" * (bad_at // 10 + 1)).encode()[:bad_at]
    path = tmp_path / "bad.txt"
    path.write_bytes(text + b"\xff" + b"\nmore text\n" * 50)
    with pytest.raises(DataError) as error:
        list(_open(path).lines("train"))
    assert f"(byte {bad_at} of the file: invalid start byte)" in str(error.value)


def test_a_character_cut_by_a_block_end_is_located_at_its_first_byte(tmp_path):
    path = tmp_path / "cut.txt"
    head = b"a" * 65_535 + "é".encode()  # é straddles the 64 KiB block boundary
    path.write_bytes(head + b"\xe9 not utf-8\n" + b"fine\n" * 50)
    with pytest.raises(DataError, match=f"byte {len(head)} of the file"):
        list(_open(path).lines("train"))

"""Property-based tests: invariants that must hold for any text, stream length, batch size or context.

Arbitrary input may be refused, but only with a :class:`~neurallm.errors.NeurallmError` (a clean one-line
message); anything else hypothesis finds is a bug.
"""

from __future__ import annotations

import csv
import json
import tempfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from neurallm.data.batching import ContiguousBatches, batchify, plan_eval_columns, plan_sliding_windows
from neurallm.data.sources import SourceSettings, open_corpus
from neurallm.data.tokenizers import EOS, UNK, TokenizerSettings, detokenize, tokenize_line
from neurallm.data.vocab import Vocab, build_vocab
from neurallm.errors import ConfigError, NeurallmError

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Text that is one line: anything but a line feed (other separators such as \r, \x85 or \u2028 are whitespace).
one_line = st.text(st.characters(blacklist_characters="\n", blacklist_categories=("Cs",)), max_size=40)
# Text of a file read line by line: no \r, which universal-newline reading turns into a line break.
file_text = st.text(st.characters(blacklist_characters="\r", blacklist_categories=("Cs",)), max_size=200)


def encode_and_decode(lines: list[str], level: str) -> tuple[str, int]:
    tokenizer = TokenizerSettings(level=level)
    tokens = [t for line in lines for t in tokenize_line(line, tokenizer)]
    vocab = build_vocab(Counter(tokens), level)
    ids, unknown = vocab.encode(tokens)
    assert len(ids) == len(tokens)
    return detokenize(vocab.decode(ids), level), unknown


# --- tokenizer and vocabulary ----------------------------------------------------------------------------------


@FUZZ
@given(st.lists(one_line.filter(lambda line: EOS not in line.split() and UNK not in line.split()), max_size=8))
@example(["  two  spaces ", "", "tab\there", "line\u2028separator", "<eos>x <unk>y"])
def test_word_level_round_trip_normalises_whitespace_only(lines):
    text, unknown = encode_and_decode(lines, "word")
    assert unknown == 0
    assert text == "".join(" ".join(line.split()) + "\n" for line in lines)


@FUZZ
@given(file_text)
@example("a\n\nb\n")
@example("ends without a line break")
@example("\x85\u2028\x0b\x0c\x1c are not line breaks here")
def test_char_level_round_trip_is_exact(text):
    decoded, unknown = encode_and_decode(text.split("\n"), "char")
    assert unknown == 0
    assert decoded == text + "\n"


@FUZZ
@given(st.lists(st.text(max_size=6), max_size=12), one_line)
def test_vocab_json_round_trip_and_unknown_tokens(extra, line):
    tokens = list(dict.fromkeys([UNK, EOS, *extra]))  # unique, <unk> first
    vocab = Vocab.from_json(Vocab(tokens).to_json())
    assert vocab.tokens == tokens
    ids, unknown = vocab.encode(line.split())
    assert unknown == sum(1 for t in line.split() if t not in vocab.index)
    assert all(0 <= i < len(vocab) for i in ids)
    assert vocab.id_dtype().type(len(vocab) - 1) == len(vocab) - 1


@FUZZ
@given(st.text(max_size=60))
@example('{"tokens": ["<unk>", "<unk>"]}')
@example('{"tokens": ["a"]}')
@example('{"tokens": [1, 2]}')
@example("[" * 100_000)
def test_vocab_from_arbitrary_json_text_fails_cleanly(text):
    try:
        Vocab.from_json(text)
    except NeurallmError:
        pass


# --- batchify and BPTT windows ---------------------------------------------------------------------------------


@FUZZ
@given(n=st.integers(0, 400), batch_size=st.integers(1, 40), bptt=st.integers(1, 50), start=st.integers(0, 60))
def test_batchify_and_bptt_invariants(n, batch_size, bptt, start):
    ids = torch.randperm(n) if n else torch.zeros(0, dtype=torch.long)
    rows = n // batch_size
    if rows < 2:
        with pytest.raises(ConfigError, match="--batch-size"):
            batchify(ids, batch_size)
        return
    stream = batchify(ids, batch_size)
    assert stream.shape == (rows, batch_size)
    assert n - rows * batch_size < batch_size  # only a tail shorter than one row is dropped
    for j in range(batch_size):
        assert torch.equal(stream[:, j], ids[j * rows : (j + 1) * rows])
    batches = ContiguousBatches(stream, bptt)
    windows = list(batches.epoch(0))
    assert len(windows) == len(batches)
    assert all(1 <= inputs.size(0) <= bptt and inputs.shape == targets.shape for inputs, targets in windows)
    # every column is read once, in order; each target is the next token of its column
    assert torch.equal(torch.cat([inputs for inputs, _ in windows]), stream[:-1])
    assert torch.equal(torch.cat([targets for _, targets in windows]), stream[1:])
    # a resumed epoch continues at any window with exactly the windows left
    resumed = list(batches.epoch(0, start))
    assert len(resumed) == max(0, len(windows) - start)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(resumed, windows[start:]))


@FUZZ
@given(n=st.integers(0, 3000), columns=st.integers(1, 120), context=st.integers(0, 700))
def test_plan_eval_columns_scores_every_target_once(n, columns, context):
    if n < 2:
        with pytest.raises(ConfigError):
            plan_eval_columns(n, columns, context)
        return
    plan = plan_eval_columns(n, columns, context)
    scored = [t for c in plan for t in range(c.score_start, c.score_stop)]
    assert scored == list(range(1, n))  # every target 1..n-1 exactly once, in order
    sizes = [c.score_stop - c.score_start for c in plan]
    assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
    for c in plan:
        assert c.start >= 0 and c.burn_in == min(context, c.score_start - 1) <= context
        assert c.length == c.burn_in + (c.score_stop - c.score_start)


@FUZZ
@given(n=st.integers(2, 3000), stride=st.integers(1, 100), context=st.integers(0, 300))
def test_sliding_windows_score_every_target_once(n, stride, context):
    plan = plan_sliding_windows(n, stride, context)
    assert [t for c in plan for t in range(c.score_start, c.score_stop)] == list(range(1, n))
    assert all(0 <= c.start and c.burn_in <= context and c.score_stop - c.score_start <= stride for c in plan)


# --- CSV, JSONL and text readers -------------------------------------------------------------------------------

# Single-file sources are split into train/valid/test; these ratios split 4 or more rows.
RATIOS = (0.4, 0.3, 0.3)
field_text = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=30)


def _nonblank(lines: list[str]) -> list[str]:
    return [line for line in lines if line.strip()]


def read_all(settings: SourceSettings) -> list[str]:
    corpus = open_corpus(settings)
    return [line for split in ("train", "valid", "test") for line in corpus.lines(split)]


@FUZZ
@given(st.lists(st.tuples(field_text, field_text, field_text), min_size=4, max_size=12), st.sampled_from(["csv", "tsv"]))
@example([("a,b", 'say "hi"', "line\nbreak"), ("", "\r\n", "x"), ("\u2028", "tab\tbed", ""), ("é", "ü", "\x85")], "csv")
def test_csv_fields_read_back_one_line_per_row(rows, suffix):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"data.{suffix}"
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, dialect=csv.excel_tab if suffix == "tsv" else csv.excel)
            writer.writerow(["title", "body", "other"])
            writer.writerows(rows)
        # rows whose text is blank are dropped (issue 21.6): they would be lines of one <eos>
        expected = _nonblank([" ".join(body.splitlines()) for _, body, _ in rows])
        expected_joined = _nonblank([" ".join(f"{title} {body}".splitlines()) for title, body, _ in rows])
        assume(len(expected) >= 4)  # fewer lines are too few to split (refused, tested elsewhere)
        assert read_all(SourceSettings(str(path), text_column="body", split_ratios=RATIOS)) == expected
        assert read_all(SourceSettings(str(path), text_column="title,body", split_ratios=RATIOS)) == expected_joined


@FUZZ
@given(st.lists(field_text, min_size=4, max_size=12), st.booleans())
@example(["\u2028 and \x85 stay inside a record", "a\r\nb", "", '"quoted"'], False)
def test_jsonl_fields_read_back_one_line_per_record(texts, ascii_only):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "data.jsonl"
        records = "".join(json.dumps({"id": i, "text": t}, ensure_ascii=ascii_only) + "\n" for i, t in enumerate(texts))
        path.write_text(records, encoding="utf-8")
        expected = _nonblank([" ".join(t.splitlines()) for t in texts])  # blank records are dropped
        assume(len(expected) >= 4)
        assert read_all(SourceSettings(str(path), text_field="text", split_ratios=RATIOS)) == expected


@FUZZ
@given(file_text.filter(lambda text: text.strip("\n")))
def test_text_folder_reads_back_the_lines_written(text):
    with tempfile.TemporaryDirectory() as folder:
        for split in ("train", "valid", "test"):
            (Path(folder) / f"{split}.txt").write_text(text, encoding="utf-8")
        try:
            corpus = open_corpus(SourceSettings(folder))
        except NeurallmError as error:
            assert "\x00" in text and "binary" in str(error)
            return
        expected = text.split("\n")[:-1] if text.endswith("\n") else text.split("\n")
        assert list(corpus.lines("train")) == expected


@FUZZ
@given(st.binary(max_size=300), st.sampled_from(["data.txt", "data.csv", "data.jsonl"]))
@example(b"[" * 100_000, "data.jsonl")
@example(b'{"text": 1}\n' * 5 + b"\xff\xfe", "data.jsonl")
@example(b'title,text\n"unterminated\n', "data.csv")
@example(b"\xef\xbb\xbftext\nx\ny\nz\nw\n", "data.csv")
def test_arbitrary_bytes_are_read_or_refused_cleanly(content, name):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / name
        path.write_bytes(content)
        try:
            read_all(SourceSettings(str(path), text_column="text", text_field="text", split_ratios=RATIOS))
        except NeurallmError:
            pass

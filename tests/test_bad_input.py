"""Every user mistake gets one line on stderr that names the file or flag, a non-zero exit and no traceback.

The table below is the list of mistakes covered; each row is ``(id, argv, setup, expected)``:

* ``argv`` may contain ``{tmp}`` (a fresh folder), ``{run}`` (the session's trained word-level run, read-only)
  and ``{copy}`` (a copy of that run at ``tmp/copy``, which the setup may damage);
* ``setup(tmp)`` writes the files the case needs;
* ``expected`` is a substring of the one error line: the flag or file at fault, or the fix.

Mistakes argparse itself catches (``--bptt abc``, an unknown subcommand) print its usage line too and exit 2;
they are checked separately at the end.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import neurallm
from conftest import TINY_MODEL, copy_run, write_patterned_corpus
from neurallm.cli import main
from neurallm.config import ModelConfig, TrainConfig
from neurallm.run_config import RunConfig
from neurallm.data.sources import SourceSettings
from neurallm.data.stream import VocabSettings, load_prepared
from neurallm.data.tokenizers import TokenizerSettings

# --- setups: each writes what one case needs under tmp ------------------------------------------------------


def _corpus(tmp: Path) -> None:
    write_patterned_corpus(tmp / "corpus", lines=60)


def _two_splits(tmp: Path) -> None:
    write_patterned_corpus(tmp / "partial", lines=60)
    (tmp / "partial" / "test.txt").unlink()


def _empty_file(tmp: Path) -> None:
    (tmp / "empty.txt").write_bytes(b"")


def _binary_file(tmp: Path) -> None:
    (tmp / "blob.txt").write_bytes(b"PK\x03\x04\x00\x00binary\x00\x01\x02" * 50)


def _latin1_file(tmp: Path) -> None:
    (tmp / "latin1.txt").write_bytes("le café est très bon\n".encode("latin-1") * 60)


def _csv_file(tmp: Path) -> None:
    with open(tmp / "news.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["title", "text"])
        writer.writerows([f"title {i}", f"the text of row {i}"] for i in range(60))


def _csv_short_row(tmp: Path) -> None:
    (tmp / "short.csv").write_text("title,text\na,b\nonly-one-field\n" + "c,d\n" * 60, encoding="utf-8")


def _jsonl_file(tmp: Path) -> None:
    (tmp / "docs.jsonl").write_text("".join(f'{{"body": "text number {i}"}}\n' for i in range(60)), encoding="utf-8")


def _jsonl_bad_line(tmp: Path) -> None:
    (tmp / "bad.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n{"text": oops}\n' + '{"text": "x"}\n' * 60, encoding="utf-8")


def _stray_folder(tmp: Path) -> None:
    _corpus(tmp)
    (tmp / "notes").mkdir()
    (tmp / "notes" / "todo.txt").write_text("my notes\n", encoding="utf-8")


def _plain_folder(tmp: Path) -> None:
    (tmp / "plain").mkdir()
    (tmp / "plain" / "readme.txt").write_text("not a run\n", encoding="utf-8")


def _out_is_file(tmp: Path) -> None:
    _corpus(tmp)
    (tmp / "run.txt").write_text("a file\n", encoding="utf-8")


def _char_prepared(tmp: Path) -> None:
    _corpus(tmp)
    neurallm.prepare(tmp / "corpus", tmp / "char-prepared", level="char")


def _mixed_prepared(tmp: Path) -> None:
    """A prepared folder whose train.npy comes from another corpus: what an interrupted re-prepare left before."""
    neurallm.prepare(write_patterned_corpus(tmp / "corpus-a", lines=60, seed=1), tmp / "mixed")
    neurallm.prepare(write_patterned_corpus(tmp / "corpus-b", lines=90, seed=2), tmp / "other")
    (tmp / "mixed" / "train.npy").write_bytes((tmp / "other" / "train.npy").read_bytes())


def _late_bad_byte(tmp: Path) -> None:
    (tmp / "late.txt").write_bytes(b"fine text here\n" * 20_000 + b"caf\xe9\n" + b"more text\n" * 10)


def _run_like_folder(tmp: Path, name: str, *extra: str) -> None:
    """A folder whose config.json parses as a run, holding the files named in ``extra`` as well."""
    folder = tmp / name
    folder.mkdir()
    config = RunConfig(SourceSettings(data=str(tmp / "corpus")), TokenizerSettings(), VocabSettings(),
                       ModelConfig(vocab_size=30), TrainConfig())
    (folder / "config.json").write_text(json.dumps(config.to_dict()), encoding="utf-8")
    for extra_name in extra:
        (folder / extra_name).write_text("not written by a run\n", encoding="utf-8")


def _run_with_thesis(tmp: Path) -> None:
    _corpus(tmp)
    _run_like_folder(tmp, "old-run", "thesis.tex")


def _hf_model_folder(tmp: Path) -> None:
    _corpus(tmp)
    (tmp / "hf").mkdir()
    (tmp / "hf" / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"], "n_layer": 12}', encoding="utf-8")


# --- damaging a copy of the trained run (tmp/copy) -----------------------------------------------------------


def _edit_config(**model):
    def setup(tmp: Path) -> None:
        path = tmp / "copy" / "config.json"
        config = json.loads(path.read_text(encoding="utf-8"))
        config["model"].update(model)
        path.write_text(json.dumps(config), encoding="utf-8")
    return setup


def _vocab_dev_zero(tmp: Path) -> None:
    (tmp / "copy" / "vocab.json").unlink()
    (tmp / "copy" / "vocab.json").symlink_to("/dev/zero")


def _config_huge(tmp: Path) -> None:
    (tmp / "copy" / "config.json").write_bytes(b"{" + b" " * (2 << 20) + b"}")


def _rewrite_weights(change):
    def setup(tmp: Path) -> None:
        path = tmp / "copy" / "model.safetensors"
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata()
        tensors = load_file(str(path))
        change(tensors)
        save_file(tensors, str(path), metadata=metadata)
    return setup


def _nan_weight(tensors: dict) -> None:
    name = sorted(tensors)[0]
    tensors[name][0] = float("nan")


def _int_weight(tensors: dict) -> None:
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].to(torch.int32)


def _header_listing(count: int):
    """A safetensors file whose header lists ``count`` empty tensors (safetensors itself accepts up to 100 MB)."""
    def setup(tmp: Path) -> None:
        header = ("{" + ",".join(f'"t{i}":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}' for i in range(count)) + "}").encode()
        (tmp / "copy" / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    return setup


def _edit_training_state(**changes):
    def setup(tmp: Path) -> None:
        path = tmp / "copy" / "last.safetensors"
        with safe_open(str(path), framework="pt") as f:
            info = json.loads(f.metadata()["neurallm_state"])
        info.update(changes)
        save_file(load_file(str(path)), str(path), metadata={"neurallm_state": json.dumps(info)})
    return setup


def _drop_last(tmp: Path) -> None:
    (tmp / "copy" / "last.safetensors").unlink()


def train_on(data: str, *flags: str, out: str = "{tmp}/run") -> list[str]:
    return ["train", "--data", f"{{tmp}}/{data}", "--out", out, *flags]


TRAIN = train_on("corpus", "--no-progress", "--epochs", "1")

# (id, argv, setup, expected substring of the error line)
CASES = [
    # paths and files
    ("data-missing", train_on("nope.txt"), None, "nope.txt: no such file or folder"),
    ("data-not-given", ["train", "--out", "{tmp}/run"], None, "train needs --data"),
    ("folder-missing-split", train_on("partial"), _two_splits, "no test split; expected files named like test.txt"),
    ("folder-lists-files-found", train_on("partial"), _two_splits, "found: train.txt, valid.txt"),
    ("empty-file", train_on("empty.txt"), _empty_file, "empty.txt is empty"),
    ("binary-file", train_on("blob.txt"), _binary_file, "blob.txt looks binary"),
    ("non-utf8-file", train_on("latin1.txt"), _latin1_file, "latin1.txt is not valid utf-8"),
    ("non-utf8-names-fix", train_on("latin1.txt"), _latin1_file, "--encoding latin-1"),
    ("unknown-encoding", TRAIN + ["--encoding", "klingon"], _corpus, "--encoding 'klingon' is not a known text encoding"),
    ("format-file-on-folder", TRAIN + ["--format", "csv"], _corpus, "is a folder but --format csv expects a file"),
    # CSV and JSONL
    ("csv-no-text-column", train_on("news.csv"), _csv_file, "is a CSV: name the text columns with --text-column"),
    ("csv-missing-column", train_on("news.csv", "--text-column", "body"), _csv_file, "--text-column body: not in"),
    ("csv-lists-columns", train_on("news.csv", "--text-column", "body"), _csv_file, "its columns are: title, text"),
    ("csv-short-row", train_on("short.csv", "--text-column", "text"), _csv_short_row, "short.csv, row 3: has 1 fields"),
    ("jsonl-no-text-field", train_on("docs.jsonl"), _jsonl_file,
     "is JSONL: name the key holding the text with --text-field"),
    ("jsonl-missing-field", train_on("docs.jsonl", "--text-field", "text"), _jsonl_file, "--text-field text: not in"),
    ("jsonl-bad-line", train_on("bad.jsonl", "--text-field", "text"), _jsonl_bad_line,
     "bad.jsonl, line 3: not valid JSON"),
    # out-of-range flags
    ("bptt-0", TRAIN + ["--bptt", "0"], _corpus, "--bptt must be at least 1"),
    ("batch-size-0", TRAIN + ["--batch-size", "0"], _corpus, "--batch-size must be at least 1"),
    ("batch-size-too-big", TRAIN + ["--batch-size", "100000"], _corpus, "--batch-size 100000 leaves fewer than 2 tokens"),
    ("lr-negative", TRAIN + ["--lr", "-1"], _corpus, "--lr must be positive"),
    ("dropout-1.5", TRAIN + ["--dropout", "1.5"], _corpus, "--dropout must be in [0, 1)"),
    ("epochs-0", TRAIN + ["--epochs", "0"], _corpus, "--epochs must be at least 1"),
    ("max-time-0", TRAIN + ["--max-time", "0"], _corpus, "--max-time must be positive"),
    ("min-freq-0", TRAIN + ["--min-freq", "0"], _corpus, "--min-freq must be at least 1"),
    ("max-vocab-2", TRAIN + ["--max-vocab", "2"], _corpus, "--max-vocab must be at least 3"),
    ("unknown-model", TRAIN + ["--model", "LSTMX"], _corpus, "--model must be one of"),
    ("split-ratios", train_on("latin1.txt", "--split-ratios", "0.5,0.5,0.5"), _latin1_file,
     "--split-ratios must be three positive fractions that sum to 1"),
    ("split-ratios-nan", train_on("latin1.txt", "--split-ratios", "nan,nan,nan"), _latin1_file,
     "--split-ratios must be three positive fractions that sum to 1"),
    ("lr-inf", TRAIN + ["--lr", "inf"], _corpus, "--lr must be positive and finite"),
    ("weight-decay-inf", TRAIN + ["--weight-decay", "inf"], _corpus, "--weight-decay must be 0 or a positive finite number"),
    ("min-lr-ratio-above-1", TRAIN + ["--min-lr-ratio", "1.5"], _corpus, "--min-lr-ratio must be between 0 and 1"),
    ("seed-beyond-64-bits", TRAIN + ["--seed", str(2**64)], _corpus, "--seed must be between 0 and 2**64-1"),
    ("seed-negative", TRAIN + ["--seed", "-1"], _corpus, "--seed must be between 0 and 2**64-1"),
    ("save-every-nan", TRAIN + ["--save-every", "nan"], _corpus, "--save-every must be 0 (every step) or more seconds"),
    ("save-every-negative", TRAIN + ["--save-every", "-5"], _corpus, "--save-every must be 0 (every step) or more seconds"),
    ("nhid-absurd", TRAIN + ["--nhid", "2000000"], _corpus, "--nhid must be between 1 and 65,536"),
    # each tensor within bounds, all of them ~860 GiB: refused before the allocator fails (or the OOM killer strikes)
    ("model-beyond-memory", TRAIN + ["--emsize", "60000", "--nhid", "60000", "--nlayers", "4"], _corpus,
     "choose a smaller --nhid/--emsize/--nlayers"),
    ("nlayers-absurd", TRAIN + ["--nlayers", str(10**6)], _corpus, "--nlayers must be between 1 and 1,024"),
    # incompatible flags
    ("tied-adaptive", TRAIN + ["--tied", "--adaptive-softmax"], _corpus, "--tied and --adaptive-softmax"),
    ("awd-flag-on-lstm", TRAIN + ["--wdrop", "0.5"], _corpus, "--wdrop apply to --model AWD_LSTM only"),
    ("bad-cutoffs", TRAIN + ["--adaptive-softmax", "--cutoffs", "20,10"], _corpus, "--cutoffs must be positive and increasing"),
    ("memory-lstm", TRAIN + ["--memory", "4"], _corpus, "--memory applies to --model Transformer only"),
    ("nhead-divides", TRAIN + ["--model", "Transformer", "--emsize", "10", "--nhead", "3"], _corpus,
     "--emsize 10 must be divisible by --nhead 3"),
    ("strip-punct-char", TRAIN + ["--level", "char", "--strip-punctuation"], _corpus, "--strip-punctuation applies to --level word only"),
    ("resume-and-force", ["train", "--out", "{run}", "--resume", "--force"], None, "--resume and --force contradict each other"),
    ("resume-changed-flag", ["train", "--out", "{run}", "--resume", "--lr", "5"], None, "--lr 5.0 differs from the run's"),
    ("resume-changed-context", ["train", "--out", "{run}", "--resume", "--context", "3"], None, "--context 3 differs from the run's"),
    ("resume-not-a-run", ["train", "--out", "{tmp}/plain", "--resume"], _plain_folder, "is not a neurallm run directory"),
    ("prepared-data-with-level", train_on("char-prepared", "--level", "word"), _char_prepared,
     "is already prepared; its tokenizer and reading settings are fixed, so drop --level"),
    ("bad-byte-offset-in-file", train_on("late.txt"), _late_bad_byte, "byte 300003 of the file"),
    # prepared folders
    ("prepare-out-foreign-folder", ["prepare", "--data", "{tmp}/corpus", "--out", "{tmp}/notes"], _stray_folder,
     "--out {tmp}/notes holds files prepare did not write (todo.txt)"),
    ("prepare-out-is-a-run", ["prepare", "--data", "{tmp}/corpus", "--out", "{run}"], _corpus,
     "prepare writes only into a new or empty folder or its own earlier output"),
    ("prepare-out-is-file", ["prepare", "--data", "{tmp}/corpus", "--out", "{tmp}/run.txt"], _out_is_file,
     "--out {tmp}/run.txt is a file"),
    ("prepared-folder-mixes-corpora", train_on("mixed"), _mixed_prepared,
     "mixed/train.npy does not match {tmp}/mixed/meta.json"),
    # run directories
    ("out-is-run", train_on("corpus", out="{run}"), _corpus, "use --resume to continue it or --force to replace it"),
    ("out-not-empty", train_on("corpus", out="{tmp}/notes"), _stray_folder, "is a non-empty folder that is not a neurallm run"),
    ("force-refuses-foreign-folder", train_on("corpus", "--force", out="{tmp}/notes"), _stray_folder, "refusing to delete it even with --force"),
    ("force-refuses-run-with-foreign-file", train_on("corpus", "--force", out="{tmp}/old-run"), _run_with_thesis,
     "it holds thesis.tex, which a run does not write); refusing to delete it even with --force"),
    ("force-refuses-other-config", train_on("corpus", "--force", out="{tmp}/hf"), _hf_model_folder,
     "its config.json is not a neurallm run's"),
    ("resume-without-last", ["train", "--out", "{copy}", "--resume"], _drop_last, "model.safetensors, are still there"),
    ("resume-damaged-state", ["train", "--out", "{copy}", "--resume"], _edit_training_state(optimizer={"scalars": {}}),
     "its training state is damaged"),
    ("resume-state-wrong-type", ["train", "--out", "{copy}", "--resume"], _edit_training_state(epoch="one"),
     "its training state is damaged (entry 'epoch' missing or of the wrong type)"),
    ("resume-config-nhid-20000", ["train", "--out", "{copy}", "--resume"], _edit_config(nhid=20000),
     "has shape (64, 16) but config.json implies (80000, 16)"),
    # crafted or damaged run folders: refused before anything big is read or built
    ("vocab-dev-zero", ["eval", "{copy}"], _vocab_dev_zero, "vocab.json cannot be read: not a regular file"),
    ("config-too-large", ["eval", "{copy}"], _config_huge, "config.json cannot be read: larger than 1,048,576 bytes"),
    ("config-nhid-20000", ["eval", "{copy}"], _edit_config(nhid=20000), "but config.json implies (80000, 16)"),
    ("config-nlayers-million", ["eval", "{copy}"], _edit_config(nlayers=10**6), "--nlayers must be between 1 and 1,024"),
    ("config-wrong-type", ["generate", "{copy}"], _edit_config(nhid="16"), "nhid is '16', not of type int"),
    ("weights-nan", ["eval", "{copy}"], _rewrite_weights(_nan_weight), "holds NaN or infinite values"),
    ("weights-not-float", ["eval", "{copy}"], _rewrite_weights(_int_weight), "not a floating-point type"),
    ("header-million-tensors", ["eval", "{copy}"], _header_listing(10**6),
     "model.safetensors is not a readable safetensors file (header length 58,888,891 bytes)"),
    ("header-120k-tensors", ["eval", "{copy}"], _header_listing(120_000), "(header: 120,000 tensors)"),
    ("out-is-file", train_on("corpus", out="{tmp}/run.txt"), _out_is_file, "is a file; name a folder for the run"),
    ("eval-not-a-run", ["eval", "{tmp}/plain"], _plain_folder, "is not a neurallm run directory (no config.json)"),
    ("eval-missing-run", ["eval", "{tmp}/no-such-run"], None, "no-such-run: no such run directory"),
    ("eval-other-tokenization", ["eval", "{run}", "--data", "{tmp}/char-prepared"], _char_prepared,
     "was prepared with another tokenization or vocabulary"),
    ("eval-batch-size-0", ["eval", "{run}", "--batch-size", "0"], None, "--batch-size must be at least 1"),
    ("eval-context-negative", ["eval", "{run}", "--context", "-1"], None, "--context must be 0 or more"),
    ("generate-not-a-run", ["generate", "{tmp}/plain"], _plain_folder, "is not a neurallm run directory"),
    ("generate-tokens-0", ["generate", "{run}", "--tokens", "0"], None, "--tokens must be at least 1"),
    ("generate-top-p-2", ["generate", "{run}", "--top-p", "2"], None, "--top-p must be in (0, 1]"),
    ("generate-top-k-0", ["generate", "{run}", "--top-k", "0"], None, "--top-k must be at least 1"),
    ("generate-temperature", ["generate", "{run}", "--temperature", "-1"], None, "--temperature must be 0 (greedy) or a positive"),
    ("generate-temperature-nan", ["generate", "{run}", "--temperature", "nan"], None, "--temperature must be 0 (greedy) or a positive"),
    ("generate-seed-beyond-64-bits", ["generate", "{run}", "--seed", str(2**64)], None, "--seed must be between 0 and 2**64-1"),
    ("generate-context-negative", ["generate", "{run}", "--context", "-3"], None, "--context must be at least 1"),
    ("generate-tokens-above-cap", ["generate", "{run}", "--tokens", "1000001"], None, "--tokens must be at most 1,000,000"),
    ("generate-out-in-run", ["generate", "{copy}", "--out", "{copy}/vocab.json"], None, "/copy's own vocab.json, which neurallm never writes over"),
    ("generate-out-is-folder", ["generate", "{run}", "--out", "{tmp}"], None, "is a folder; name a file for the text"),
    ("explain-range-descending", ["explain", "--range", "5..1"], None, "--range '5..1' is not of the form FIRST..LAST"),
    ("explain-text-and-range", ["explain", "--range", "1..4", "--text", "a b"], None, "give exactly one of --text"),
]
CPU_ONLY_CASES = [
    ("train-device-cuda", TRAIN + ["--device", "cuda"], _corpus, "--device cuda: no CUDA GPU is visible"),
    ("eval-device-cuda", ["eval", "{run}", "--device", "cuda"], None, "--device cuda: no CUDA GPU is visible"),
]
if not torch.cuda.is_available():
    CASES += CPU_ONLY_CASES


def _argv(argv: list[str], tmp: Path, run: Path) -> list[str]:
    return [a.format(tmp=tmp, run=run, copy=tmp / "copy") for a in argv]


@pytest.mark.parametrize("argv, setup, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_user_mistake_is_one_clean_line(argv, setup, expected, tmp_path, trained_run, capsys):
    if any("{copy}" in a for a in argv):
        copy_run(trained_run, tmp_path / "copy")
    if setup is not None:
        setup(tmp_path)
        capsys.readouterr()  # what the setup printed (a prepare's warnings) is not the refused command's
    before = _listing(tmp_path / "copy")
    code = main(_argv(argv, tmp_path, trained_run))
    err = capsys.readouterr().err
    assert code == 1
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"neurallm {argv[0]}: error: ")
    assert expected.format(tmp=tmp_path) in err
    assert "Traceback" not in err
    assert _listing(tmp_path / "copy") == before  # a refused command changed nothing in the run


def _listing(folder: Path) -> dict[str, bytes]:
    if not folder.is_dir():
        return {}
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and not p.is_symlink()}


def test_case_ids_are_unique():
    ids = [c[0] for c in CASES]
    assert len(ids) == len(set(ids))


def test_a_failed_start_leaves_no_run_that_blocks_the_corrected_command(tmp_path, capsys):
    _corpus(tmp_path)
    assert main(_argv(TRAIN + ["--batch-size", "100000"], tmp_path, tmp_path)) == 1
    assert not (tmp_path / "run" / "config.json").exists()
    assert main(_argv(TRAIN + ["--emsize", "8", "--nhid", "8", "--nlayers", "1", "--bptt", "8", "--batch-size", "4",
                               "--eval-batch-size", "2", "--context", "8"], tmp_path, tmp_path)) == 0


def test_encoding_flag_reads_what_strict_utf8_refuses(tmp_path, capsys):
    _latin1_file(tmp_path)
    assert main(["prepare", "--data", str(tmp_path / "latin1.txt")]) == 1
    assert main(["prepare", "--data", str(tmp_path / "latin1.txt"), "--encoding", "latin-1", "--out", str(tmp_path / "p")]) == 0
    vocab = load_prepared(tmp_path / "p").vocab
    assert "café" in vocab.index and "très" in vocab.index


def _cli(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_COLOR": "1"}
    return subprocess.run([sys.executable, "-m", "neurallm", *argv], capture_output=True, text=True, cwd=cwd, env=env, timeout=120)


@pytest.mark.integration
def test_a_real_process_prints_one_line_and_no_traceback(tmp_path):
    _latin1_file(tmp_path)
    for argv, expected in (
        (["train", "--data", "latin1.txt", "--out", "run"], "latin1.txt is not valid utf-8"),
        (["eval", "no-such-run"], "no-such-run: no such run directory"),
        (["train", "--data", "latin1.txt", "--out", "run", "--lr", "-1"], "--lr must be positive"),
    ):
        result = _cli(*argv, cwd=tmp_path)
        assert result.returncode == 1
        assert result.stderr.count("\n") == 1 and expected in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


@pytest.mark.parametrize("argv", [["--debug", "explain", "--range", "5..1"], ["explain", "--debug", "--range", "5..1"]],
                         ids=["before-subcommand", "after-subcommand"])
@pytest.mark.integration
def test_debug_shows_the_traceback(argv, tmp_path):
    result = _cli(*argv, cwd=tmp_path)
    assert result.returncode != 0
    assert "Traceback" in result.stderr
    assert "ConfigError: --range '5..1'" in result.stderr


def test_debug_after_subcommand_does_not_hide_the_top_level_flag():
    from neurallm.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["--debug", "explain", "--range", "1..3"]).debug is True
    assert parser.parse_args(["explain", "--debug", "--range", "1..3"]).debug is True
    assert parser.parse_args(["explain", "--range", "1..3"]).debug is False


@pytest.mark.parametrize("argv, expected", [
    (["train", "--out", "x", "--bptt", "abc"], "--bptt: invalid int value"),
    (["train", "--out", "x", "--optimizer", "adam"], "--optimizer: invalid choice"),
    (["eval", "x", "--compare-batch-sizes", "0,5"], "batch sizes must be positive integers"),
    (["frobnicate"], "invalid choice"),
], ids=["type", "choice", "batch-size-list", "subcommand"])
def test_argparse_mistakes_exit_2_with_usage_and_one_error_line(argv, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.splitlines()[-1].startswith("neurallm") and expected in err.splitlines()[-1]
    assert "Traceback" not in err

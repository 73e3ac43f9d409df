"""Every file of a run folder is read within bounds and checked, by one reader per file (neurallm.runfolder).

The cases are damaged or crafted run folders: a file replaced by a symlink to ``/dev/zero`` or by a FIFO (never a
7 GB read, never a hang), values of the wrong type or out of range, a BPE run without its tokenizer. Each one is
one line naming the file; a damaged derived fact (metrics, results) only leaves that fact out of the server's page.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import neurallm
from conftest import TINY_MODEL, write_patterned_corpus
from neurallm import runfolder
from neurallm.cli import main
from neurallm.config import ServeConfig
from neurallm.errors import RunDirError

REPO = Path(__file__).resolve().parents[1]


def finishes(call, seconds: float = 30.0):
    """Run ``call`` in a thread and return what it returns; fail (rather than hang the suite) if it does not end."""
    outcome: dict = {}

    def target():
        try:
            outcome["value"] = call()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s (a read that hangs)"
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"neurallm {command}: error: ")
    return err


def replace_with(path: Path, kind: str) -> None:
    """Put a symlink to /dev/zero, a FIFO or a file of ``kind`` JSON where ``path`` was."""
    path.unlink(missing_ok=True)
    if kind == "dev-zero":
        path.symlink_to("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        path.write_text(kind, encoding="utf-8")


def facts(run_dir: Path) -> dict:
    from neurallm.server.facts import model_facts

    return finishes(lambda: model_facts(neurallm.load_run(run_dir), ServeConfig()))


# --- metrics.jsonl and results.json: plot refuses with one line, serve leaves the fact out ----------------------

BAD_METRICS = {
    "dev-zero": "dev-zero",
    "fifo": "fifo",
    "epoch-one": '{"epoch": "one", "train_loss": 1.0, "valid_loss": 1.0, "lr": 1.0}\n',
    "null-line": "null\n",
    "400-digits": '{"epoch": 1, "train_loss": ' + "9" * 400 + ', "valid_loss": 1.0, "lr": 1.0}\n',
    "infinity": '{"epoch": 1, "train_loss": Infinity, "valid_loss": Infinity, "lr": 1.0}\n',
    "nan": '{"epoch": 1, "train_loss": 1.0, "valid_loss": NaN, "lr": 1.0}\n',
    "list": "[1, 2]\n",
    "not-json": '{"epoch": 1,\n',
    "seconds-text": '{"epoch": 1, "train_loss": 1.0, "valid_loss": 1.0, "lr": 1.0, "seconds": "ten"}\n',
    "epoch-zero": '{"epoch": 0, "train_loss": 1.0, "valid_loss": 1.0, "lr": 1.0}\n',
    "epoch-true": '{"epoch": true, "train_loss": 1.0, "valid_loss": 1.0, "lr": 1.0}\n',
}


@pytest.mark.parametrize("content", BAD_METRICS.values(), ids=BAD_METRICS.keys())
def test_damaged_metrics_are_one_line_from_plot(run_copy, tmp_path, capsys, content):
    replace_with(run_copy / "metrics.jsonl", content)
    assert finishes(lambda: main(["plot", str(run_copy), "--out", str(tmp_path / "c.png")])) == 1
    assert "metrics.jsonl" in one_error_line(capsys, "plot")
    assert not (tmp_path / "c.png").exists()


@pytest.mark.parametrize("content", BAD_METRICS.values(), ids=BAD_METRICS.keys())
def test_damaged_metrics_leave_the_training_time_out_of_the_page(run_copy, caplog, content):
    replace_with(run_copy / "metrics.jsonl", content)
    with caplog.at_level(logging.WARNING, logger="neurallm"):
        info = facts(run_copy)
    assert info["epochs"] == 0 and info["training_seconds"] == 0
    assert info["test"] is not None  # the other facts are still there
    assert any("metrics.jsonl" in r.getMessage() for r in caplog.records)


BAD_RESULTS = {
    "dev-zero": "dev-zero",
    "fifo": "fifo",
    "a-list": "[1, 2]",
    "test-oops": '{"test": "oops"}',
    "ppl-text": '{"test": {"ppl": "low", "loss": 1.0}}',
    "loss-infinite": '{"test": {"ppl": 3.0, "loss": Infinity}}',
    "tokens-negative": '{"test": {"ppl": 3.0, "loss": 1.0, "tokens": -5}}',
    "not-json": "{",
}


@pytest.mark.parametrize("content", BAD_RESULTS.values(), ids=BAD_RESULTS.keys())
def test_damaged_results_say_no_test_result_and_the_server_still_starts(run_copy, caplog, content):
    replace_with(run_copy / "results.json", content)
    with caplog.at_level(logging.WARNING, logger="neurallm"):
        info = facts(run_copy)
    assert info["test"] is None  # the page shows "no test result"
    assert info["epochs"] == 2
    assert any("results.json" in r.getMessage() for r in caplog.records)


def test_the_server_app_starts_and_answers_info_on_a_run_whose_facts_are_damaged(run_copy):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from neurallm.server.app import create_app

    replace_with(run_copy / "results.json", "dev-zero")
    replace_with(run_copy / "metrics.jsonl", "fifo")
    app = finishes(lambda: create_app(neurallm.load_run(run_copy), ServeConfig()))
    info = TestClient(app, base_url="http://127.0.0.1").get("/api/info").json()
    assert info["test"] is None and info["epochs"] == 0


def test_an_infinite_test_perplexity_is_no_fact(run_copy):
    """JSON cannot carry Infinity: the page would fail to load its facts."""
    replace_with(run_copy / "results.json", '{"test": {"ppl": Infinity, "loss": 800.0}}')
    assert facts(run_copy)["test"] is None


def test_a_sound_metrics_file_reads_back_what_training_wrote(trained_run):
    records = runfolder.read_metrics(trained_run)
    lines = (trained_run / "metrics.jsonl").read_text().splitlines()
    assert records == [json.loads(line) for line in lines] and [r["epoch"] for r in records] == [1, 2]
    assert runfolder.read_results(trained_run)["test"]["ppl"] > 1


def test_metrics_above_the_cap_are_refused_without_reading_them(run_copy, monkeypatch):
    monkeypatch.setattr(runfolder, "MAX_METRICS_BYTES", 100)
    with pytest.raises(RunDirError, match=r"metrics.jsonl cannot be read: larger than 100 bytes"):
        runfolder.read_metrics(run_copy)


# --- plot on a run that stopped before its first epoch ended ----------------------------------------------------


@pytest.mark.parametrize("metrics", ["", "\n", None], ids=["empty", "blank-line", "missing"])
def test_plot_of_a_run_stopped_before_its_first_epoch_is_one_line(run_copy, tmp_path, capsys, metrics):
    if metrics is None:
        (run_copy / "metrics.jsonl").unlink()
    else:
        (run_copy / "metrics.jsonl").write_text(metrics)
    assert main(["plot", str(run_copy), "--out", str(tmp_path / "c.png")]) == 1
    assert "has no finished epoch yet" in one_error_line(capsys, "plot")


def test_plot_of_a_run_stopped_by_sigterm_before_its_first_epoch_ended(tmp_path):
    """The real thing: a run SIGTERMed in its first epoch leaves an empty metrics.jsonl."""
    corpus = write_patterned_corpus(tmp_path / "corpus", lines=2000)
    script = ("import os, signal, sys\n"
              "import neurallm.training.loop as loop\n"
              "real = loop.Trainer._step\n"
              "def step(self, *a, **k):\n"
              "    os.kill(os.getpid(), signal.SIGTERM)\n"
              "    return real(self, *a, **k)\n"
              "loop.Trainer._step = step\n"
              "from neurallm.cli import main\n"
              "sys.exit(main(sys.argv[1:]))\n")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    train = [sys.executable, "-c", script, "train", "--data", str(corpus), "--out", str(tmp_path / "run"), "--no-progress",
             "--emsize", "8", "--nhid", "8", "--nlayers", "1", "--bptt", "8", "--batch-size", "4", "--epochs", "1"]
    subprocess.run(train, capture_output=True, text=True, env=env, timeout=300)
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == ""  # stopped before its first epoch ended
    plot = subprocess.run([sys.executable, "-m", "neurallm", "plot", str(tmp_path / "run"), "--out", str(tmp_path / "c.png")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert plot.returncode == 1 and "Traceback" not in plot.stderr
    assert plot.stderr.count("\n") == 1 and "has no finished epoch yet" in plot.stderr


# --- config.json: values that parse but would crash later ---------------------------------------------------


def edit_config(run: Path, section: str, **values) -> None:
    path = run / "config.json"
    config = json.loads(path.read_text())
    config[section].update(values)
    path.write_text(json.dumps(config))


BAD_CONFIG = {
    "cutoffs-fractions": ("model", {"cutoffs": [200.5, 1000.25]}, "--cutoffs must be whole word ids"),
    "source-data-list": ("source", {"data": [1]}, "data is [1], not of type str"),
    "text-column-number": ("source", {"text_column": 3}, "text_column is 3, not of type str | None"),
    "level-list": ("tokenizer", {"level": ["word"]}, "level is ['word'], not of type str"),
    "bpe-vocab-size-text": ("tokenizer", {"bpe_vocab_size": "many"}, "bpe_vocab_size is 'many'"),
    "max-time-text": ("train", {"max_time": "soon"}, "max_time is 'soon'"),
}


@pytest.mark.parametrize("section, values, expected", BAD_CONFIG.values(), ids=BAD_CONFIG.keys())
@pytest.mark.parametrize("command", ["eval", "generate", "plot"])
def test_a_config_value_of_the_wrong_type_is_one_line(run_copy, tmp_path, capsys, section, values, expected, command):
    edit_config(run_copy, section, **values)
    argv = [command, str(run_copy)] + (["--out", str(tmp_path / "c.png")] if command == "plot" else [])
    assert main(argv) == 1
    err = one_error_line(capsys, command)
    assert "config.json" in err and expected in err


# --- tokenizer.json ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bpe-run")
    corpus = write_patterned_corpus(root / "corpus", lines=100)
    neurallm.train(corpus, root / "run", progress=False, level="bpe", bpe_vocab_size=300, **TINY_MODEL)
    return root / "run"


@pytest.fixture
def bpe_copy(bpe_run, tmp_path) -> Path:
    shutil.copytree(bpe_run, tmp_path / "bpe")
    return tmp_path / "bpe"


@pytest.mark.parametrize("damage, expected", [
    ("missing", "tokenizer.json is missing: this BPE run cannot encode or decode text without it"),
    ("dev-zero", "tokenizer.json cannot be read: not a regular file"),
    ("fifo", "tokenizer.json cannot be read: not a regular file"),
    ("not-json", "tokenizer.json is not a tokenizers BPE file"),
    ("another-vocabulary", "tokenizer.json does not match"),
], ids=["missing", "dev-zero", "fifo", "not-json", "another-vocabulary"])
@pytest.mark.parametrize("command", [["generate", "--prompt", "the cat", "--tokens", "5"], ["score", "--text", "the cat"],
                                     ["eval"], ["serve", "--port", "0"]], ids=["generate", "score", "eval", "serve"])
def test_a_bpe_run_without_a_sound_tokenizer_is_refused_at_load(bpe_copy, capsys, damage, expected, command):
    path = bpe_copy / "tokenizer.json"
    if damage == "missing":
        path.unlink()
    elif damage == "another-vocabulary":
        tokenizer = json.loads(path.read_text())
        vocab = tokenizer["model"]["vocab"]  # two tokens swap ids: a sound tokenizer, but not this run's
        vocab["Ġcat"], vocab["a"] = vocab["a"], vocab["Ġcat"]
        path.write_text(json.dumps(tokenizer))
    else:
        replace_with(path, "{" if damage == "not-json" else damage)
    assert finishes(lambda: main([command[0], str(bpe_copy), *command[1:]])) == 1
    err = one_error_line(capsys, command[0])
    assert expected in err and str(path) in err


def test_tokenizer_json_above_its_cap_is_refused(bpe_copy, monkeypatch):
    monkeypatch.setattr(runfolder, "MAX_TOKENIZER_BYTES", 1000)
    with pytest.raises(RunDirError, match=r"tokenizer.json cannot be read: larger than 1,000 bytes"):
        neurallm.load_run(bpe_copy)


def test_a_sound_bpe_run_still_loads_and_generates(bpe_run):
    text = neurallm.load_run(bpe_run).generate("the cat", tokens=5, seed=1).text
    assert "Ġ" not in text and text.startswith("the cat")


# --- last.safetensors: a damaged training state stops --resume before any epoch trains --------------------------


def damage_state(run: Path, **entries) -> None:
    path = run / "last.safetensors"
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    state = json.loads(metadata["neurallm_state"])
    state.update(entries)
    save_file(tensors, str(path), metadata={**metadata, "neurallm_state": json.dumps(state)})


BAD_STATES = {
    "best-valid-loss-text": {"best_valid_loss": "x"},
    "best-valid-loss-nan": {"best_valid_loss": float("nan")},
    "metrics-numbers": {"metrics": [1, 2]},
    "metrics-epoch-one": {"metrics": [{"epoch": "one", "train_loss": 1.0, "valid_loss": 1.0, "lr": 1.0}]},
    "metrics-no-loss": {"metrics": [{"epoch": 1}]},
    "epoch-loss-short": {"epoch_loss": [1.0]},
    "world-size-text": {"world_size": "two"},
    "average-list": {"average": [1]},
}


@pytest.mark.parametrize("entries", BAD_STATES.values(), ids=BAD_STATES.keys())
def test_a_damaged_training_state_is_refused_at_the_start_of_resume(run_copy, capsys, entries):
    damage_state(run_copy, **entries)
    before = {p.name: p.read_bytes() for p in run_copy.iterdir() if p.is_file()}
    assert main(["train", "--out", str(run_copy), "--resume", "--epochs", "3", "--no-progress"]) == 1
    out, err = capsys.readouterr()
    assert "end of epoch" not in out  # refused before any epoch trained
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "last.safetensors: its training state is damaged" in err
    assert {p.name: p.read_bytes() for p in run_copy.iterdir() if p.is_file()} == before


# --- inference never imports the training package --------------------------------------------------------------


def test_loading_evaluating_generating_serving_exporting_and_plotting_do_not_import_training(trained_run, tmp_path):
    pytest.importorskip("fastapi")
    code = f"""
import sys
from pathlib import Path
import neurallm
from neurallm.config import ServeConfig
from neurallm.plots import plot_runs
from neurallm.server.app import create_app
run = neurallm.load_run({str(trained_run)!r})
run.evaluate(split="valid")
run.generate("the", tokens=3)
run.score(["the cat"])
create_app(run, ServeConfig())
plot_runs([Path({str(trained_run)!r})], Path({str(tmp_path / "c.png")!r}))
neurallm.load_run({str(trained_run)!r}, checkpoint="last")
try:
    import onnx  # noqa: F401
    from neurallm.export import export_onnx
    export_onnx({str(trained_run)!r}, {str(tmp_path / "m.onnx")!r})
except ModuleNotFoundError:
    pass
print(sorted(m for m in sys.modules if m.startswith("neurallm.training")))
"""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_the_run_folder_module_and_plot_need_no_torch(trained_run, tmp_path):
    """Reading a run folder is plain JSON and text: plotting a run imports neither torch nor neurallm.training."""
    code = (f"import sys; from neurallm.cli import main; from neurallm import runfolder; "
            f"runfolder.read_metrics({str(trained_run)!r}); runfolder.read_results({str(trained_run)!r}); "
            f"code = main(['plot', {str(trained_run)!r}, '--out', {str(tmp_path / 'c.png')!r}]); "
            f"print(code, 'torch' in sys.modules, any(m.startswith('neurallm.training') for m in sys.modules))")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.stdout.split()[-3:] == ["0", "False", "False"], result.stderr

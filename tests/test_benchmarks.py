"""The benchmark scripts still run against the current code (they print figures; these runs check only that they
work end to end and print what docs/benchmarks.md quotes, on a tiny corpus)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from neurallm.runtime import bf16_supported

from conftest import write_patterned_corpus

pytestmark = pytest.mark.integration  # each test runs a benchmark script in a subprocess

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _run(script: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_profile_train_prints_the_step_time_and_the_operator_table(tmp_path):
    corpus = write_patterned_corpus(tmp_path / "corpus", lines=1000)  # 15 windows: warm-up, timed and profiled steps
    out = _run("profile_train.py", "--data", str(corpus), "--steps", "2", "--warmup", "1", "--rows", "5", "--amp", "bf16")
    assert "ms/step without the profiler" in out
    assert "Self CPU time total" in out


def test_profile_train_profiles_a_presets_model_and_optimizer(tmp_path):
    corpus = write_patterned_corpus(tmp_path / "corpus", lines=1000)
    out = _run("profile_train.py", "--data", str(corpus), "--preset", "cpu-fast", "--amp", "none", "--steps", "2",
               "--warmup", "1", "--rows", "5")
    assert "cpu-fast: AWDLSTMLanguageModel, batch 20, bptt 35, adamw, products in float32" in out
    assert "ms/step without the profiler" in out and "Self CPU time total" in out


def test_gpu_throughput_prints_a_row_per_model_and_compile_mode_on_any_device():
    out = _run("gpu_throughput.py", "--tiny", "--device", "cpu", "--compile", "off", "--steps", "2", "--warmup", "1",
               "--batch-size", "3")
    rows = [line.split() for line in out.splitlines() if line.startswith(("lstm", "gpt2"))]
    assert [row[0] for row in rows] == ["lstm-2x200", "lstm-2x650", "gpt2-small"]
    assert all(row[3:5] == ["b3", "no"] and float(row[6].replace(",", "")) > 0 for row in rows)  # tiny shapes, batch 3
    assert rows[2][-1] == "unknown"  # no MFU without the device's bf16 peak


def test_train_speed_compares_the_same_windows_of_both_programs(tmp_path):
    corpus = write_patterned_corpus(tmp_path / "corpus", lines=400)
    out = _run("train_speed.py", "--data", str(corpus), "--repeats", "1", "--batches", "2", "--threads", "1")
    summary = json.loads(out.splitlines()[-1])
    assert set(summary) == {"tokens_per_s", "tokens_per_cpu_s", "peak_rss_mb"}
    assert summary["tokens_per_s"]["neurallm"] > 0 and summary["tokens_per_s"]["baseline"] > 0


def test_eval_speed_reports_agreement_between_batch_sizes(tmp_path):
    corpus = write_patterned_corpus(tmp_path / "corpus", lines=400)
    out = _run("eval_speed.py", "--data", str(corpus), "--batch-sizes", "1,4", "--repeats", "1")
    summary = json.loads(out.splitlines()[-1])
    assert [row["batch_size"] for row in summary["exact"]] == [1, 4]
    assert summary["exact"][1]["gap_vs_first"] < 5e-4


@pytest.mark.skipif(not bf16_supported(torch.device("cpu")), reason="this CPU has no bfloat16 hardware")
def test_eval_speed_compares_bf16_with_float32_evaluation(tmp_path):
    corpus = write_patterned_corpus(tmp_path / "corpus", lines=400)
    out = _run("eval_speed.py", "--data", str(corpus), "--batch-sizes", "1,4", "--repeats", "1", "--amp", "none,bf16")
    rows = json.loads(out.splitlines()[-1])["exact"]
    assert [(row["amp"], row["batch_size"]) for row in rows] == [("none", 1), ("none", 4), ("bf16", 1), ("bf16", 4)]
    assert rows[0]["gap_vs_float32"] == 0.0 and rows[2]["gap_vs_float32"] != 0.0


def test_output_layer_floor_prints_each_slice_size():
    out = _run("output_layer_floor.py", "--dim", "16", "--vocab", "500", "--rows", "8,32", "--repeats", "2")
    summary = json.loads(out.splitlines()[-1])
    assert [row["rows"] for row in summary["slices"]] == [8, 32]
    timed = ("logits_addmm_us_per_token", "logits_bias_folded_us_per_token", "logits_bf16_us_per_token",
             "fused_log_softmax_us_per_token", "bf16_softmax_us_per_token")
    assert all(row[key] > 0 for row in summary["slices"] for key in timed)

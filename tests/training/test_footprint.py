"""A model whose parameters cannot fit in memory is refused before any of it is allocated, in one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from neurallm.config import ModelConfig, TrainConfig
from neurallm.errors import ConfigError
from neurallm.models import build_model
from neurallm.training.footprint import activation_bytes, check_model_fits, parameter_bound, parameter_count, training_bytes

CPU = torch.device("cpu")


def meminfo(tmp_path: Path, available_kib: int) -> Path:
    path = tmp_path / "meminfo"
    path.write_text(f"MemTotal:       99999999 kB\nMemFree:          1000 kB\nMemAvailable:   {available_kib} kB\n")
    return path


@pytest.mark.parametrize("settings", [
    dict(model="LSTM", nlayers=2),
    dict(model="GRU", adaptive_softmax=True, cutoffs=(100, 500)),
    dict(model="RNN_TANH", tied=True, emsize=32, nhid=64),
    dict(model="AWD_LSTM", nlayers=3, emsize=32, nhid=64, tied=True, wdrop=0.5),
    dict(model="Transformer", emsize=32, nhid=64, nhead=2, memory=16),
], ids=lambda s: s["model"])
def test_the_count_is_the_built_models_own_and_the_cheap_bound_is_above_it(settings):
    config = ModelConfig(vocab_size=1000, **settings)
    assert parameter_count(config) == sum(p.numel() for p in build_model(config).parameters())
    assert parameter_count(config) <= parameter_bound(config)


@pytest.mark.integration
def test_a_model_far_from_the_limit_is_not_built_on_the_meta_device(tmp_path):
    # initialising meta tensors imports sympy: 73 MB that an ordinary training run should not carry
    code = ("import sys, torch; from pathlib import Path; from neurallm.config import ModelConfig, TrainConfig; "
            "from neurallm.training.footprint import check_model_fits; "
            f"check_model_fits(ModelConfig(vocab_size=13777), TrainConfig(), torch.device('cpu'), Path({str(meminfo(tmp_path, 8 << 20))!r})); "
            "print('sympy' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_the_state_counted_follows_the_optimizer():
    # float32 weights and gradients, plus AdamW's two moments or NT-ASGD's running average
    assert training_bytes(1000, "sgd") == 8000
    assert training_bytes(1000, "ntasgd") == 12000
    assert training_bytes(1000, "adamw") == 16000


def test_a_model_larger_than_the_free_memory_is_refused_naming_the_flags(tmp_path):
    config = ModelConfig(vocab_size=1000, emsize=200, nhid=200)  # 1.0M parameters: 8 MB with SGD
    with pytest.raises(ConfigError, match=r"1,044,200 parameters.*sgd needs 8\.4 MB.*--nhid/--emsize/--nlayers"):
        check_model_fits(config, TrainConfig(optimizer="sgd"), CPU, meminfo(tmp_path, available_kib=4 * 1024))


def test_a_model_that_fits_passes(tmp_path):
    config = ModelConfig(vocab_size=1000, emsize=200, nhid=200)
    check_model_fits(config, TrainConfig(optimizer="adamw"), CPU, meminfo(tmp_path, available_kib=32 * 1024))


def test_nothing_is_checked_where_free_memory_cannot_be_read(tmp_path):
    config = ModelConfig(vocab_size=1000, emsize=200, nhid=200)
    check_model_fits(config, TrainConfig(), CPU, tmp_path / "no-meminfo-here")


def test_attention_over_a_huge_window_is_refused_naming_bptt(tmp_path):
    # --bptt 100000 --batch-size 1: 2 heads × 100,000² scores per layer, ~240 GB, far past 24 GiB
    config = ModelConfig(model="Transformer", vocab_size=1000, emsize=32, nhid=64, nhead=2, nlayers=2)
    with pytest.raises(ConfigError, match=r"--batch-size 1 × --bptt 100000 needs about .*attention.*smaller --bptt"):
        check_model_fits(config, TrainConfig(bptt=100_000, batch_size=1), CPU, meminfo(tmp_path, 24 << 20))
    check_model_fits(config, TrainConfig(bptt=256, batch_size=16), CPU, meminfo(tmp_path, 24 << 20))  # ordinary: fits


@pytest.mark.parametrize("model", ["LSTM", "Transformer"])
def test_activations_grow_with_the_tokens_of_a_step(model):
    config = ModelConfig(model=model, vocab_size=1000, emsize=32, nhid=64, nhead=2)
    small, large = (activation_bytes(config, TrainConfig(bptt=35, batch_size=b), CPU) for b in (10, 20))
    assert large == 2 * small > 0
    # a step never holds more than the train split: a window larger than the data is capped (and refused elsewhere)
    assert activation_bytes(config, TrainConfig(bptt=100_000, batch_size=1), CPU, train_tokens=700) == \
        activation_bytes(config, TrainConfig(bptt=700, batch_size=1), CPU)


def test_a_refused_transformer_window_leaves_no_run_folder(tmp_path, capsys):
    from conftest import write_patterned_corpus
    from neurallm.cli import main

    corpus = write_patterned_corpus(tmp_path / "corpus", lines=30_000)  # enough text for one window of 100,000
    out = tmp_path / "run"
    argv = ["train", "--data", str(corpus), "--out", str(out), "--model", "Transformer", "--emsize", "16", "--nhid", "16",
            "--nhead", "2", "--nlayers", "1", "--bptt", "100000", "--batch-size", "1", "--epochs", "1"]
    assert main(argv) != 0
    err = capsys.readouterr().err
    assert "choose a smaller --bptt or --batch-size" in err and "Traceback" not in err
    assert not out.exists()

"""The GPU path, on a real CUDA GPU: ``python -m pytest tests/test_cuda.py`` on a machine with one.

Without a GPU every test here is skipped (CI has none); docs/benchmarks.md (GPU) gives the figures and the GPU these last ran on.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import neurallm
from conftest import TINY_MODEL, write_patterned_corpus
from neurallm.config import ModelConfig, TrainConfig
from neurallm.data.batching import ContiguousBatches, ShuffledWindows, batchify
from neurallm.evaluation import evaluate
from neurallm.models import build_model, count_parameters
from neurallm.runtime import cuda_matmul_precision
from neurallm.training.optim import build_optimizer
from neurallm.training.step import LossTracker, training_step
from neurallm.training.throughput import bf16_peak_flops, mfu, model_flops_per_token

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda")
MODELS = {
    "LSTM": ModelConfig(vocab_size=500, emsize=32, nhid=32, dropout=0.2),
    "Transformer-XL": ModelConfig(model="Transformer", vocab_size=500, emsize=32, nhid=64, nlayers=2, nhead=2, memory=16),
}


@pytest.mark.parametrize("amp_dtype", [None, torch.bfloat16], ids=["float32", "bf16"])
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("windows", ["contiguous", "shuffled"])
def test_training_steps_never_make_the_host_wait_for_the_gpu(name, amp_dtype, windows):
    """Windows copied in, forward, backward, clip, update and the running loss: all queued, none read back."""
    model = build_model(MODELS[name]).to(CUDA).train()
    optimizer = build_optimizer(model, TrainConfig(lr=1.0))
    ids = torch.randint(0, 500, (4000,)).numpy().astype("uint16")  # as memory-mapped ids are stored
    batches = (ContiguousBatches(batchify(ids, 4), 16, CUDA) if windows == "contiguous"
               else ShuffledWindows(ids, 16, 4, seed=1, device=CUDA))
    tracker = LossTracker(CUDA)
    state = model.init_state(4, CUDA)
    steps = 0
    windows_of_epoch = batches.epoch(0)
    # the first step may wait once: cuDNN sets up its dropout states on the first call of a training LSTM
    inputs, targets = next(windows_of_epoch)
    state = training_step(model, optimizer, inputs, targets, state, clip=0.25, skip_nonfinite=False,
                          amp_dtype=amp_dtype).state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # from here, any operation that makes the host wait for the GPU raises
    try:
        for inputs, targets in windows_of_epoch:
            assert inputs.device.type == "cuda" and targets.device.type == "cuda"
            if not batches.carries_state:
                state = model.init_state(inputs.size(1), CUDA)
            with cuda_matmul_precision(CUDA, tf32=True):
                outcome = training_step(model, optimizer, inputs, targets, state, clip=0.25, skip_nonfinite=False,
                                        amp_dtype=amp_dtype)
            tracker.add(outcome)
            state = outcome.state
            steps += 1
            if steps == 20:
                break
    finally:
        torch.cuda.set_sync_debug_mode("default")
    flushed = tracker.flush()  # the one read-back per logging interval
    assert (flushed.steps, flushed.faulty) == (steps, 0) and math.isfinite(flushed.loss_sum)


@pytest.mark.parametrize("name", MODELS)
def test_gpu_evaluation_does_not_depend_on_the_batch_size_and_equals_the_cpu_evaluation(name):
    torch.manual_seed(0)
    model = build_model(MODELS[name]).eval()
    ids = torch.randint(0, 500, (3000,)).numpy().astype("uint16")
    on_cpu = evaluate(model, ids, batch_size=10, bptt=16)
    model.to(CUDA)
    on_gpu = [evaluate(model, ids, batch_size=b, bptt=16) for b in (1, 7, 40)]
    for result in on_gpu:
        assert result.tokens == on_cpu.tokens == len(ids) - 1
        assert result.loss == pytest.approx(on_cpu.loss, rel=1e-5)  # full float32: no TF32 in evaluation


def test_evaluation_restores_the_callers_tf32_setting():
    model = build_model(MODELS["LSTM"]).to(CUDA)
    ids = torch.randint(0, 500, (500,)).numpy().astype("uint16")
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        evaluate(model, ids, batch_size=4, bptt=16)
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(previous)


@pytest.mark.parametrize("extra", [
    {"shuffle_windows": True},
    {"amp": "bf16"},
    {"model": "Transformer", "nhead": 2, "memory": 8, "amp": "bf16", "compile": True},
], ids=["shuffled-windows", "lstm-bf16", "transformer-xl-bf16-compiled"])
def test_a_run_trained_on_the_gpu_evaluates_and_generates_on_the_cpu(tmp_path, extra):
    corpus = write_patterned_corpus(tmp_path / "corpus", lines=200)
    result = neurallm.train(corpus, tmp_path / "run", progress=False, **{**TINY_MODEL, "device": "cuda", **extra})
    assert result.stopped_by == "epochs" and math.isfinite(result.test.ppl)
    epoch_line = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert epoch_line["tokens_per_s"] > 0
    on_cpu = neurallm.load_run(tmp_path / "run", device="cpu")
    if extra.get("model") == "Transformer" and bf16_peak_flops(CUDA) is not None:
        # against this GPU's own bf16 peak (a tiny model's share of it rounds to almost nothing)
        config = on_cpu.config
        flops = model_flops_per_token(config.model, config.train.bptt, count_parameters(on_cpu.model))
        assert epoch_line["mfu"] == pytest.approx(mfu(epoch_line["tokens_per_s"], flops, bf16_peak_flops(CUDA)), abs=1e-4)
    assert next(on_cpu.model.parameters()).device.type == "cpu"
    assert on_cpu.evaluate(split="test").loss == pytest.approx(result.test.loss, rel=1e-5)
    assert len(on_cpu.generate("the cat", tokens=20, seed=3).generated_tokens) == 20
    on_gpu = neurallm.load_run(tmp_path / "run", device="cuda")
    assert len(on_gpu.generate("the cat", tokens=20, seed=3).generated_tokens) == 20

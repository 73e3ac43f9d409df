"""Training under torchrun (DistributedDataParallel on gloo), and the pieces of the GPU path a CPU can check."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import neurallm
from neurallm.config import ModelConfig
from neurallm.data.batching import ShuffledWindows
from neurallm.distributed import Ranks
from neurallm.errors import ConfigError, TrainingError
from neurallm.evaluation import evaluate
from neurallm.models import build_model
from neurallm import runfolder, weights
from neurallm.training import checkpoint as ckpt
from neurallm.training.throughput import mfu, peak_for_name, transformer_flops_per_token

from tests.conftest import write_patterned_corpus

REPO = Path(__file__).resolve().parents[2]
# A tiny LSTM with dropout (so per-rank dropout masks and RNG states matter) on a tiny corpus.
DDP_FLAGS = ["--emsize", "16", "--nhid", "16", "--nlayers", "1", "--dropout", "0.1", "--batch-size", "4", "--bptt", "8",
             "--lr", "2", "--eval-batch-size", "2", "--seed", "7", "--no-progress", "--log-interval", "1000"]


def torchrun(*args: str, cwd: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node N -m neurallm …`` with this checkout's source first."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "neurallm", *args]
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_patterned_corpus(tmp_path_factory.mktemp("ddp") / "corpus", lines=200)


@pytest.fixture(scope="module")
def two_process_run(corpus) -> tuple[Path, subprocess.CompletedProcess, subprocess.CompletedProcess]:
    """A 2-process run stopped by --max-time after its first step (on any machine), then resumed under torchrun to 2 epochs."""
    root = corpus.parent
    first = torchrun("train", "--data", str(corpus), "--out", "run", "--epochs", "2", "--max-time", "1e-9", *DDP_FLAGS, cwd=root)
    resumed = torchrun("train", "--out", "run", "--resume", "--epochs", "2", "--max-time", "1000", cwd=root)
    return root / "run", first, resumed


@pytest.mark.integration
def test_torchrun_trains_resumes_and_evaluates_as_one_process_does(two_process_run):
    run, first, resumed = two_process_run
    # one run directory, written by rank 0 only, and one copy of each line (only rank 0 prints)
    assert sorted(p.name for p in run.parent.iterdir() if p.is_dir() and p.name != "corpus") == ["run"]
    assert {"config.json", "vocab.json", "model.safetensors", "last.safetensors", "metrics.jsonl", "results.json"} <= {p.name for p in run.iterdir()}
    assert first.stdout.count("2 processes (DistributedDataParallel)") == 1
    assert "stopped by --max-time" in first.stdout
    assert resumed.stdout.count("resuming") == 1 and resumed.stdout.count("end of training") == 1
    results = json.loads((run / "results.json").read_text())
    assert results["stopped_by"] == "epochs" and results["epochs_completed"] == 2
    # every rank's carried state and RNG states are in the checkpoint
    tensors, state = ckpt.load_last(run / "last.safetensors")
    assert state.info["world_size"] == 2 and len(state.info["rank_rng"]) == 1
    assert "rng.torch" in tensors and "rank1.rng.torch" in tensors
    assert not torch.equal(tensors["rng.torch"], tensors["rank1.rng.torch"]), "ranks must draw different dropout masks"
    # the sharded exact evaluation equals one process's evaluation of the same weights
    loaded = neurallm.load_run(run, device="cpu")
    single = evaluate(loaded.model, loaded.eval_data().ids("test"), batch_size=2, bptt=8)
    assert results["test"]["tokens"] == single.tokens
    assert results["test"]["loss"] == pytest.approx(single.loss, rel=1e-6)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["epoch"] == 2 and records[-1]["complete"]
    assert all("mfu" in r for r in records)


@pytest.mark.integration
def test_resuming_with_another_number_of_processes_is_refused_with_one_line(two_process_run, tmp_path):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(two_process_run[0], run)
    before = (run / "last.safetensors").read_bytes()
    with pytest.raises(TrainingError, match=r"trained by 2 process\(es\).*torchrun --nproc_per_node 2"):
        neurallm.train(None, run, resume=True, epochs=3, progress=False)
    assert (run / "last.safetensors").read_bytes() == before


@pytest.mark.slow
@pytest.mark.integration
def test_a_resumed_torchrun_run_ends_with_exactly_the_weights_of_an_uninterrupted_one(two_process_run, corpus):
    run, _, _ = two_process_run
    torchrun("train", "--data", str(corpus), "--out", "straight", "--epochs", "2", *DDP_FLAGS, cwd=corpus.parent)
    straight, resumed = load_file(str(corpus.parent / "straight" / "last.safetensors")), load_file(str(run / "last.safetensors"))
    for name, tensor in straight.items():
        if name.startswith(("model.", "optim.")):
            assert torch.equal(tensor, resumed[name]), name


# --- the pieces, one process --------------------------------------------------------------------------------------

def test_ranks_share_columns_contiguously_and_cover_them_once():
    shares = [Ranks(rank, 3).share(10) for rank in range(3)]
    assert [(s.start, s.stop) for s in shares] == [(0, 4), (4, 7), (7, 10)]


def test_shuffled_windows_are_split_between_ranks_without_overlap():
    ids = np.arange(1000, dtype=np.uint16)
    whole = ShuffledWindows(ids, bptt=6, batch_size=8, seed=3)
    parts = [ShuffledWindows(ids, bptt=6, batch_size=8, seed=3, rank=r, world_size=2) for r in range(2)]
    assert len(parts[0]) == len(parts[1])
    for batch, (a, b) in zip(whole.epoch(0), zip(*(p.epoch(0) for p in parts))):
        assert torch.equal(torch.cat((a[0], b[0]), dim=1), batch[0])


def test_a_batch_size_that_does_not_split_over_the_processes_is_refused():
    from neurallm.data.training_batches import local_batch_size as _local_batch_size

    assert _local_batch_size(8, Ranks(0, 2)) == 4
    with pytest.raises(TrainingError, match="--batch-size 5 does not split evenly over 2 processes"):
        _local_batch_size(5, Ranks(1, 2))


def test_lower_right_causal_mask_gives_the_dense_mask_outputs():
    """The memory case of attention: queries at positions m..m+T-1 over m+T keys."""
    from torch.nn.attention.bias import causal_lower_right

    torch.manual_seed(0)
    T, m = 5, 7
    q, k, v = torch.randn(2, 3, T, 8), torch.randn(2, 3, m + T, 8), torch.randn(2, 3, m + T, 8)
    dense = torch.ones(T, m + T, dtype=torch.bool).tril(diagonal=m)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    actual = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(T, m + T))
    torch.testing.assert_close(actual, expected)


def test_transformer_with_memory_gives_the_same_outputs_as_with_a_dense_boolean_mask(monkeypatch):
    import torch.nn.attention.bias as attention_bias

    torch.manual_seed(0)
    model = build_model(ModelConfig(model="Transformer", vocab_size=30, emsize=16, nhid=32, nlayers=2, nhead=2,
                                    dropout=0.0, memory=4)).eval()
    ids = torch.randint(0, 30, (6, 3))

    def two_windows():
        first, state = model.features(ids, model.init_state(3))
        second, _ = model.features(ids, state)  # attends to 4 memory positions + the 6 of the window
        return second

    with torch.no_grad():
        lower_right = two_windows()
        monkeypatch.setattr(attention_bias, "causal_lower_right",
                            lambda T, S: torch.ones(T, S, dtype=torch.bool).tril(diagonal=S - T))
        dense = two_windows()
    torch.testing.assert_close(lower_right, dense)


def test_checkpoints_of_a_compiled_or_ddp_wrapped_model_have_plain_names_and_load_without_them(tmp_path):
    model = build_model(ModelConfig(vocab_size=20, emsize=8, nhid=8, nlayers=1))
    compiled = torch.compile(model)  # compiled lazily: saving it compiles nothing
    assert all(name.startswith("_orig_mod.") for name in compiled.state_dict())
    (tmp_path / runfolder.CONFIG_FILE).write_text("{}")  # weights are written into a run folder only
    ckpt.save_weights(tmp_path / "w.safetensors", compiled, {})
    saved = load_file(str(tmp_path / "w.safetensors"))
    assert not any("_orig_mod" in name or name.startswith("module.") for name in saved)
    fresh = build_model(ModelConfig(vocab_size=20, emsize=8, nhid=8, nlayers=1))
    weights.load_model_tensors(fresh, saved, tmp_path / "w.safetensors")
    for name, tensor in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], tensor)
    # a file written with the wrappers' prefixes (by another tool) loads too
    prefixed = {f"_orig_mod.module.{k}": v for k, v in saved.items()}
    weights.load_model_tensors(build_model(ModelConfig(vocab_size=20, emsize=8, nhid=8, nlayers=1)), prefixed, tmp_path / "p")


def test_a_run_trained_with_device_cuda_resumes_and_evaluates_on_a_cpu(trained_run, tmp_path):
    """What a CUDA-trained run holds that a CPU run does not: `"device": "cuda"` in its config and the GPUs' RNG
    states in its checkpoint. A CPU machine ignores the states, and `--resume --device cpu` moves the run."""
    import shutil

    from safetensors.torch import save_file

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    tensors, metadata = weights.read_safetensors(run / "last.safetensors")
    tensors["rng.cuda.0"] = torch.zeros(16, dtype=torch.uint8)  # as torch.cuda.get_rng_state() would add
    save_file(tensors, str(run / "last.safetensors"), metadata=metadata)
    config = json.loads((run / "config.json").read_text())
    config["train"]["device"] = "cuda"
    (run / "config.json").write_text(json.dumps(config))
    loaded = neurallm.load_run(run, checkpoint="last", device="cpu")
    assert all(p.device.type == "cpu" for p in loaded.model.parameters())
    assert loaded.evaluate(split="test").tokens > 0
    assert loaded.generate("the", tokens=5, seed=1).generated_tokens
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="--device cuda: no CUDA GPU"):
            neurallm.train(None, run, resume=True, epochs=3, progress=False)
    result = neurallm.train(None, run, resume=True, epochs=3, device="cpu", progress=False)
    assert result.epochs_completed == 3
    assert json.loads((run / "config.json").read_text())["train"]["device"] == "cpu"


def test_amp_bf16_trains_on_the_cpu_with_float32_losses(tmp_path, monkeypatch):
    from neurallm import runtime

    monkeypatch.setattr(runtime, "bf16_supported", lambda device: True)  # a CPU without bfloat16 hardware refuses it
    corpus = write_patterned_corpus(tmp_path / "c", lines=60)
    result = neurallm.train(corpus, tmp_path / "run", amp="bf16", emsize=16, nhid=16, nlayers=1, batch_size=4, bptt=8,
                            epochs=1, lr=2.0, eval_batch_size=2, progress=False)
    assert np.isfinite(result.test.loss)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["amp"] == "bf16"


def test_training_step_under_autocast_keeps_the_loss_in_float32():
    from neurallm.training.step import training_step

    torch.manual_seed(0)
    model = build_model(ModelConfig(model="Transformer", vocab_size=30, emsize=16, nhid=32, nlayers=1, nhead=2, dropout=0.0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ids = torch.randint(0, 30, (9, 2))
    outcome = training_step(model, optimizer, ids[:-1], ids[1:], model.init_state(2), clip=0.25, amp_dtype=torch.bfloat16)
    assert outcome.nll.dtype == torch.float32 and bool(outcome.finite)


def test_a_memory_transformer_trains_under_autocast_once_it_carries_memory():
    """The second window attends to the first's memory through a lower-right causal mask, which autocast does
    not cast for: queries, keys and values must reach it in one dtype."""
    from neurallm.training.step import training_step

    torch.manual_seed(0)
    model = build_model(ModelConfig(model="Transformer", vocab_size=30, emsize=16, nhid=32, nlayers=2, nhead=2, memory=4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ids = torch.randint(0, 30, (17, 2))
    state = model.init_state(2)
    for window in (ids[:9], ids[8:]):
        outcome = training_step(model, optimizer, window[:-1], window[1:], state, clip=0.25, amp_dtype=torch.bfloat16)
        state = outcome.state
        assert bool(outcome.finite)
    assert state[0].shape == (2, 4, 16)


def test_mfu_uses_the_devices_own_peak_and_says_unknown_otherwise():
    assert peak_for_name("NVIDIA H100 80GB HBM3") == pytest.approx(989.4e12)
    assert peak_for_name("NVIDIA H100 PCIe") == pytest.approx(756.5e12)
    assert peak_for_name("NVIDIA H200") == pytest.approx(989.4e12)
    assert peak_for_name("NVIDIA A100-SXM4-80GB") == pytest.approx(312e12)
    assert peak_for_name("NVIDIA L4") == pytest.approx(121e12) and peak_for_name("NVIDIA L40S") == pytest.approx(362.1e12)
    assert peak_for_name("Tesla V100-SXM2-16GB") is None
    config = ModelConfig(model="Transformer", vocab_size=50304, emsize=768, nhid=3072, nlayers=12, nhead=12, tied=True)
    n_params = sum(p.numel() for p in build_model(config).parameters())
    per_token = transformer_flops_per_token(config, 1024, n_params)
    # nanoGPT's figure for GPT-2 small at 1024 tokens: 6N + 12·L·C·T with N ≈ 124M
    assert per_token == pytest.approx(6 * n_params + 12 * 12 * 768 * 1024)
    assert mfu(100_000, per_token, 989.4e12) == pytest.approx(100_000 * per_token / 989.4e12)
    assert mfu(100_000, per_token, None) is None and mfu(100_000, None, 989.4e12) is None


@pytest.mark.parametrize("windows", ["contiguous", "shuffled"])
def test_under_compile_an_odd_shaped_window_runs_uncompiled_rather_than_compiling_again(tmp_path, monkeypatch, windows):
    """An epoch's last window is shorter (or its last batch of shuffled windows smaller): compiling a graph for that
    one step would stall the run, so it runs eagerly and only the usual shape is ever compiled."""
    compiled_shapes = []

    def recording_backend(graph_module, example_inputs):
        compiled_shapes.extend(tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor) and t.dtype == torch.int64)
        return graph_module.forward

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model: real_compile(model, backend=recording_backend))
    corpus = write_patterned_corpus(tmp_path / "c", lines=60)
    # 734 training tokens: 4 columns of 183 rows, whose last window of 8 has 6 rows; or 91 windows, the last batch 3
    result = neurallm.train(corpus, tmp_path / "run", compile=True, emsize=16, nhid=16, nlayers=1, batch_size=4, bptt=8,
                            epochs=1, lr=2.0, eval_batch_size=2, progress=False, shuffle_windows=windows == "shuffled")
    assert result.epochs_completed == 1 and np.isfinite(result.test.loss)
    # the ids and targets of the usual window only, (8, 4) or flattened after a graph break
    assert {(8, 4)} <= set(compiled_shapes) <= {(8, 4), (32,)}


@pytest.mark.slow
def test_a_compiled_run_trains_and_loads_without_compile(tmp_path):
    """torch.compile on the CPU (inductor + gcc): minutes on a small machine, hence slow."""
    corpus = write_patterned_corpus(tmp_path / "c", lines=60)
    neurallm.train(corpus, tmp_path / "run", compile=True, emsize=16, nhid=16, nlayers=1, batch_size=4, bptt=8,
                   epochs=1, lr=2.0, eval_batch_size=2, progress=False)
    for name in ("model.safetensors", "last.safetensors"):
        assert not any("_orig_mod" in key for key in load_file(str(tmp_path / "run" / name)))
    assert neurallm.load_run(tmp_path / "run", device="cpu").evaluate(split="test").tokens > 0


@pytest.mark.integration
def test_sigterm_stops_training_cleanly_and_a_second_one_does_not_abort():
    """torchrun turns a Ctrl-C into SIGTERM for its workers: that must be a clean stop, never an abort."""
    import signal
    import time

    from neurallm.training.stopping import StopRequest as _StopRequest

    with _StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert stop.requested
        os.kill(os.getpid(), signal.SIGTERM)  # raises KeyboardInterrupt if a repeated SIGTERM aborted
        time.sleep(0.05)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL

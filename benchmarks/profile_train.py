"""Where a training step's time goes: torch.profiler over steps of the PyTorch example's default LSTM (or a preset's
model and optimizer).

Usage: ``python benchmarks/profile_train.py --data ../shared/data/wt2-lite [--preset cpu-fast] [--steps 30] [--rows 25]
[--amp bf16] [--device cuda] [--shapes]``. Prints the operators sorted by total CPU time (self time excluded from parents), after a few
warm-up steps; on a GPU also the table sorted by GPU time, and the step's time with the host's share of it (a
step whose host time is most of its wall time waits on Python and kernel launches, not on the GPU).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from neurallm.api import prepare
from neurallm.config import ModelConfig, TrainConfig
from neurallm.data.batching import ContiguousBatches, batchify
from neurallm.models import build_model
from neurallm.presets import PRESETS, with_preset
from neurallm.run_config import TRAIN_SETTINGS
from neurallm.runtime import amp_dtype_for, cuda_matmul_precision, keep_freed_memory, pick_device, precision_name
from neurallm.settings import split_settings
from neurallm.training.optim import build_optimizer
from neurallm.training.step import training_step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--preset", choices=list(PRESETS), help="profile this preset's model, batch and optimizer "
                   "(default: the PyTorch example's)")
    p.add_argument("--amp", choices=["none", "bf16", "auto"], help="as neurallm train --amp (default: the preset's, "
                   "or none for the example)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to train (default: cpu)")
    p.add_argument("--shapes", action="store_true", help="one row per operator and input shapes (which conversions)")
    args = p.parse_args()
    device = pick_device(args.device)
    on_gpu = device.type == "cuda"
    amp = args.amp or (None if args.preset else "none")  # the example's own figures are float32
    settings = with_preset(args.preset, {} if amp is None else {"amp": amp})
    *data_settings, model_settings, train_settings = split_settings(settings, *TRAIN_SETTINGS, what="profile_train")
    train = TrainConfig(**train_settings)
    amp_dtype = amp_dtype_for(train.amp, device)
    keep_freed_memory()
    prepared = prepare(args.data, **{name: value for part in data_settings for name, value in part.items()})
    torch.manual_seed(1111)
    model = build_model(ModelConfig(**model_settings, vocab_size=len(prepared.vocab))).to(device).train()
    print(f"{args.preset or 'the PyTorch example'}: {type(model).__name__}, batch {train.batch_size}, bptt {train.bptt}, "
          f"{train.optimizer}, products in {precision_name(amp_dtype)}")
    optimizer = build_optimizer(model, train)
    batches = iter(ContiguousBatches(batchify(prepared.ids("train"), train.batch_size), train.bptt, device).epoch(0))
    state = model.init_state(train.batch_size, device)

    def step() -> None:
        nonlocal state
        inputs, targets = next(batches)
        with cuda_matmul_precision(device, tf32=True):  # as the trainer's steps run
            state = training_step(model, optimizer, inputs, targets, state, clip=train.clip, amp_dtype=amp_dtype,
                                  skip_nonfinite=not on_gpu).state

    def wait() -> None:
        if on_gpu:
            torch.cuda.synchronize(device)

    for _ in range(args.warmup):
        step()
    wait()
    started, host_started = time.perf_counter(), time.process_time()
    for _ in range(args.steps):
        step()
    host = time.process_time() - host_started
    wait()
    wall = time.perf_counter() - started
    print(f"{1000 * wall / args.steps:.2f} ms/step without the profiler"
          + (f"; the host's CPU time to queue a step: {1000 * host / args.steps:.2f} ms" if on_gpu else ""))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities, record_shapes=args.shapes) as prof:
        for _ in range(args.steps):
            step()
        wait()
    print(prof.key_averages(group_by_input_shape=args.shapes).table(sort_by="self_cpu_time_total", row_limit=args.rows))
    if on_gpu:
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()

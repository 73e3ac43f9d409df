"""Where a training step's time goes: torch.profiler over steps of the PyTorch example's default LSTM.

Usage: ``python benchmarks/profile_train.py --data ../shared/data/wt2-lite [--steps 30] [--rows 25] [--amp bf16]``.
Prints the operators sorted by total CPU time (self time excluded from parents), after a few warm-up steps.
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
from neurallm.runtime import keep_freed_memory
from neurallm.training.optim import build_optimizer
from neurallm.training.step import training_step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--amp", choices=["none", "bf16"], default="none", help="as neurallm train --amp")
    args = p.parse_args()
    amp_dtype = torch.bfloat16 if args.amp == "bf16" else None
    keep_freed_memory()
    prepared = prepare(args.data)
    torch.manual_seed(1111)
    model = build_model(ModelConfig(vocab_size=len(prepared.vocab))).train()
    train = TrainConfig()
    optimizer = build_optimizer(model, train)
    batches = iter(ContiguousBatches(batchify(prepared.ids("train"), train.batch_size), train.bptt).epoch(0))
    state = model.init_state(train.batch_size)

    def step() -> None:
        nonlocal state
        inputs, targets = next(batches)
        state = training_step(model, optimizer, inputs, targets, state, clip=train.clip, amp_dtype=amp_dtype).state

    for _ in range(args.warmup):
        step()
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    print(f"{1000 * (time.perf_counter() - started) / args.steps:.1f} ms/step without the profiler")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()

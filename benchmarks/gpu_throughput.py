"""Training throughput (tokens/s) and, for the Transformer, MFU: the PyTorch example's LSTMs and a GPT-2-small shape.

On a GPU (bf16 autocast, fused AdamW, TF32, as ``neurallm train --device cuda --amp bf16`` runs)::

    python benchmarks/gpu_throughput.py --device cuda                 # with and without torch.compile
    python benchmarks/gpu_throughput.py --device cuda --compile off   # eager only

Anywhere (tiny shapes, to check that the script and the training path run)::

    python benchmarks/gpu_throughput.py --tiny --device cpu --compile off

Models (a synthetic stream of uniformly random ids: throughput does not depend on the text):

* ``lstm-2x200``: the example's default, emsize/nhid 200, 2 layers, batch 20, bptt 35, vocabulary 33,278 (WikiText-2);
* ``lstm-2x650``: the example's medium model, 650 units, dropout 0.5, same batch and vocabulary;
* ``gpt2-small``: Transformer 12 layers × 768, 12 heads, feed-forward 3072, bptt 1024, vocabulary 50,304,
  tied embeddings, batch 8 (AdamW). MFU = model FLOP/s ÷ the device's dense bf16 peak (see
  :mod:`neurallm.training.throughput`; "unknown" for a device not in its table, such as any CPU).

Each line is the tokens/s of ``--steps`` timed steps queued back to back, as ``neurallm train`` runs them (the
host reads the loss back once, at the end), after ``--warmup`` untimed ones (compilation happens in the warm-up).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, replace

import torch

from neurallm.config import ModelConfig, TrainConfig
from neurallm.models import build_model, count_parameters
from neurallm.runtime import cuda_matmul_precision, pick_device
from neurallm.training.optim import build_optimizer
from neurallm.training.step import compile_for_training, training_step
from neurallm.training.throughput import bf16_peak_flops, mfu, model_flops_per_token


@dataclass(frozen=True)
class Shape:
    name: str
    model: ModelConfig
    batch_size: int
    bptt: int
    optimizer: str
    lr: float


def shapes(tiny: bool) -> list[Shape]:
    if tiny:
        return [
            Shape("lstm-2x200 (tiny: 2x32)", ModelConfig(vocab_size=1000, emsize=32, nhid=32), 4, 16, "sgd", 20.0),
            Shape("lstm-2x650 (tiny: 2x64)", ModelConfig(vocab_size=1000, emsize=64, nhid=64, dropout=0.5), 4, 16, "sgd", 20.0),
            Shape("gpt2-small (tiny: 2x64)", ModelConfig(model="Transformer", vocab_size=1000, emsize=64, nhid=256, nlayers=2,
                                                         nhead=2, dropout=0.0, tied=True), 2, 64, "adamw", 6e-4),
        ]
    return [
        Shape("lstm-2x200", ModelConfig(vocab_size=33278, emsize=200, nhid=200, dropout=0.2), 20, 35, "sgd", 20.0),
        Shape("lstm-2x650", ModelConfig(vocab_size=33278, emsize=650, nhid=650, dropout=0.5), 20, 35, "sgd", 20.0),
        Shape("gpt2-small", ModelConfig(model="Transformer", vocab_size=50304, emsize=768, nhid=3072, nlayers=12, nhead=12,
                                        dropout=0.0, tied=True), 8, 1024, "adamw", 6e-4),
    ]


def measure(shape: Shape, device: torch.device, *, amp: bool, compile_model: bool, steps: int, warmup: int) -> dict:
    torch.manual_seed(0)
    model = build_model(shape.model).to(device).train()
    train = TrainConfig(optimizer=shape.optimizer, lr=shape.lr, batch_size=shape.batch_size, bptt=shape.bptt)
    optimizer = build_optimizer(model, train)
    step_model = compile_for_training(model) if compile_model else model  # as neurallm train --compile does
    ids = torch.randint(0, shape.model.vocab_size, (shape.bptt + 1, shape.batch_size), device=device)
    state = model.init_state(shape.batch_size, device)
    amp_dtype = torch.bfloat16 if amp else None
    started = None
    for i in range(warmup + steps):
        if i == warmup:
            if warmup:
                float(outcome.nll)  # the warm-up (and compilation) done
            started = time.perf_counter()
        outcome = training_step(step_model, optimizer, ids[:-1], ids[1:], state, clip=0.25, skip_nonfinite=False,
                                amp_dtype=amp_dtype)
        state = outcome.state
    float(outcome.nll)  # wait for the last step to finish
    tokens_per_s = steps * shape.batch_size * shape.bptt / (time.perf_counter() - started)
    n_params = count_parameters(model)
    utilisation = mfu(tokens_per_s, model_flops_per_token(shape.model, shape.bptt, n_params), bf16_peak_flops(device))
    return {"model": shape.name, "compile": compile_model, "tokens_per_s": tokens_per_s, "mfu": utilisation,
            "params": n_params}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to train (default: auto)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes that run in seconds on a CPU")
    parser.add_argument("--compile", choices=["both", "on", "off"], default="both", help="torch.compile (default: both)")
    parser.add_argument("--amp", choices=["bf16", "none"], default=None, help="autocast (default: bf16 on CUDA, none elsewhere)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per model (default: 20)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (default: 5)")
    parser.add_argument("--only", help="run only the models whose name contains this (default: all)")
    parser.add_argument("--batch-size", type=int, help="columns per step for every model run (default: each model's own)")
    args = parser.parse_args()
    device = pick_device(args.device)
    amp = (args.amp or ("bf16" if device.type == "cuda" else "none")) == "bf16"
    compile_modes = {"both": [False, True], "on": [True], "off": [False]}[args.compile]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    peak = bf16_peak_flops(device)
    print(f"device: {name} (bf16 peak {'unknown' if peak is None else f'{peak / 1e12:.1f} TFLOP/s'}), amp: {'bf16' if amp else 'none'}, "
          f"torch {torch.__version__}")
    print(f"{'model':26} {'compile':>7} {'params':>12} {'tokens/s':>12} {'MFU':>7}")
    for shape in shapes(args.tiny):
        if args.only and args.only not in shape.name:
            continue
        if args.batch_size:
            shape = replace(shape, name=f"{shape.name} b{args.batch_size}", batch_size=args.batch_size)
        for compile_model in compile_modes:
            with cuda_matmul_precision(device, tf32=True):  # as neurallm train's steps run
                row = measure(shape, device, amp=amp, compile_model=compile_model, steps=args.steps, warmup=args.warmup)
            utilisation = "—" if row["mfu"] is None else f"{row['mfu']:.1%}"
            if row["mfu"] is None and shape.model.model == "Transformer":
                utilisation = "unknown"
            print(f"{row['model']:26} {'yes' if compile_model else 'no':>7} {row['params']:>12,} {row['tokens_per_s']:>12,.0f} {utilisation:>7}",
                  flush=True)


if __name__ == "__main__":
    main()

"""Training speed and peak memory: neurallm against the PyTorch example (benchmarks/baseline.py), alternated.

Same model and data as the example's defaults: LSTM 2×200, emsize 200, batch 20, bptt 35, dropout 0.2, SGD lr 20,
clip 0.25. Each measurement is a fresh process (peak RSS is that process's own); the two programs alternate so
that a noisy machine slows both alike. Ratios are neurallm / baseline.

Usage::

    python benchmarks/train_speed.py --data ../shared/data/wt2-lite --repeats 2            # one full epoch each
    python benchmarks/train_speed.py --data ../shared/data/wt2-lite --repeats 3 --batches 60  # the first 60 windows
    python benchmarks/train_speed.py --data ../shared/data/wt2-lite --repeats 2 --amp bf16    # neurallm --amp bf16

With ``--batches`` both programs run the same first windows in a bare loop (neurallm's loop is its
``training_step`` over ``ContiguousBatches``, the trainer's per-window work); without it neurallm runs
``neurallm train --epochs 1`` (tokens/s from metrics.jsonl, validation perplexity included) and the baseline its
own epoch.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run_child(command: list[str], env: dict | None = None) -> tuple[str, float]:
    """Run ``command``; its stdout and its own peak RSS in MB (from wait4, so only that process counts)."""
    with tempfile.TemporaryFile() as out:
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.DEVNULL, env=env)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read().decode()
    if child.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed with exit code {child.returncode}")
    return text, usage.ru_maxrss / 1024


def threads_env(threads: int | None) -> dict | None:
    """The environment of a child limited to ``threads`` threads (None: torch's choice)."""
    return None if threads is None else {**os.environ, "OMP_NUM_THREADS": str(threads)}


def neurallm_epoch(data: str, amp: str, threads: int | None) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        run = Path(folder) / "run"
        command = [sys.executable, "-m", "neurallm", "train", "--data", data, "--out", str(run), "--epochs", "1", "--no-progress",
                   "--amp", amp]
        started = time.perf_counter()
        _, rss = run_child(command, threads_env(threads))
        record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
        return {"tokens_per_s": record["tokens_per_s"], "valid_ppl": record["valid_ppl"], "peak_rss_mb": rss,
                "wall_s": round(time.perf_counter() - started, 1)}


def baseline_epoch(data: str, threads: int | None) -> dict:
    text, rss = run_child([sys.executable, str(HERE / "baseline.py"), "--data", data], threads_env(threads))
    result = json.loads(text.splitlines()[-1])
    return {"tokens_per_s": result["train_tokens_per_s"], "valid_ppl": result["valid_ppl"], "peak_rss_mb": rss}


def windows(program: str, data: str, batches: int, threads: int | None, amp: str) -> dict:
    command = [sys.executable, __file__, "--data", data, "--child", program, "--batches", str(batches), "--amp", amp]
    text, rss = run_child(command + (["--threads", str(threads)] if threads else []))
    return {**json.loads(text.splitlines()[-1]), "peak_rss_mb": rss}


def child(program: str, data: str, batches: int, threads: int | None, amp: str) -> None:
    """The bare loop over the first ``batches`` windows (run in its own process)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    if program == "neurallm":
        from neurallm.api import prepare
        from neurallm.config import ModelConfig, TrainConfig
        from neurallm.data.batching import ContiguousBatches, batchify
        from neurallm.models import build_model
        from neurallm.runtime import amp_dtype_for, keep_freed_memory
        from neurallm.training.optim import build_optimizer
        from neurallm.training.step import training_step

        keep_freed_memory()  # what the CLI applies
        prepared = prepare(data)
        train = TrainConfig()
        torch.manual_seed(train.seed)
        model = build_model(ModelConfig(vocab_size=len(prepared.vocab))).train()
        optimizer = build_optimizer(model, train)
        state = model.init_state(train.batch_size)
        stream = ContiguousBatches(batchify(prepared.ids("train"), train.batch_size), train.bptt)
        amp_dtype = amp_dtype_for(amp, torch.device("cpu"))
        started, cpu_started, tokens = time.perf_counter(), time.process_time(), 0
        for inputs, targets in list(stream.epoch(0))[:batches]:
            state = training_step(model, optimizer, inputs, targets, state, clip=train.clip, amp_dtype=amp_dtype).state
            tokens += inputs.numel()
    else:
        sys.path.insert(0, str(HERE))
        import baseline

        torch.manual_seed(1111)
        corpus = baseline.Corpus(data)
        train_data = baseline.batchify(corpus.train, 20)
        model = baseline.RNNModel(len(corpus.word2idx), 200, 200, 2, 0.2).train()
        criterion = torch.nn.NLLLoss()
        hidden = model.init_hidden(20)
        started, cpu_started, tokens = time.perf_counter(), time.process_time(), 0
        for i in list(range(0, train_data.size(0) - 1, 35))[:batches]:
            inputs, targets = baseline.get_batch(train_data, i, 35)
            hidden = baseline.repackage_hidden(hidden)
            model.zero_grad()
            output, hidden = model(inputs, hidden)
            loss = criterion(output, targets)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
            for param in model.parameters():
                param.data.add_(param.grad, alpha=-20)
            loss.item()
            tokens += inputs.numel()
    print(json.dumps({"tokens_per_s": round(tokens / (time.perf_counter() - started), 1),
                      "tokens_per_cpu_s": round(tokens / (time.process_time() - cpu_started), 1)}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--batches", type=int, help="time only the first N windows (a bare loop) instead of an epoch")
    p.add_argument("--threads", type=int, help="torch threads of both programs (default: torch's choice)")
    p.add_argument("--amp", choices=["none", "bf16", "auto"], default="none",
                   help="neurallm's --amp (bf16: bfloat16 matrix products, AMX/AVX-512 BF16 on a recent x86 CPU)")
    p.add_argument("--child", choices=["neurallm", "baseline"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, args.data, args.batches, args.threads, args.amp)
        return
    results: dict[str, list[dict]] = {"baseline": [], "neurallm": []}
    for repeat in range(args.repeats):
        for program in ("baseline", "neurallm") if repeat % 2 == 0 else ("neurallm", "baseline"):
            if args.batches:
                result = windows(program, args.data, args.batches, args.threads, args.amp)
            else:
                result = (neurallm_epoch(args.data, args.amp, args.threads) if program == "neurallm"
                          else baseline_epoch(args.data, args.threads))
            results[program].append(result)
            print(f"{program:9} run {repeat + 1}: " + ", ".join(f"{k} {v:,.2f}" for k, v in result.items()), flush=True)
    summary = {}
    for key in ("tokens_per_s", "tokens_per_cpu_s", "peak_rss_mb") if args.batches else ("tokens_per_s", "peak_rss_mb", "valid_ppl"):
        ours, theirs = (statistics.median(r[key] for r in results[p]) for p in ("neurallm", "baseline"))
        summary[key] = {"neurallm": ours, "baseline": theirs, "ratio": round(ours / theirs, 3)}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

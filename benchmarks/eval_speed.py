"""Exact evaluation speed by batch size, against the PyTorch example's evaluation (benchmarks/baseline.py).

The example's default LSTM (2×200, emsize 200) on the test split of ``--data``; weights are random unless
``--run`` names a trained run (speed does not depend on them; agreement is only meaningful for trained weights).
Both evaluations run in this process, alternated ``--repeats`` times, on the same number of threads.

Usage::

    python benchmarks/eval_speed.py --data ../shared/data/wt2-lite --batch-sizes 10,20,40,80 --repeats 2
    python benchmarks/eval_speed.py --run RUN --batch-sizes 1,10,20,40,80   # + agreement with the first size
    python benchmarks/eval_speed.py --run RUN --batch-sizes 1,40 --amp none,bf16  # + bfloat16 against float32

With several ``--amp`` precisions each row also gives ``gap_vs_float32``: the relative perplexity difference from
float32 evaluation at the same batch size (``none`` must be among them).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import baseline  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="corpus folder with train/valid/test.txt (random weights)")
    p.add_argument("--run", help="a trained run directory instead (its own data and weights)")
    p.add_argument("--batch-sizes", default="10,20,40,80")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--tokens", type=int, help="evaluate only the first N test tokens (both programs)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--amp", default="none", help="neurallm eval --amp precisions to time, comma-separated (none, bf16)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from neurallm.api import load_run, prepare
    from neurallm.config import ModelConfig
    from neurallm.evaluation import evaluate
    from neurallm.models import build_model
    from neurallm.runtime import amp_dtype_for, keep_freed_memory

    keep_freed_memory()
    torch.manual_seed(1111)
    if args.run:
        run = load_run(args.run, device="cpu")
        model, ids, bptt = run.model, run.eval_data(splits=("test",)).ids("test"), run.config.train.bptt
        data = run.config.source.data
    else:
        model, bptt, data = build_model(ModelConfig(vocab_size=len(prepare(args.data).vocab))).eval(), 35, args.data
        ids = prepare(args.data).ids("test")
    corpus = baseline.Corpus(data)
    reference_model = baseline.RNNModel(len(corpus.word2idx), 200, 200, 2, 0.2).eval()
    ids = ids[: args.tokens] if args.tokens else ids
    test_data = baseline.batchify(corpus.test[: args.tokens] if args.tokens else corpus.test, 10)
    criterion = torch.nn.NLLLoss()
    sizes = [int(x) for x in args.batch_sizes.split(",")]
    precisions = args.amp.split(",")
    amp_dtypes = {amp: amp_dtype_for(amp, torch.device("cpu")) for amp in precisions}
    speeds: dict[str, list[float]] = {"baseline": []}
    ppl: dict[tuple[str, int], float] = {}
    for repeat in range(args.repeats):
        started = time.perf_counter()
        baseline.evaluate(reference_model, criterion, test_data, 35, 10)
        speeds["baseline"].append((len(test_data) - 1) * 10 / (time.perf_counter() - started))
        for amp in precisions:
            for size in sizes:
                result = evaluate(model, ids, batch_size=size, bptt=bptt, amp_dtype=amp_dtypes[amp])
                speeds.setdefault(f"{amp} {size}", []).append(result.tokens / result.seconds)
                ppl[amp, size] = result.ppl
        print(f"repeat {repeat + 1}: " + ", ".join(f"{k} {v[-1]:,.0f} tok/s" for k, v in speeds.items()), flush=True)
    base = statistics.median(speeds["baseline"])
    rows = []
    for amp in precisions:
        for size in sizes:
            speed, here, first = statistics.median(speeds[f"{amp} {size}"]), ppl[amp, size], ppl[amp, sizes[0]]
            row = {"amp": amp, "batch_size": size, "tokens_per_s": round(speed), "vs_baseline": round(speed / base, 2),
                   "ppl": here, "gap_vs_first": abs(here - first) / first}
            if ("none", size) in ppl:
                row["gap_vs_float32"] = (here - ppl["none", size]) / ppl["none", size]
            rows.append(row)
    print(json.dumps({"baseline_tokens_per_s": round(base), "exact": rows}))


if __name__ == "__main__":
    main()

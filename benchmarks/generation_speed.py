"""Generation cost per token by cache length: a 4-layer, 256-wide Transformer generating 1,536 tokens.

With the key/value cache a token costs one token's projections plus one attention row over at most ``context``
positions, so the per-token cost should stay nearly flat from ``--context 32`` to ``--context 1024``. Contexts are
alternated ``--repeats`` times; wall-clock and CPU time per token are printed (CPU time is steadier on a shared
machine). Weights are random: speed does not depend on them.

Usage: ``python benchmarks/generation_speed.py [--contexts 32,1024] [--tokens 1536] [--repeats 2]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from neurallm.config import ModelConfig
from neurallm.data.tokenizers import EOS, UNK, TokenizerSettings
from neurallm.data.vocab import Vocab
from neurallm.generation import generate
from neurallm.models import build_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", default="32,1024")
    p.add_argument("--tokens", type=int, default=1536)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--vocab", type=int, default=13_778, help="vocabulary size (wt2-lite's by default)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    vocab = Vocab([UNK, EOS] + [f"w{i}" for i in range(args.vocab - 2)])
    torch.manual_seed(0)
    model = build_model(ModelConfig(model="Transformer", vocab_size=len(vocab), emsize=256, nhid=1024, nlayers=4,
                                    nhead=4, dropout=0.0)).eval()
    contexts = [int(c) for c in args.contexts.split(",")]
    wall: dict[int, list[float]] = {c: [] for c in contexts}
    cpu: dict[int, list[float]] = {c: [] for c in contexts}
    for repeat in range(args.repeats):
        for context in contexts if repeat % 2 == 0 else contexts[::-1]:
            w0, c0 = time.perf_counter(), time.process_time()
            generate(model, vocab, TokenizerSettings(), tokens=args.tokens, seed=repeat, context=context)
            wall[context].append(1000 * (time.perf_counter() - w0) / args.tokens)
            cpu[context].append(1000 * (time.process_time() - c0) / args.tokens)
            print(f"context {context:5}: {wall[context][-1]:.2f} ms/token wall, {cpu[context][-1]:.2f} ms/token CPU", flush=True)
    summary = {str(c): {"ms_per_token_wall": round(statistics.median(wall[c]), 3),
                        "ms_per_token_cpu": round(statistics.median(cpu[c]), 3)} for c in contexts}
    first, last = contexts[0], contexts[-1]
    summary["ratio_wall"] = round(statistics.median(wall[last]) / statistics.median(wall[first]), 3)
    summary["ratio_cpu"] = round(statistics.median(cpu[last]) / statistics.median(cpu[first]), 3)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

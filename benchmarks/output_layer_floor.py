"""The floor under evaluating a word model on this CPU: the output layer's logits product and softmax passes alone.

Exact evaluation cannot skip either: every scored token needs its full ``V``-wide logits and their log-sum-exp.
This prints microseconds per token for the logits product in float32 (with the bias copied in by ``addmm``, and
folded into the product as the output head does it) and in bfloat16 (float32 accumulation, as ``--amp bf16`` runs
it), for the log-sum-exp over float32 logits (PyTorch's separate elementwise passes, and the fused log-softmax
kernel the head uses), and for the softmax over bfloat16 logits (the ``--amp bf16`` route's one pass), at a few
slice sizes, so the figure a whole evaluation reaches (``benchmarks/eval_speed.py``)
can be read against it.

Usage::

    python benchmarks/output_layer_floor.py                      # the PyTorch example's LSTM on wt2-lite: D 200, V 13,777
    python benchmarks/output_layer_floor.py --dim 650 --vocab 33278 --rows 64,256
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def per_token_us(work, rows: int, repeats: int) -> float:
    work()  # warm-up: first-touch page faults and kernel selection
    started = time.perf_counter()
    for _ in range(repeats):
        work()
    return (time.perf_counter() - started) / repeats / rows * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=200, help="features per token (the LSTM's nhid)")
    p.add_argument("--vocab", type=int, default=13_777)
    p.add_argument("--rows", default="64,256,512,1024", help="tokens per output-layer slice")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    weight, bias = torch.randn(args.vocab, args.dim) * 0.05, torch.randn(args.vocab) * 0.1
    weight_bf16 = weight.bfloat16()
    weight_with_bias = torch.cat((weight, bias[:, None]), dim=1)  # the bias as one more column (chunked_softmax.py)
    rows_out = []
    for rows in (int(r) for r in args.rows.split(",")):
        features = torch.randn(rows, args.dim)
        features_with_ones = torch.cat((features, torch.ones(rows, 1)), dim=1)
        features_bf16 = features.bfloat16()
        logits = torch.empty(rows, args.vocab)
        flops = 2 * rows * args.dim * args.vocab
        addmm = per_token_us(lambda: torch.addmm(bias, features, weight.t(), out=logits), rows, args.repeats)
        folded = per_token_us(lambda: torch.mm(features_with_ones, weight_with_bias.t(), out=logits), rows, args.repeats)
        bf16 = per_token_us(lambda: torch.mm(features_bf16, weight_bf16.t()), rows, args.repeats)
        work = logits.clone()

        def separate_passes() -> None:  # log-sum-exp from PyTorch's elementwise ops: max, subtract, exp, sum
            work.copy_(logits)
            work.sub_(work.amax(dim=1, keepdim=True)).exp_().sum(dim=1)

        def fused_log_softmax() -> None:  # the fused kernel over its own input, as the output head runs it
            work.copy_(logits)
            torch.log_softmax(work, dim=1, out=work)

        logits_bf16 = logits.bfloat16()
        probs_bf16 = torch.empty_like(logits_bf16)

        def bf16_softmax() -> None:  # bfloat16 logits in, bfloat16 probabilities out (float32 inside the kernel)
            torch.ops.aten._softmax.out(logits_bf16, 1, False, out=probs_bf16)

        copy = per_token_us(lambda: work.copy_(logits), rows, args.repeats)
        rows_out.append({"rows": rows, "logits_addmm_us_per_token": round(addmm, 1),
                         "logits_bias_folded_us_per_token": round(folded, 1),
                         "logits_fp32_gflops": round(flops / (folded * rows * 1e-6) / 1e9),
                         "logits_bf16_us_per_token": round(bf16, 1),
                         "logits_bf16_gflops": round(flops / (bf16 * rows * 1e-6) / 1e9),
                         "separate_passes_us_per_token": round(per_token_us(separate_passes, rows, args.repeats) - copy, 1),
                         "fused_log_softmax_us_per_token": round(per_token_us(fused_log_softmax, rows, args.repeats) - copy, 1),
                         "bf16_softmax_us_per_token": round(per_token_us(bf16_softmax, rows, args.repeats), 1)})
        print(rows_out[-1], flush=True)
    print(json.dumps({"dim": args.dim, "vocab": args.vocab, "slices": rows_out}))


if __name__ == "__main__":
    main()

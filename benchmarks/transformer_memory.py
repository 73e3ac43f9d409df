"""Does the Transformer's memory (``--memory``) earn its place on real text at equal training time?

Trains each configuration for the same ``--max-time`` with ``neurallm train`` (one process at a time), then
prints one row per run: memory, bptt, learning rate, windows trained, tokens/s, and the test score of exact
evaluation (perplexity at word level, bits per character at char level). The runs share a corpus and every other
setting, so a row differs from the first only in what its label says.

Usage::

    python benchmarks/transformer_memory.py --corpus char --max-time 90
    python benchmarks/transformer_memory.py --corpus word --max-time 90
    python benchmarks/transformer_memory.py --corpus char --max-time 90 --only "memory 64"   # one row

``--shared`` is the folder holding ``data/`` (default: ``../shared`` beside the repository).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# (label, flags added to the corpus's common flags)
CONFIGURATIONS = [
    ("no memory", []),
    ("memory 64", ["--memory", "64"]),
    ("memory 128", ["--memory", "128"]),
    ("no memory, bptt 128", ["--bptt", "128"]),
]

CORPORA = {
    # the character-level setting: 3 layers x 128, bptt 64
    "char": dict(data="data/tinyshakespeare/input.txt", score="bpc",
                 flags=["--level", "char", "--model", "Transformer", "--emsize", "128", "--nhid", "512", "--nlayers", "3",
                        "--nhead", "4", "--dropout", "0.1", "--bptt", "64", "--batch-size", "32", "--optimizer", "adamw",
                        "--lr", "2e-3", "--epochs", "50"]),
    # word level: 2 layers x 128 on wt2-lite
    "word": dict(data="data/wt2-lite", score="ppl",
                 flags=["--model", "Transformer", "--emsize", "128", "--nhid", "512", "--nlayers", "2", "--nhead", "4",
                        "--dropout", "0.2", "--bptt", "64", "--batch-size", "20", "--optimizer", "adamw", "--lr", "2e-3",
                        "--epochs", "50", "--adaptive-softmax", "--cutoffs", "2000,6000"]),
}


def run(corpus: str, label: str, extra: list[str], max_time: float, shared: Path) -> dict:
    spec = CORPORA[corpus]
    flags = list(spec["flags"])
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "run"
        command = [sys.executable, "-m", "neurallm", "train", "--data", str(shared / spec["data"]), *flags, *extra,
                   "--max-time", str(max_time), "--out", str(out), "--no-progress"]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        results = json.loads((out / "results.json").read_text())
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    seconds = sum(r["seconds"] for r in records)
    tokens = sum(r["seconds"] * r["tokens_per_s"] for r in records)
    test = results["test"]
    return {"label": label, "tokens_per_s": round(tokens / seconds), "tokens_trained": round(tokens),
            "best_valid": min(r.get("valid_bpc" if spec["score"] == "bpc" else "valid_ppl") for r in records),
            "test": round(test["bpc"] if spec["score"] == "bpc" else test["ppl"], 3 if spec["score"] == "bpc" else 2),
            "score": spec["score"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", choices=sorted(CORPORA), required=True)
    p.add_argument("--max-time", type=float, default=90.0)
    p.add_argument("--only", action="append", help="run only the configuration with this label (repeatable)")
    p.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    args = p.parse_args()
    rows = []
    for label, extra in CONFIGURATIONS:
        if args.only and label not in args.only:
            continue
        row = run(args.corpus, label, extra, args.max_time, args.shared)
        rows.append(row)
        print(json.dumps(row), flush=True)
    score = rows[0]["score"]
    print(f"\n| {args.corpus}, {args.max_time:.0f} s each | tokens/s | tokens trained | best valid {score} | test {score} |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['label']} | {row['tokens_per_s']:,} | {row['tokens_trained']:,} | {row['best_valid']:.3f} | {row['test']} |")


if __name__ == "__main__":
    main()

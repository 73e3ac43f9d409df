"""Preparation speed and peak memory: ``neurallm prepare`` against the PyTorch example's ``Corpus`` loader.

The corpus is wt2-lite with its train split repeated (×100 gives 21.8M training tokens), built in a temp
folder and deleted afterwards. Each measurement runs in a fresh process, alternating the two loaders, and
reports wall time of the load (imports excluded, listed apart) and the process's peak RSS (imports included:
it is what the user's machine pays).

    python benchmarks/prepare_speed.py                    # 21.8M tokens, 2 alternated runs each
    python benchmarks/prepare_speed.py --runs 3
    python benchmarks/prepare_speed.py --repeat 460 --only neurallm   # ~100M tokens: bounded memory

The baseline re-implements the example's ``data.py`` from its documented behaviour (not copied): a
``Dictionary`` of word → index; ``Corpus(path)`` tokenizes train.txt, valid.txt and test.txt, each in two
passes: the first adds every word of every line, plus ``<eos>`` at the end of each line, to the dictionary;
the second turns each line into a tensor of int64 ids and concatenates them into one LongTensor per split.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "wt2-lite"

EXAMPLE_LOADER = r'''
import json, os, resource, sys, time
t0 = time.perf_counter()
import torch

class Dictionary:
    def __init__(self):
        self.word2idx, self.idx2word = {}, []

    def add_word(self, word):
        if word not in self.word2idx:
            self.idx2word.append(word)
            self.word2idx[word] = len(self.idx2word) - 1
        return self.word2idx[word]

class Corpus:
    def __init__(self, path):
        self.dictionary = Dictionary()
        self.train = self.tokenize(os.path.join(path, "train.txt"))
        self.valid = self.tokenize(os.path.join(path, "valid.txt"))
        self.test = self.tokenize(os.path.join(path, "test.txt"))

    def tokenize(self, path):
        with open(path, "r", encoding="utf8") as f:
            for line in f:
                for word in line.split() + ["<eos>"]:
                    self.dictionary.add_word(word)
        with open(path, "r", encoding="utf8") as f:
            idss = []
            for line in f:
                ids = [self.dictionary.word2idx[word] for word in line.split() + ["<eos>"]]
                idss.append(torch.tensor(ids).type(torch.int64))
            return torch.cat(idss)

t1 = time.perf_counter()
corpus = Corpus(sys.argv[1])
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "train_tokens": corpus.train.numel(),
       "vocab": len(corpus.dictionary.idx2word), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
'''

NEURALLM_PREPARE = r'''
import json, resource, sys, time
t0 = time.perf_counter()
from neurallm.data.prepare import prepare
t1 = time.perf_counter()
prepared = prepare(sys.argv[1], sys.argv[2])
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "train_tokens": prepared.meta["splits"]["train"]["tokens"],
       "vocab": len(prepared.vocab), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
       "torch_imported": "torch" in sys.modules}))
'''


def build_corpus(source: Path, folder: Path, repeat: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    train = (source / "train.txt").read_bytes()
    with open(folder / "train.txt", "wb") as f:
        for _ in range(repeat):
            f.write(train)
    for split in ("valid", "test"):
        shutil.copy(source / f"{split}.txt", folder / f"{split}.txt")


def measure(name: str, corpus: Path, work: Path) -> dict:
    if name == "example":
        argv = [sys.executable, "-c", EXAMPLE_LOADER, str(corpus)]
    else:
        out = Path(tempfile.mkdtemp(dir=work)) / "prepared"  # a fresh folder: no cache hit
        argv = [sys.executable, "-c", NEURALLM_PREPARE, str(corpus), str(out)]
    done = subprocess.run(argv, capture_output=True, text=True, check=True, cwd=work)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if name == "neurallm":
        shutil.rmtree(out.parent)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="a folder with train/valid/test.txt")
    parser.add_argument("--repeat", type=int, default=100, help="copies of the train split (default 100)")
    parser.add_argument("--runs", type=int, default=2, help="alternated runs of each loader (default 2)")
    parser.add_argument("--only", choices=["example", "neurallm"], help="measure one loader")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object")
    args = parser.parse_args()
    names = [args.only] if args.only else ["example", "neurallm"]
    results: dict[str, list[dict]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory(prefix="neurallm-prepare-bench-") as tmp:
        work = Path(tmp)
        corpus = work / "corpus"
        build_corpus(args.data, corpus, args.repeat)
        print(f"corpus: {args.data} with train ×{args.repeat} ({(corpus / 'train.txt').stat().st_size / 1e6:,.0f} MB train.txt)")
        for run in range(args.runs):
            for name in names if run % 2 == 0 else names[::-1]:
                r = measure(name, corpus, work)
                results[name].append(r)
                print(f"  run {run + 1} {name:9} load {r['load_s']:6.2f} s  (imports {r['import_s']:.2f} s)  "
                      f"peak RSS {r['peak_rss_mb']:7.0f} MB  train tokens {r['train_tokens']:,}  vocab {r['vocab']:,}")
    summary = {name: {"best_load_s": min(r["load_s"] for r in rs), "best_total_s": min(r["load_s"] + r["import_s"] for r in rs),
                      "peak_rss_mb": max(r["peak_rss_mb"] for r in rs)} for name, rs in results.items()}
    if len(names) == 2:
        e, n = summary["example"], summary["neurallm"]
        summary["ratios"] = {"load_time": n["best_load_s"] / e["best_load_s"],
                             "time_with_imports": n["best_total_s"] / e["best_total_s"],
                             "peak_rss": n["peak_rss_mb"] / e["peak_rss_mb"]}
        print(f"neurallm / example: load time {summary['ratios']['load_time']:.2f}x, with imports "
              f"{summary['ratios']['time_with_imports']:.2f}x, peak RSS {summary['ratios']['peak_rss']:.2f}x")
    if args.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()

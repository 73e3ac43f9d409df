"""The PyTorch word_language_model example, re-implemented from its documented behaviour, as the baseline.

What the example does (README and ``main.py``'s flags): read ``train.txt``, ``valid.txt``, ``test.txt``; split
each line on whitespace and add ``<eos>``; number words in order of first appearance; ``batchify`` each split
into ``--batch_size`` columns (the tail dropped); train an ``RNNModel`` (embedding → dropout → ``nn.LSTM`` →
dropout → linear decoder → ``log_softmax``) with ``NLLLoss`` on windows of ``--bptt`` rows, the hidden state
repackaged (detached) between windows, gradients clipped to ``--clip`` and a plain SGD update
``p -= lr * grad``; evaluate with batch size 10 the same way under ``no_grad``, the loss of each window
weighted by its length. Defaults used here are the example's: LSTM, emsize 200, nhid 200, 2 layers,
dropout 0.2, lr 20, clip 0.25, batch 20, bptt 35, seed 1111.

Usage: ``python benchmarks/baseline.py --data ../shared/data/wt2-lite [--epochs 1] [--eval-only-split test]``.
Prints one JSON line: training tokens/s, ms/batch, validation loss/ppl, evaluation tokens/s, peak RSS.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Corpus:
    """Word ids of the three splits, the vocabulary built in order of first appearance."""

    def __init__(self, folder: str) -> None:
        self.word2idx: dict[str, int] = {}
        self.train = self.tokenize(os.path.join(folder, "train.txt"))
        self.valid = self.tokenize(os.path.join(folder, "valid.txt"))
        self.test = self.tokenize(os.path.join(folder, "test.txt"))

    def tokenize(self, path: str) -> torch.Tensor:
        ids_per_line = []
        with open(path, encoding="utf8") as f:
            for line in f:
                words = line.split() + ["<eos>"]
                ids = []
                for word in words:
                    if word not in self.word2idx:
                        self.word2idx[word] = len(self.word2idx)
                    ids.append(self.word2idx[word])
                ids_per_line.append(torch.tensor(ids, dtype=torch.int64))
        return torch.cat(ids_per_line)


def batchify(data: torch.Tensor, batch_size: int) -> torch.Tensor:
    rows = data.size(0) // batch_size
    return data[: rows * batch_size].view(batch_size, -1).t().contiguous()


def get_batch(source: torch.Tensor, i: int, bptt: int) -> tuple[torch.Tensor, torch.Tensor]:
    seq_len = min(bptt, len(source) - 1 - i)
    return source[i : i + seq_len], source[i + 1 : i + 1 + seq_len].reshape(-1)


class RNNModel(nn.Module):
    def __init__(self, ntoken: int, ninp: int, nhid: int, nlayers: int, dropout: float) -> None:
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = nn.LSTM(ninp, nhid, nlayers, dropout=dropout)
        self.decoder = nn.Linear(nhid, ntoken)
        self.nlayers, self.nhid = nlayers, nhid
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)
        nn.init.uniform_(self.decoder.weight, -0.1, 0.1)

    def forward(self, input, hidden):
        emb = self.drop(self.encoder(input))
        output, hidden = self.rnn(emb, hidden)
        decoded = self.decoder(self.drop(output)).view(-1, self.decoder.out_features)
        return F.log_softmax(decoded, dim=1), hidden

    def init_hidden(self, batch_size: int):
        weight = next(self.parameters())
        return (weight.new_zeros(self.nlayers, batch_size, self.nhid), weight.new_zeros(self.nlayers, batch_size, self.nhid))


def repackage_hidden(h):
    return tuple(v.detach() for v in h)


def evaluate(model, criterion, source, bptt: int, eval_batch_size: int) -> float:
    model.eval()
    total = 0.0
    hidden = model.init_hidden(eval_batch_size)
    with torch.no_grad():
        for i in range(0, source.size(0) - 1, bptt):
            data, targets = get_batch(source, i, bptt)
            output, hidden = model(data, hidden)
            hidden = repackage_hidden(hidden)
            total += len(data) * criterion(output, targets).item()
    return total / (len(source) - 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--emsize", type=int, default=200)
    p.add_argument("--nhid", type=int, default=200)
    p.add_argument("--nlayers", type=int, default=2)
    p.add_argument("--lr", type=float, default=20)
    p.add_argument("--clip", type=float, default=0.25)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=20)
    p.add_argument("--bptt", type=int, default=35)
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=1111)
    p.add_argument("--eval-only", action="store_true", help="skip training: time evaluation of the test split only")
    args = p.parse_args()
    torch.manual_seed(args.seed)
    eval_batch_size = 10
    corpus = Corpus(args.data)
    train_data = batchify(corpus.train, args.batch_size)
    val_data = batchify(corpus.valid, eval_batch_size)
    test_data = batchify(corpus.test, eval_batch_size)
    model = RNNModel(len(corpus.word2idx), args.emsize, args.nhid, args.nlayers, args.dropout)
    criterion = nn.NLLLoss()
    result: dict = {"program": "baseline", "vocab": len(corpus.word2idx)}
    if not args.eval_only:
        train_tokens, batches, started = 0, 0, time.perf_counter()
        for _ in range(args.epochs):
            model.train()
            hidden = model.init_hidden(args.batch_size)
            for i in range(0, train_data.size(0) - 1, args.bptt):
                data, targets = get_batch(train_data, i, args.bptt)
                hidden = repackage_hidden(hidden)
                model.zero_grad()
                output, hidden = model(data, hidden)
                loss = criterion(output, targets)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
                for param in model.parameters():
                    param.data.add_(param.grad, alpha=-args.lr)
                loss.item()  # the example accumulates total_loss += loss.item() every batch
                train_tokens += data.numel()
                batches += 1
        seconds = time.perf_counter() - started
        valid_loss = evaluate(model, criterion, val_data, args.bptt, eval_batch_size)
        result.update(train_seconds=round(seconds, 2), train_tokens_per_s=round(train_tokens / seconds, 1),
                      ms_per_batch=round(1000 * seconds / batches, 1), valid_loss=valid_loss, valid_ppl=math.exp(valid_loss))
    started = time.perf_counter()
    test_loss = evaluate(model, criterion, test_data, args.bptt, eval_batch_size)
    seconds = time.perf_counter() - started
    result.update(test_loss=test_loss, eval_seconds=round(seconds, 2), eval_tokens_per_s=round((len(test_data) - 1) * eval_batch_size / seconds, 1),
                  peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""A Transformer with memory passes information from one training window to the next; one without cannot.

The corpus repeats 12-word patterns, so every word equals the word 13 positions back (12 words + ``<eos>``).
With ``--bptt 8`` that word is never in the same window; a memory of 16 positions reaches it. Trained alike,
the model with memory learns to copy (perplexity near 1) and the one without stays near chance (about 21).
"""

from __future__ import annotations

import random

import neurallm

SETTINGS = dict(model="Transformer", emsize=32, nhid=64, nlayers=1, nhead=2, dropout=0.0, bptt=8, batch_size=16,
                epochs=10, optimizer="adamw", lr=3e-3, warmup=20, eval_batch_size=4, seed=0)


def write_repeating_patterns(folder, seed: int = 0):
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(20)]

    def block() -> str:
        pattern = " ".join(rng.choice(words) for _ in range(12))
        return "\n".join([pattern] * 8)

    folder.mkdir()
    for split, blocks in (("train", 150), ("valid", 15), ("test", 15)):
        (folder / f"{split}.txt").write_text("\n".join(block() for _ in range(blocks)) + "\n")
    return folder


def test_memory_carries_what_the_window_cannot_see(tmp_path):
    corpus = write_repeating_patterns(tmp_path / "patterns")
    quiet = dict(progress=False)
    with_memory = neurallm.train(corpus, tmp_path / "memory", memory=16, **SETTINGS, **quiet)
    without = neurallm.train(corpus, tmp_path / "plain", memory=0, **SETTINGS, **quiet)
    assert with_memory.test.ppl < 3.0
    assert without.test.ppl > 10.0

"""Exact evaluation: every token after the first scored once, the same perplexity for every batch size.

The naive method (the PyTorch example's) is kept and pinned too, so the effect it has stays reproducible.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import neurallm
from neurallm.cli import main
from neurallm.config import ModelConfig
from neurallm.evaluation import evaluate, evaluate_naive
from neurallm.models import build_model
from conftest import TINY_MODEL

TOLERANCE = 0.0005  # 0.05 %, the promise made to users


def relative_gap(a: float, b: float) -> float:
    return abs(a - b) / b


@pytest.fixture(scope="module")
def trained_lstm(trained_run):
    """The session's trained LSTM (loaded, not trained again) and its test split's ids."""
    run = neurallm.load_run(trained_run)
    return run, run.eval_data().ids("test")


def random_model(kind: str, vocab_size: int = 30, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    settings = dict(model=kind, vocab_size=vocab_size, emsize=16, nhid=32, nlayers=2, dropout=0.0, nhead=2)
    settings.update(overrides)
    return build_model(ModelConfig(**settings)).eval()


def test_origin_example_naive_layouts_score_different_tokens_exact_scores_all():
    """The numbers 1..40 as 5×8 and 6×6 batches: the naive method scores 32 and 30 tokens, exact 39."""
    ids = np.arange(40) % 30
    model = random_model("LSTM")
    assert evaluate_naive(model, ids, batch_size=8, bptt=4).tokens == (5 - 1) * 8
    assert evaluate_naive(model, ids, batch_size=6, bptt=4).tokens == (6 - 1) * 6
    for batch_size in (1, 6, 8):
        assert evaluate(model, ids, batch_size=batch_size, bptt=4).tokens == 39


def test_batch_size_one_is_reading_the_text_in_order(trained_lstm):
    run, ids = trained_lstm
    model = run.model
    stream = torch.as_tensor(np.asarray(ids, dtype=np.int64)).view(-1, 1)
    with torch.no_grad():
        features, _ = model.features(stream[:-1], model.init_state(1))
        reference = model.head.loss(features, stream[1:]).item()
    result = evaluate(model, ids, batch_size=1, bptt=8)
    assert result.tokens == len(ids) - 1
    assert result.loss == pytest.approx(reference, rel=1e-6)


@pytest.mark.parametrize("batch_size", [3, 10, 40])
def test_exact_perplexity_does_not_depend_on_batch_size(trained_lstm, batch_size):
    run, ids = trained_lstm
    one = evaluate(run.model, ids, batch_size=1, bptt=8)
    many = evaluate(run.model, ids, batch_size=batch_size, bptt=8)
    assert many.tokens == one.tokens == len(ids) - 1
    assert relative_gap(many.ppl, one.ppl) < TOLERANCE


def test_naive_perplexity_changes_with_batch_size(trained_lstm):
    run, ids = trained_lstm
    one = evaluate_naive(run.model, ids, batch_size=1, bptt=8)
    many = evaluate_naive(run.model, ids, batch_size=40, bptt=8)
    assert many.tokens < one.tokens  # the tail is trimmed
    assert relative_gap(many.ppl, one.ppl) > 10 * TOLERANCE  # cold starts show


def test_burn_in_is_what_makes_the_columns_agree(trained_lstm):
    run, ids = trained_lstm
    one = evaluate(run.model, ids, batch_size=1, bptt=8)
    cold = evaluate(run.model, ids, batch_size=40, bptt=8, context=0)
    assert cold.tokens == one.tokens
    assert relative_gap(cold.ppl, one.ppl) > 10 * TOLERANCE


@pytest.mark.parametrize("batch_size", [4, 10])
def test_transformer_with_memory_gives_the_same_perplexity_for_every_batch_size(batch_size):
    ids = np.random.default_rng(0).integers(0, 30, 700)
    model = random_model("Transformer", memory=12)
    one = evaluate(model, ids, batch_size=1, bptt=10)
    many = evaluate(model, ids, batch_size=batch_size, bptt=10)
    assert many.tokens == one.tokens == 699
    assert relative_gap(many.ppl, one.ppl) < 1e-5


def test_transformer_memory_changes_what_is_computed():
    """Evaluated with its memory, a Transformer-XL gives another result than the same weights without it."""
    ids = np.random.default_rng(1).integers(0, 30, 400)
    with_memory = random_model("Transformer", memory=12)
    without = random_model("Transformer", memory=0)
    without.load_state_dict(with_memory.state_dict())
    gap = relative_gap(evaluate(with_memory, ids, bptt=10).ppl, evaluate(without, ids, bptt=10, context=0).ppl)
    assert gap > 1e-4


@pytest.mark.parametrize("batch_size", [4, 16])
def test_transformer_without_memory_uses_sliding_windows_independent_of_batch_size(batch_size):
    ids = np.random.default_rng(2).integers(0, 30, 500)
    model = random_model("Transformer")
    one = evaluate(model, ids, batch_size=1, bptt=16)
    many = evaluate(model, ids, batch_size=batch_size, bptt=16)
    assert one.context == 8 and many.tokens == one.tokens == 499
    assert relative_gap(many.ppl, one.ppl) < 1e-5


@pytest.mark.parametrize("naive", [False, True], ids=["exact", "naive"])
def test_evaluation_runs_with_dropout_off_and_leaves_the_model_in_its_mode(naive):
    ids = np.random.default_rng(3).integers(0, 30, 300)
    model = random_model("LSTM", dropout=0.5)
    score = evaluate_naive if naive else evaluate
    in_eval_mode = score(model.eval(), ids, batch_size=4, bptt=8).loss
    from_training_mode = score(model.train(), ids, batch_size=4, bptt=8).loss
    assert from_training_mode == pytest.approx(in_eval_mode, rel=1e-6)  # dropout was off
    assert model.training  # and the caller's mode is back
    assert not score(model.eval(), ids, batch_size=4, bptt=8) is None and not model.training


@pytest.mark.parametrize("kind", ["LSTM", "Transformer"])
def test_exact_evaluation_reads_a_memory_mapped_split_window_by_window(kind, tmp_path):
    """No int64 (or any) copy of the split: NumPy's peak allocation stays a small fraction of the split."""
    import tracemalloc

    path = tmp_path / "test.npy"
    np.save(path, np.random.default_rng(0).integers(0, 30, 1_000_000).astype(np.uint16))
    ids = np.load(path, mmap_mode="r")  # 2 MB as uint16, 8 MB as int64; a window's arrays take tens of kB
    model = random_model(kind, emsize=8, nhid=8, nlayers=1)
    tracemalloc.start()
    try:
        result = evaluate(model, ids, batch_size=20, bptt=32, context=16)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result.tokens == len(ids) - 1
    assert peak < 0.25 * ids.nbytes, f"{peak:,} bytes allocated for a {ids.nbytes:,}-byte split"


def test_eval_of_a_run_reuses_its_prepared_data_and_encodes_other_text_for_the_split_asked_only(tmp_path):
    from conftest import write_patterned_corpus
    from neurallm.data.registry import cache_dir

    corpus = write_patterned_corpus(tmp_path / "corpus", lines=60)
    neurallm.train(corpus, tmp_path / "run", model="LSTM", progress=False, **TINY_MODEL)
    run = neurallm.load_run(tmp_path / "run")
    prepared = cache_dir() / "prepared"
    before = set(prepared.iterdir())
    assert run.evaluate(split="test").tokens > 0
    assert set(prepared.iterdir()) == before  # the run's own data: nothing encoded again
    other = write_patterned_corpus(tmp_path / "other", lines=60, seed=1)
    result = run.evaluate(other, split="valid")
    (made,) = set(prepared.iterdir()) - before
    assert sorted(p.name for p in made.glob("*.npy")) == ["valid.npy"]  # not train, not test
    assert result.tokens == len(np.load(made / "valid.npy")) - 1


def test_eval_cli_compares_naive_and_exact_for_several_batch_sizes(trained_lstm, capsys):
    run, ids = trained_lstm
    assert main(["eval", str(run.folder), "--compare-batch-sizes", "1,4,20", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["batch_size"] for r in rows] == [1, 4, 20]
    assert {r["exact_tokens"] for r in rows} == {len(ids) - 1}
    assert rows[2]["naive_tokens"] < rows[0]["naive_tokens"]
    exact = [r["exact_ppl"] for r in rows]
    assert max(exact) / min(exact) - 1 < TOLERANCE
    assert main(["eval", str(run.folder), "--compare-batch-sizes", "1,4"]) == 0
    table = capsys.readouterr().out
    assert "naive ppl" in table and "exact ppl" in table and "exact tokens" in table


def test_eval_cli_naive_flag_and_json_keys(trained_lstm, capsys):
    run, ids = trained_lstm
    assert main(["eval", str(run.folder), "--split", "test", "--batch-size", "20", "--naive", "--json"]) == 0
    naive = json.loads(capsys.readouterr().out)
    assert naive["method"] == "naive" and naive["tokens"] < len(ids) - 1
    assert main(["eval", str(run.folder), "--split", "test", "--batch-size", "20", "--json"]) == 0
    exact = json.loads(capsys.readouterr().out)
    assert {"loss", "ppl", "tokens"} <= exact.keys()
    assert exact["tokens"] == len(ids) - 1 and math.isclose(exact["ppl"], math.exp(exact["loss"]))


def test_explain_cli_shows_training_windows_and_the_evaluation_view(capsys):
    assert main(["explain", "--text", "a b c d e f g h i j k l m n o p q r s t u v w x y z"]) == 0
    training = capsys.readouterr().out
    assert "┌ a g m s ┐" in training and "y z" in training
    assert main(["explain", "--range", "1..40", "--eval"]) == 0
    evaluation = capsys.readouterr().out
    assert "37 38 39 40" in evaluation and "39 of 40" in evaluation

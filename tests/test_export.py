"""ONNX export: the exported graph computes what the PyTorch model computes, window after window, state carried."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import neurallm
from neurallm.cli import main
from tests.conftest import TINY_MODEL, write_patterned_corpus

onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from neurallm.export import export_onnx, generate_onnx, onnx_initial_state  # noqa: E402

MODELS = {"LSTM": {}, "GRU": {"model": "GRU"}, "Transformer": {"model": "Transformer"},
          "Transformer-XL": {"model": "Transformer", "memory": 6}}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_patterned_corpus(tmp_path_factory.mktemp("export") / "corpus", lines=60)


@pytest.mark.parametrize("name", MODELS)
def test_onnx_matches_pytorch_over_windows_of_different_lengths(name, corpus, tmp_path, capsys):
    run_dir = tmp_path / "run"
    neurallm.train(corpus, run_dir, progress=False, **{**TINY_MODEL, **MODELS[name]})
    assert main(["export", str(run_dir), "--onnx", str(tmp_path / "m.onnx")]) == 0
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    run = neurallm.load_run(run_dir, device="cpu")
    rng = np.random.default_rng(0)
    onnx_state, torch_state = onnx_initial_state(session, batch_size=3), run.model.init_state(3)
    worst = 0.0
    for length in (5, 1, 9, 12):  # the sequence length is dynamic; a memory fills up and then slides
        ids = rng.integers(0, len(run.vocab), size=(length, 3))
        log_probs, *next_state = session.run(None, {"ids": ids, **onnx_state})
        with torch.no_grad():
            features, torch_state = run.model.features(torch.from_numpy(ids), torch_state)
            expected = run.model.head.log_probs(features).numpy()
        assert log_probs.shape == (length, 3, len(run.vocab))
        worst = max(worst, float(np.abs(log_probs - expected).max()))
        for got, want in zip(next_state, torch_state):
            assert got.shape == tuple(want.shape)
            np.testing.assert_allclose(got, want.numpy(), atol=1e-4)
        onnx_state = dict(zip(onnx_state, next_state))
    print(f"{name}: max abs difference of log-probabilities ONNX vs PyTorch {worst:.2e}")
    assert worst < 1e-4


def test_greedy_generation_from_the_onnx_file_matches_neurallm_generate(corpus, tmp_path):
    run_dir = tmp_path / "run"
    neurallm.train(corpus, run_dir, progress=False, **TINY_MODEL)
    export_onnx(run_dir, tmp_path / "m.onnx")
    text = generate_onnx(tmp_path / "m.onnx", run_dir, "the cat", tokens=12, temperature=0)
    assert text == neurallm.load_run(run_dir).generate("the cat", tokens=12, temperature=0).text
    # sampling too: the same settings and seed draw the same tokens (one sampler for every route)
    sampled = dict(tokens=25, temperature=0.9, top_k=6, top_p=0.95, seed=2**64 - 1)
    text = generate_onnx(tmp_path / "m.onnx", run_dir, "the cat", **sampled)
    assert text == neurallm.load_run(run_dir).generate("the cat", **sampled).text


def test_export_into_a_missing_folder_is_one_line(trained_run, tmp_path, capsys):
    assert main(["export", str(trained_run), "--onnx", str(tmp_path / "no" / "m.onnx")]) == 1
    err = capsys.readouterr().err
    assert "--onnx" in err and "does not exist" in err and err.count("\n") == 1

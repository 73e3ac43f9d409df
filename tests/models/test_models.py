"""Models: every ``--model`` type learns a patterned corpus; tying; Transformer-XL memory carries information."""

from __future__ import annotations

import pytest
import torch

from neurallm.api import prepare
from neurallm.config import ModelConfig
from neurallm.data.batching import ContiguousBatches, batchify
from neurallm.errors import ConfigError
from neurallm.models import build_model
from neurallm.training.step import detach_state, training_step

MODEL_TYPES = [
    pytest.param(dict(model="RNN_TANH"), id="RNN_TANH"),
    pytest.param(dict(model="RNN_RELU"), id="RNN_RELU"),
    pytest.param(dict(model="LSTM"), id="LSTM"),
    pytest.param(dict(model="GRU"), id="GRU"),
    pytest.param(dict(model="Transformer", nhead=2), id="Transformer"),
    pytest.param(dict(model="Transformer", nhead=2, memory=8), id="Transformer-memory"),
    pytest.param(dict(model="AWD_LSTM", nlayers=2, dropouti=0.1, dropouth=0.1, dropoute=0.05, wdrop=0.2, alpha=1.0, beta=1.0),
                 id="AWD_LSTM"),
    pytest.param(dict(model="LSTM", adaptive_softmax=True, cutoffs=(10, 20)), id="LSTM-adaptive-softmax"),
]


def _config(vocab_size: int = 30, **settings) -> ModelConfig:
    base = dict(vocab_size=vocab_size, emsize=16, nhid=16, nlayers=1, dropout=0.0)
    return ModelConfig(**{**base, **settings})


@pytest.fixture
def patterned_ids(tiny_corpus, tmp_path):
    """The training ids of the tiny patterned corpus (fixed phrases in random order) and the vocabulary size."""
    prepared = prepare(tiny_corpus, tmp_path / "prepared")
    return torch.as_tensor(prepared.ids("train").astype("int64")), len(prepared.vocab)


@pytest.mark.parametrize("settings", MODEL_TYPES)
def test_every_model_type_learns_the_patterned_corpus(settings, patterned_ids):
    ids, vocab_size = patterned_ids
    torch.manual_seed(0)
    model = build_model(_config(vocab_size, **settings)).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.03)
    batches = ContiguousBatches(batchify(ids, 8), bptt=12)
    state = model.init_state(8)
    losses = []
    for inputs, targets in list(batches.epoch(0))[:36]:
        state = state if model.carries_state else model.init_state(8)
        outcome = training_step(model, optimizer, inputs, targets, state, clip=0.5)
        state = outcome.state
        losses.append(outcome.nll.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert all(torch.isfinite(torch.tensor(losses)))
    assert last < 0.6 * first, f"loss went from {first:.3f} to {last:.3f}"


@pytest.mark.parametrize("settings", MODEL_TYPES)
def test_features_are_time_major_and_the_head_gives_log_probabilities(settings):
    model = build_model(_config(**settings)).eval()
    inputs = torch.randint(0, 30, (7, 3))
    features, state = model.features(inputs, model.init_state(3))
    assert features.shape == (7, 3, 16)
    log_probs = model.head.log_probs(features)
    assert log_probs.shape == (7, 3, 30)
    assert torch.allclose(log_probs.exp().sum(-1), torch.ones(7, 3), atol=1e-5)
    assert model.head.loss(features, inputs, reduction="none").shape == (21,)


@pytest.mark.parametrize("settings", [dict(model="LSTM"), dict(model="GRU"), dict(model="Transformer", nhead=2)])
def test_tied_weights_share_storage(settings):
    model = build_model(_config(**settings, tied=True))
    assert model.head.weight is model.encoder.weight
    assert model.head.weight.data_ptr() == model.encoder.weight.data_ptr()
    assert sum(p is model.encoder.weight for p in model.parameters()) == 1  # counted (and updated) once
    untied = build_model(_config(**settings))
    assert untied.head.weight.data_ptr() != untied.encoder.weight.data_ptr()


def test_tying_an_rnn_with_emsize_unequal_to_nhid_projects_to_emsize():
    model = build_model(_config(model="LSTM", emsize=16, nhid=32, tied=True))
    assert model.head.weight is model.encoder.weight
    features, _ = model.features(torch.zeros(5, 2, dtype=torch.long), model.init_state(2))
    assert features.shape == (5, 2, 16)  # projected from 32 to the embedding's width


def test_tied_and_adaptive_softmax_together_is_a_config_error():
    with pytest.raises(ConfigError, match="--tied and --adaptive-softmax"):
        ModelConfig(model="LSTM", vocab_size=30, tied=True, adaptive_softmax=True)


def test_a_tied_transformer_may_have_any_feed_forward_width():
    model = build_model(_config(model="Transformer", nhid=48, tied=True))
    assert model.head.weight is model.encoder.weight


@pytest.mark.parametrize(
    "settings,message",
    [
        (dict(model="LSTX"), "--model"),
        (dict(model="LSTM", memory=4), "--memory applies to --model Transformer only"),
        (dict(model="Transformer", emsize=16, nhead=3), "divisible by --nhead"),
        (dict(model="Transformer", emsize=18, nhead=6), "even for rotary"),
        (dict(dropout=1.0), "--dropout"),
    ],
)
def test_invalid_model_settings_are_config_errors_naming_the_flag(settings, message):
    with pytest.raises(ConfigError, match=message):
        _config(**settings)


# --- Transformer-XL memory ---------------------------------------------------------------------------------


def _transformer(memory: int) -> torch.nn.Module:
    torch.manual_seed(3)
    return build_model(_config(model="Transformer", nlayers=2, nhead=2, memory=memory, dropout=0.1)).eval()


def _one_then_two_windows(model, first: int):
    sequence = torch.randint(0, 30, (12, 2), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        whole, _ = model.features(sequence, model.init_state(2))
        head, state = model.features(sequence[:first], model.init_state(2))
        tail, _ = model.features(sequence[first:], state)
    return whole, head, tail


@pytest.mark.parametrize("memory", [5, 8, 20])
def test_memory_at_least_the_first_window_carries_it_into_the_second(memory):
    whole, head, tail = _one_then_two_windows(_transformer(memory), first=5)
    assert torch.allclose(head, whole[:5], atol=1e-5)
    assert torch.allclose(tail, whole[5:], atol=1e-5)


def test_without_memory_the_second_window_loses_the_first():
    whole, head, tail = _one_then_two_windows(_transformer(0), first=5)
    assert torch.allclose(head, whole[:5], atol=1e-5)  # the first window is the same either way
    assert not torch.allclose(tail, whole[5:], atol=1e-3)


def test_memory_keeps_the_last_m_positions_of_every_layer():
    model = _transformer(memory=4)
    assert model.carries_state
    assert not _transformer(memory=0).carries_state
    state = model.init_state(2)
    assert len(state) == 2 and all(t.shape == (2, 0, 16) for t in state)  # per layer (B, m, emsize)
    with torch.no_grad():
        _, state = model.features(torch.randint(0, 30, (3, 2)), state)
        assert all(t.shape == (2, 3, 16) for t in state)
        _, state = model.features(torch.randint(0, 30, (3, 2)), state)
    assert all(t.shape == (2, 4, 16) for t in state)


def test_memory_is_detached_at_the_window_edge_in_training():
    model = _transformer(memory=6).train()
    features, memory = model.features(torch.randint(0, 30, (6, 2)), model.init_state(2))
    features.sum().backward()  # frees the first window's graph
    features, _ = model.features(torch.randint(0, 30, (6, 2)), detach_state(memory))
    features.sum().backward()  # the second window's gradients stop at its edge
    features, _ = model.features(torch.randint(0, 30, (6, 2)), memory)
    with pytest.raises(RuntimeError):
        features.sum().backward()  # memory not detached would reach back into the freed graph


@pytest.mark.parametrize("memory", [0, 4])
def test_a_transformer_prepared_for_compile_takes_its_rotary_table_as_an_input(memory):
    """Inductor would compute the table's sines and cosines again inside every kernel that rotates (20% of a
    GPT-2-small step on an H100): after prepare_for_compile no compiled graph computes them, and the loss is the
    one the eager model gives."""
    graphs = []

    def record(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch.manual_seed(0)
    model = build_model(ModelConfig(model="Transformer", vocab_size=50, emsize=16, nhid=32, nlayers=2, nhead=2,
                                    memory=memory, dropout=0.0))
    ids = torch.randint(0, 50, (9, 3))
    state = model.init_state(3)
    eager = [model(ids[:-1], state, ids[1:])]
    eager.append(model(ids[:-1], eager[0].state, ids[1:]))
    model.prepare_for_compile()
    compiled = torch.compile(model, backend=record)
    first = compiled(ids[:-1], state, ids[1:])
    second = compiled(ids[:-1], first.state, ids[1:])
    assert [first.loss.item(), second.loss.item()] == pytest.approx([e.loss.item() for e in eager], rel=1e-6)
    targets = {str(node.target) for graph in graphs for node in graph.graph.nodes}
    assert graphs and not any("cos" in t or "sin" in t for t in targets)

"""Batching: the ``batchify`` diagram, BPTT windows, resumable epochs, shuffled windows and the carried state."""

from __future__ import annotations

import string

import numpy as np
import pytest
import torch

from neurallm.config import ModelConfig
from neurallm.data.batching import ContiguousBatches, ShuffledWindows, batchify, get_batch, window_starts
from neurallm.errors import ConfigError
from neurallm.models.rnn import RNNLanguageModel
from neurallm.training.step import detach_state

ALPHABET = string.ascii_lowercase
LETTER_IDS = torch.arange(26)


def letters(t: torch.Tensor) -> list[list[str]]:
    """A (rows, columns) tensor of letter ids as rows of letters, to compare with the docstring diagram."""
    return [[ALPHABET[i] for i in row] for row in t.tolist()]


def columns(*words: str) -> list[list[str]]:
    """Rows of the diagram written column by column: columns("ab", "gh") == [[a, g], [b, h]]."""
    return [list(row) for row in zip(*words)]


def test_batchify_cuts_the_alphabet_into_four_columns_as_the_diagram_shows():
    #    ┌ a g m s ┐
    #    │ b h n t │
    #    │ c i o u │
    #    │ d j p v │
    #    │ e k q w │
    #    └ f l r x ┘   (y and z do not fit and are dropped)
    stream = batchify(LETTER_IDS, 4)
    assert stream.shape == (6, 4)
    assert letters(stream) == columns("abcdef", "ghijkl", "mnopqr", "stuvwx")


def test_the_first_bptt_window_and_its_target_shifted_one_row_down():
    stream = batchify(LETTER_IDS, 4)
    inputs, targets = get_batch(stream, 0, bptt=2)
    assert letters(inputs) == [list("agms"), list("bhnt")]
    assert letters(targets) == [list("bhnt"), list("ciou")]
    inputs, targets = get_batch(stream, 2, bptt=2)  # the next window starts at row c
    assert letters(inputs) == [list("ciou"), list("djpv")]
    assert letters(targets) == [list("djpv"), list("ekqw")]


def test_the_last_window_is_short_when_the_rows_run_out():
    stream = batchify(LETTER_IDS, 4)  # 6 rows: windows of 4 start at rows 0 and 4
    assert list(window_starts(stream.size(0), 4)) == [0, 4]
    inputs, targets = get_batch(stream, 4, bptt=4)
    assert letters(inputs) == [list("ekqw")]
    assert letters(targets) == [list("flrx")]


def test_batchify_of_a_memory_mapped_split_is_a_view_and_only_windows_become_int64(tmp_path):
    path = tmp_path / "train.npy"
    np.save(path, np.arange(26, dtype=np.uint16))
    ids = np.load(path, mmap_mode="r")
    stream = batchify(ids, 4)
    assert stream.dtype == np.uint16 and np.shares_memory(stream, ids)  # no copy of the split, no int64
    assert letters(torch.from_numpy(stream.astype(np.int64))) == columns("abcdef", "ghijkl", "mnopqr", "stuvwx")
    inputs, targets = get_batch(stream, 2, bptt=2)
    assert inputs.dtype == targets.dtype == torch.int64
    assert letters(inputs) == [list("ciou"), list("djpv")]
    assert letters(targets) == [list("djpv"), list("ekqw")]


def _peak_numpy_bytes(work) -> int:
    """Peak bytes NumPy allocates while ``work()`` runs (NumPy reports its buffers to tracemalloc)."""
    import tracemalloc

    tracemalloc.start()
    try:
        work()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("kind", ["contiguous", "shuffled"])
def test_an_epoch_over_a_memory_mapped_split_never_copies_the_split(kind, tmp_path):
    n_tokens = 400_000
    path = tmp_path / "train.npy"
    np.save(path, np.random.default_rng(0).integers(0, 30_000, n_tokens).astype(np.uint16))
    ids = np.load(path, mmap_mode="r")

    def one_epoch():
        if kind == "contiguous":
            batches = ContiguousBatches(batchify(ids, 20), bptt=35)
        else:
            batches = ShuffledWindows(ids, bptt=35, batch_size=20, seed=0)
        for inputs, targets in batches.epoch(0):
            assert inputs.dtype == torch.int64 and inputs.shape[1] <= 20

    # the split is 800 kB as uint16 and would be 3.2 MB as int64; a window is 20 × 36 ids
    assert _peak_numpy_bytes(one_epoch) < 0.1 * ids.nbytes


@pytest.mark.parametrize("kind", ["contiguous", "shuffled"])
def test_batches_are_sent_to_the_device_they_are_asked_for(kind):
    # the meta device stands in for an accelerator: it exists everywhere and no tensor lands there by accident
    ids = np.arange(200, dtype=np.uint16)
    if kind == "contiguous":
        batches = ContiguousBatches(batchify(ids, 4), bptt=6, device=torch.device("meta"))
    else:
        batches = ShuffledWindows(ids, bptt=6, batch_size=4, seed=0, device=torch.device("meta"))
    for inputs, targets in batches.epoch(0):
        assert inputs.device.type == targets.device.type == "meta"


def test_a_batch_size_that_leaves_under_two_rows_is_a_config_error():
    with pytest.raises(ConfigError, match="--batch-size 14"):
        batchify(LETTER_IDS, 14)


def test_contiguous_batches_cover_every_target_once():
    batches = ContiguousBatches(batchify(LETTER_IDS, 4), bptt=2)
    windows = list(batches.epoch(0))
    assert len(windows) == len(batches) == 3  # rows a..f: inputs a b | c d | e
    targets = [letter for _, target in windows for row in letters(target) for letter in row]
    assert sorted(targets) == sorted(set(ALPHABET[:24]) - set("agms"))
    assert batches.tokens_per_epoch() == len(targets) == 20


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_contiguous_batches_resumed_at_window_k_give_the_same_windows(k):
    batches = ContiguousBatches(batchify(torch.arange(100), 3), bptt=5)
    full = list(batches.epoch(0))
    resumed = list(batches.epoch(0, start_window=k))
    assert len(resumed) == len(full) - k
    for (a_in, a_out), (b_in, b_out) in zip(full[k:], resumed):
        assert torch.equal(a_in, b_in) and torch.equal(a_out, b_out)


def _window_starts_of(epoch_windows, bptt: int) -> list[int]:
    return [int(column[0]) // bptt for inputs, _ in epoch_windows for column in inputs.t()]


def test_shuffled_windows_same_seed_and_epoch_give_the_same_order():
    ids = np.arange(200, dtype=np.uint16)
    a = ShuffledWindows(ids, bptt=6, batch_size=4, seed=11)
    b = ShuffledWindows(ids, bptt=6, batch_size=4, seed=11)
    assert _window_starts_of(a.epoch(3), 6) == _window_starts_of(b.epoch(3), 6)


def test_shuffled_windows_change_order_with_the_epoch_and_the_seed():
    ids = np.arange(200, dtype=np.uint16)
    windows = ShuffledWindows(ids, bptt=6, batch_size=4, seed=11)
    epoch0, epoch1 = _window_starts_of(windows.epoch(0), 6), _window_starts_of(windows.epoch(1), 6)
    assert epoch0 != epoch1
    other_seed = ShuffledWindows(ids, bptt=6, batch_size=4, seed=12)
    assert _window_starts_of(other_seed.epoch(0), 6) != epoch0


def test_shuffled_windows_take_every_window_once_per_epoch_with_the_target_shifted_by_one():
    ids = np.arange(200, dtype=np.uint16)  # id i sits at position i, so a window shows where it came from
    windows = ShuffledWindows(ids, bptt=6, batch_size=4, seed=0)
    n_windows = (200 - 1) // 6  # 33 windows of 7 ids: starts 0, 6, …, 192
    batches = list(windows.epoch(0))
    assert len(batches) == len(windows) == 9  # 8 full batches of 4 and a last one of 1
    assert [inputs.size(1) for inputs, _ in batches] == [4] * 8 + [1]
    for inputs, targets in batches:
        assert inputs.shape[0] == targets.shape[0] == 6
        assert torch.equal(targets[:-1], inputs[1:])
        assert torch.equal(targets, inputs + 1)
        assert torch.equal(inputs[0] % 6, torch.zeros_like(inputs[0]))  # windows start at multiples of bptt
    assert sorted(_window_starts_of(batches, 6)) == list(range(n_windows))
    assert windows.tokens_per_epoch() == n_windows * 6


def test_shuffled_windows_resumed_at_batch_k_continue_the_same_order():
    windows = ShuffledWindows(np.arange(200, dtype=np.uint16), bptt=6, batch_size=4, seed=5)
    full = list(windows.epoch(2))
    resumed = list(windows.epoch(2, start_window=5))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(full[5:], resumed))
    assert len(resumed) == len(full) - 5


def test_shuffled_windows_longer_than_the_stream_are_a_config_error():
    with pytest.raises(ConfigError, match="--bptt"):
        ShuffledWindows(np.arange(5), bptt=5, batch_size=2, seed=0)


# --- the carried state ------------------------------------------------------------------------------------


def _lstm(vocab_size: int = 20) -> RNNLanguageModel:
    torch.manual_seed(0)
    return RNNLanguageModel(ModelConfig(model="LSTM", vocab_size=vocab_size, emsize=8, nhid=12, nlayers=2, dropout=0.3))


def test_an_lstm_run_window_by_window_with_its_state_carried_equals_one_run_over_the_stream():
    model = _lstm().eval()
    stream = batchify(torch.randint(0, 20, (203,), generator=torch.Generator().manual_seed(1)), 5)  # (40, 5)
    with torch.no_grad():
        whole, _ = model.features(stream[:-1], model.init_state(5))
        pieces, state = [], model.init_state(5)
        for inputs, _ in ContiguousBatches(stream, bptt=7).epoch(0):
            features, state = model.features(inputs, detach_state(state))
            pieces.append(features)
    assert torch.allclose(torch.cat(pieces), whole, atol=1e-6)


def test_without_the_carried_state_the_windows_do_not_match_the_stream():
    model = _lstm().eval()
    stream = batchify(torch.randint(0, 20, (203,), generator=torch.Generator().manual_seed(1)), 5)
    with torch.no_grad():
        whole, _ = model.features(stream[:-1], model.init_state(5))
        pieces = [model.features(inputs, model.init_state(5))[0] for inputs, _ in ContiguousBatches(stream, bptt=7).epoch(0)]
    assert not torch.allclose(torch.cat(pieces), whole, atol=1e-3)


def test_a_detached_state_keeps_its_values_but_has_no_grad_fn():
    model = _lstm().train()
    features, state = model.features(torch.randint(0, 20, (6, 3)), model.init_state(3))
    assert all(t.grad_fn is not None for t in state)
    detached = detach_state(state)
    assert all(t.grad_fn is None and not t.requires_grad for t in detached)
    assert all(torch.equal(a, b) for a, b in zip(state, detached))
    features.sum().backward()  # frees the first window's graph
    # back-propagation of the next window stops at the window edge ...
    model.features(torch.randint(0, 20, (6, 3)), detached)[0].sum().backward()
    # ... where the undetached state would reach back into the freed graph
    with pytest.raises(RuntimeError):
        model.features(torch.randint(0, 20, (6, 3)), state)[0].sum().backward()

"""Variable-length BPTT windows: they tile the stream, keep the epoch's window count, average --bptt, differ per
epoch, and are the same after a resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neurallm.data.batching import batchify, window_starts
from neurallm.data.variable_bptt import VariableWindows, plan_windows
from neurallm.training.optim import Schedule


@pytest.mark.parametrize("rows,bptt", [(10_000, 70), (1_000, 35), (50, 8), (7, 3)])
def test_windows_tile_the_stream_with_the_fixed_count(rows, bptt):
    plan = plan_windows(rows, bptt, seed=1, epoch=0)
    assert len(plan) == len(window_starts(rows, bptt))
    starts = [start for start, _ in plan]
    assert starts[0] == 0 and all(length >= 1 for _, length in plan)
    assert all(a + la == b for (a, la), (b, _) in zip(plan, plan[1:]))  # contiguous: every target once
    assert plan[-1][0] + plan[-1][1] == rows - 1


def test_bptt_is_the_mean_and_lengths_vary_by_epoch():
    first, second = plan_windows(100_000, 70, seed=1, epoch=0), plan_windows(100_000, 70, seed=1, epoch=1)
    lengths = np.array([length for _, length in first])
    assert lengths.std() > 3 and abs(lengths.mean() - 70) < 1
    assert first != second and first == plan_windows(100_000, 70, seed=1, epoch=0)


def test_a_resumed_epoch_sees_the_same_windows():
    windows = VariableWindows(batchify(np.arange(2000), 4), 20, seed=3)
    whole = list(windows.epoch(2))
    resumed = list(windows.epoch(2, start_window=5))
    assert len(whole) == len(windows) and len(resumed) == len(whole) - 5
    for (a_in, a_out), (b_in, b_out) in zip(whole[5:], resumed):
        assert torch.equal(a_in, b_in) and torch.equal(a_out, b_out)


def test_the_learning_rate_is_scaled_per_window():
    schedule = Schedule("sgd", 30.0, 0, 100)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule.apply(optimizer, 35 / 70)
    assert optimizer.param_groups[0]["lr"] == 15.0

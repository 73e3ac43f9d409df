"""Which batches a run trains on: one of the three batch sources, and this process's share of it.

================  =====================================================  ==========================
setting           batches                                                state between windows
================  =====================================================  ==========================
(default)         :class:`~neurallm.data.batching.ContiguousBatches`     carried (the PyTorch example)
--variable-bptt   :class:`~neurallm.data.variable_bptt.VariableWindows`  carried (AWD-LSTM)
--shuffle-windows :class:`~neurallm.data.batching.ShuffledWindows`       reset (the news tutorial)
================  =====================================================  ==========================

Under torchrun ``--batch-size`` is the total over all ranks: each rank trains its own contiguous columns of the
batchified stream (or its own share of each batch of shuffled windows), so that the ranks together train the
batch a single process would.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from neurallm.config import TrainConfig
from neurallm.data.batching import ContiguousBatches, ShuffledWindows, batchify
from neurallm.data.variable_bptt import VariableWindows
from neurallm.distributed import Ranks
from neurallm.errors import TrainingError


class TrainingBatches(Protocol):
    """What the trainer needs of a batch source."""

    carries_state: bool  # whether a window continues the previous window's text (so its state carries over)

    def __len__(self) -> int: ...

    def epoch(self, epoch: int, start_window: int = 0): ...


def local_batch_size(batch_size: int, ranks: Ranks) -> int:
    """Columns (or windows) per rank: ``--batch-size`` is the total over all ranks and must split evenly, so that
    averaging the ranks' gradients gives the gradient of the whole batch."""
    if batch_size % ranks.world_size:
        raise TrainingError(f"--batch-size {batch_size} does not split evenly over {ranks.world_size} processes; "
                            f"use a multiple of {ranks.world_size} (it is the total number of columns of all ranks)")
    return batch_size // ranks.world_size


def training_batches(train_ids: np.ndarray, train: TrainConfig, device: torch.device, ranks: Ranks) -> TrainingBatches:
    """This rank's batches of the training split ``train_ids`` under ``train``'s settings."""
    if train.shuffle_windows:
        return ShuffledWindows(train_ids, train.bptt, train.batch_size, train.seed, device, ranks.rank, ranks.world_size)
    # each rank trains its own contiguous columns of the whole --batch-size stream
    own_columns = batchify(train_ids, train.batch_size)[:, ranks.share(train.batch_size)]
    if train.variable_bptt:  # the same seed on every rank: the same window lengths
        return VariableWindows(own_columns, train.bptt, train.seed, device)
    return ContiguousBatches(own_columns, train.bptt, device)

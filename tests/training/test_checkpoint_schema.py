"""The last checkpoint's training state: what pack_training_state stores is what the read functions give back,
per rank, and a resume on other data or another number of processes is refused."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from neurallm.config import ModelConfig, TrainConfig
from neurallm.data.batching import ContiguousBatches, ShuffledWindows
from neurallm.data.training_batches import training_batches
from neurallm.data.variable_bptt import VariableWindows
from neurallm.distributed import Ranks
from neurallm.errors import TrainingError
from neurallm.models import build_model
from neurallm.training import checkpoint as ckpt
from neurallm.training.ntasgd import ParameterAverage
from neurallm.training.optim import build_optimizer


def rank_part(rank: int) -> ckpt.RankState:
    return ckpt.RankState({"python": [rank]}, {"rng.torch": torch.full((3,), rank), "carry.0": torch.ones(2) * rank},
                          [1.5 * rank, rank])


def test_what_is_packed_per_rank_reads_back_per_rank(tmp_path):
    model = build_model(ModelConfig(vocab_size=10, emsize=4, nhid=4, nlayers=1))
    optimizer = build_optimizer(model, TrainConfig())
    position = ckpt.Position(epoch=2, window=7, elapsed=12.5, faults=1, best_valid_loss=math.inf,
                             schedule={"kind": "sgd"},
                             metrics=[{"epoch": 1, "train_loss": 5.0, "valid_loss": 4.5, "lr": 20.0}])
    state = ckpt.pack_training_state(position, [rank_part(0), rank_part(1)], optimizer=optimizer,
                                     average=ParameterAverage(model).to_state(), data_key="k", version="0.1.0")
    path = tmp_path / "last.safetensors"
    tmp_path.joinpath("config.json").write_text("{}")  # a run folder: checkpoints are written only into one
    ckpt.save_last(path, model, state)

    _, loaded = ckpt.load_last(path)
    assert loaded.info["best_valid_loss"] is None  # inf is no JSON: stored as "none yet"
    assert ckpt.read_position(loaded) == position
    for rank in (0, 1):
        own = ckpt.read_rank_state(loaded, rank)
        assert own.rng == {"python": [rank]} and own.epoch_loss == [1.5 * rank, rank]
        assert torch.equal(own.tensors["rng.torch"], torch.full((3,), rank))
        assert [t.tolist() for t in ckpt.carried_state(own, 2)] == [[rank, rank]]  # carry.1 was never saved
    assert "rank1.carry.0" in loaded.tensors and loaded.info["world_size"] == 2


def test_a_resume_on_other_data_or_another_number_of_processes_is_refused():
    state = ckpt.TrainingState({"data_key": "abc", "world_size": 2}, {})
    ckpt.check_same_run(state, "last.safetensors", data_key="abc", world_size=2)
    with pytest.raises(TrainingError, match="prepared as abc, but --data now gives xyz"):
        ckpt.check_same_run(state, "last.safetensors", data_key="xyz", world_size=2)
    with pytest.raises(TrainingError, match=r"trained by 2 process\(es\)"):
        ckpt.check_same_run(state, "last.safetensors", data_key="abc", world_size=1)


@pytest.mark.parametrize("settings, kind, carries", [
    ({}, ContiguousBatches, True),
    ({"variable_bptt": True}, VariableWindows, True),
    ({"shuffle_windows": True}, ShuffledWindows, False),
])
def test_the_settings_choose_the_batch_source(settings, kind, carries):
    ids = np.arange(400, dtype=np.int32)
    batches = training_batches(ids, TrainConfig(batch_size=4, bptt=5, **settings), torch.device("cpu"), Ranks(0, 1))
    assert type(batches) is kind and batches.carries_state is carries


def test_each_rank_trains_its_own_columns_of_the_whole_batch():
    ids = np.arange(400, dtype=np.int32)
    train = TrainConfig(batch_size=4, bptt=5)
    first = [next(iter(training_batches(ids, train, torch.device("cpu"), Ranks(r, 2)).epoch(0)))[0] for r in (0, 1)]
    whole = next(iter(training_batches(ids, train, torch.device("cpu"), Ranks(0, 1)).epoch(0)))[0]
    assert torch.equal(torch.cat(first, dim=1), whole)

"""Several processes training one model: the ranks started by ``torchrun`` and the few collectives they need.

``torchrun --standalone --nproc_per_node N -m neurallm train …`` starts N copies of the same command with
``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` in their environment. :func:`ranks_from_environment` turns that into
a :class:`Ranks` (and the process group: gloo on the CPU, nccl on CUDA with one GPU per local rank). Without
torchrun it returns :data:`SINGLE`, whose collectives do nothing, so the trainer and evaluation call the same
methods whether they run alone or as one of many.

How the work is split (each rank runs the same code on its own share)::

    batchified stream (B = --batch-size = 4 columns), 2 ranks:

        rank 0   rank 1
      ┌ a  g  │ m  s ┐
      │ b  h  │ n  t │     each rank trains its own contiguous columns and carries their state;
      │ c  i  │ o  u │     DistributedDataParallel averages the gradients, so one step is one step of
      └ …  …  │ …  … ┘     the B-column batch, as in a single process

Every choice that decides control flow (a non-finite loss, Ctrl-C, --max-time, a checkpoint being due) is made
collectively with :meth:`Ranks.any`, so all ranks take the same branch and none is left waiting in a collective
the others skipped.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from neurallm.errors import ConfigError, NeurallmError

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """This process's place among the training processes.

    Attributes:
        rank: 0..world_size-1; rank 0 prepares data and writes the run directory.
        world_size: number of processes.
        local_rank: index of this process on its machine (its GPU under CUDA).
        device: where collective tensors live (CPU for gloo, this rank's GPU for nccl).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def share(self, count: int) -> slice:
        """This rank's contiguous part of ``count`` items (sizes differ by at most one; early ranks get more)."""
        base, extra = divmod(count, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (1 if self.rank < extra else 0))

    def any(self, flags: Sequence[bool]) -> list[bool]:
        """Each flag, true if it is true on any rank (one small all_reduce)."""
        if not self.distributed:
            return list(flags)
        values = torch.tensor([float(f) for f in flags], device=self.device)
        torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.MAX)
        return [bool(v) for v in values.tolist()]

    def sum(self, values: Sequence[float]) -> list[float]:
        """Each value summed over the ranks, in float64 (losses and token counts of a sharded evaluation)."""
        if not self.distributed:
            return list(values)
        totals = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(totals)
        return totals.tolist()

    def gather(self, value: T) -> list[T] | None:
        """Every rank's ``value`` on rank 0 (in rank order); None on the other ranks. Tensors arrive on the CPU."""
        if not self.distributed:
            return [value]
        gathered: list | None = [None] * self.world_size if self.is_main else None
        torch.distributed.gather_object(value, gathered, dst=0)
        return gathered

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def main_first(self, work: Callable[[], T]) -> T:
        """Run ``work`` on rank 0, then on the others (data preparation: they find rank 0's result in the cache).

        A user error on rank 0 is raised on every rank, so all of them stop with the same one-line message
        instead of waiting for rank 0 forever.
        """
        if not self.distributed:
            return work()
        error: NeurallmError | None = None
        result = None
        if self.is_main:
            try:
                result = work()
            except NeurallmError as exc:
                error = exc
        message = [error]
        torch.distributed.broadcast_object_list(message, src=0)
        if message[0] is not None:
            raise message[0]
        return result if self.is_main else work()


SINGLE = Ranks()
"""One process: every collective is the identity."""


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def ranks_from_environment(device: torch.device) -> tuple[Ranks, torch.device]:
    """The ranks torchrun started (initialising the process group once), and this rank's training device.

    Args:
        device: the device ``--device`` resolved to; under torchrun ``cuda`` becomes ``cuda:LOCAL_RANK``.

    Returns :data:`SINGLE` and ``device`` unchanged when the process was not started by torchrun (or with one
    process).
    """
    if not launched_by_torchrun():
        return SINGLE, device
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"torchrun started local rank {local_rank} but only {torch.cuda.device_count()} GPU(s) are "
                              "visible; lower --nproc_per_node to the number of GPUs")
        device = torch.device("cuda", local_rank)  # one GPU per local rank, never every rank on GPU 0
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise ConfigError(f"--device {device.type} cannot train under torchrun; use --device cpu (gloo) or cuda (nccl)")
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend, rank=rank, world_size=world_size)
    return Ranks(rank, world_size, local_rank, device if backend == "nccl" else torch.device("cpu")), device


def shutdown(ranks: Ranks) -> None:
    """Leave the process group (at the end of training), so the process exits without warnings."""
    if ranks.distributed and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()

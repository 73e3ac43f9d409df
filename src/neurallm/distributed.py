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

When a peer fails, every collective of the survivors fails with it: a peer that died (``kill -9``, out of memory,
a lost machine) closes its sockets and the next collective raises at once; a peer that stopped answering
(``SIGSTOP``, a hung device, a swapping machine) is noticed only when a collective has waited ``--ddp-timeout``
seconds (:data:`DEFAULT_DDP_TIMEOUT`; PyTorch's own default, 30 minutes, looks like a silent hang).
:func:`as_peer_lost` turns either into one :class:`~neurallm.errors.PeerLostError` line on each
survivor instead of gloo's traceback; under ``torchrun --max-restarts N`` the restarted group then resumes from
the last checkpoint (:mod:`neurallm.elastic`).
"""

from __future__ import annotations

import datetime
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from neurallm.elastic import DEFAULT_DDP_TIMEOUT
from neurallm.errors import ConfigError, NeurallmError, PeerLostError

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

    def from_main(self, value: T) -> T:
        """Rank 0's ``value`` on every rank (the others' ``value`` is ignored): a decision rank 0 made alone."""
        if not self.distributed:
            return value
        message = [value]
        torch.distributed.broadcast_object_list(message, src=0)
        return message[0]

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


def ranks_from_environment(device: torch.device, timeout: float = DEFAULT_DDP_TIMEOUT) -> tuple[Ranks, torch.device]:
    """The ranks torchrun started (initialising the process group once), and this rank's training device.

    Args:
        device: the device ``--device`` resolved to; under torchrun ``cuda`` becomes ``cuda:LOCAL_RANK``.
        timeout: seconds any collective (DDP's gradient all-reduce included) waits for the other processes
            before it fails (``--ddp-timeout``); :func:`as_peer_lost` turns that into one line.

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
    ranks = Ranks(rank, world_size, local_rank, device if backend == "nccl" else torch.device("cpu"))
    if not torch.distributed.is_initialized():
        try:
            store = _attempt_store(rank, world_size, timeout)
            torch.distributed.init_process_group(backend, rank=rank, world_size=world_size, store=store,
                                                 timeout=datetime.timedelta(seconds=timeout))
        except Exception as exc:
            raise as_peer_lost(exc, ranks, timeout, None)  # a peer that never came, or left: one line
    return ranks, device


_ATTEMPT_STORE_KEY = "neurallm/attempt_store"


def _attempt_store(rank: int, world_size: int, timeout: float) -> torch.distributed.Store | None:
    """A key-value store that only this attempt's processes use, under torchrun; None (torch's own) otherwise.

    torchrun's agent keeps one store for all of its restarts, and PyTorch's env:// setup writes each process's
    address into it under the same keys every attempt: a restarted process may read a dead predecessor's
    address and fail to connect (gloo's "connectFullMesh failed ... Connection refused"; PyTorch issue 135712).
    So rank 0 starts a store of its own and publishes its address in the agent's store; the others connect to
    the address found there. One that belongs to a previous attempt refuses the connection (torchrun stops every
    worker before it starts the next attempt), so they read it again until rank 0 of this attempt has published.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    wait = datetime.timedelta(seconds=timeout)
    agent = torch.distributed.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=wait)
    if rank == 0:
        # the agent's store runs on the node of rendezvous rank 0, which holds global rank 0
        host = os.environ["MASTER_ADDR"] if os.environ.get("GROUP_RANK", "0") == "0" else socket.getfqdn()
        store = torch.distributed.TCPStore(host, 0, world_size, is_master=True, timeout=wait, wait_for_workers=False)
        agent.set(_ATTEMPT_STORE_KEY, f"{host}:{store.port}")
        return store
    deadline = time.monotonic() + timeout
    while True:
        host, _, port = agent.get(_ATTEMPT_STORE_KEY).decode().rpartition(":")  # waits until a first one is published
        try:
            store = torch.distributed.TCPStore(host, int(port), world_size, is_master=False,
                                               timeout=datetime.timedelta(seconds=2))
        except (RuntimeError, ValueError):  # a previous attempt's store, gone with its process
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
            continue
        store.set_timeout(wait)
        return store


def shutdown(ranks: Ranks) -> None:
    """Leave the process group (at the end of training), so the process exits without warnings."""
    if ranks.distributed and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def peer_failure(exc: BaseException) -> str | None:
    """``"stalled"`` or ``"died"`` when ``exc`` is a collective failing because another process did; else None.

    gloo raises a plain RuntimeError whose message carries its source path (``gloo/transport/tcp/pair.cc``
    "Connection closed by peer", ``unbound_buffer.cc`` "Timed out waiting 600000ms"); NCCL and the rendezvous
    store raise subclasses of ``torch.distributed.DistError``. Any other error (a bug, a user error) is None and
    keeps its own message.
    """
    message = str(exc)
    if isinstance(exc, torch.distributed.DistError) or (isinstance(exc, RuntimeError) and "gloo/" in message):
        lowered = message.lower()
        return "stalled" if "timed out" in lowered or "timeout" in lowered else "died"
    return None


def as_peer_lost(exc: BaseException, ranks: Ranks, timeout: float, run_dir: os.PathLike | str | None) -> BaseException:
    """What to raise for ``exc``: a one-line :class:`PeerLostError` when a collective failed because another
    process died or stalled, else ``exc`` itself (``raise as_peer_lost(exc, …)`` in an ``except`` clause).

    Every surviving rank raises it (each names its rank); the run directory keeps its last checkpoint, which a
    restarted torchrun group (``--max-restarts``) or ``--resume`` continues from.
    """
    kind = peer_failure(exc) if ranks.distributed else None
    if kind is None:
        return exc
    error = PeerLostError(_peer_lost_message(ranks, kind, timeout, run_dir, exc))
    error.__suppress_context__ = True  # as `raise … from None`: gloo's traceback is what this replaces
    # Drop the failed call's frames now: they hold the DDP wrapper, which must go before the process group does
    # (Trainer.close), not at interpreter exit, where tearing it down from a broken group takes seconds.
    exc.__traceback__ = None
    return error


def _peer_lost_message(ranks: Ranks, kind: str, timeout: float, run_dir: os.PathLike | str | None,
                       exc: BaseException) -> str:
    who = f"rank {ranks.rank} of {ranks.world_size}"
    if run_dir is None:  # while joining the others: nothing trained yet
        return f"{who}: could not connect to the other processes ({_gloo_detail(exc)})"
    if kind == "stalled":
        what = (f"{who}: another process sent nothing for --ddp-timeout {timeout:g}s (stopped, hung or swapping); "
                "stopped waiting. If it was only slow (rank 0 preparing a large corpus), raise --ddp-timeout or run "
                "`neurallm prepare` first")
    else:
        what = f"{who}: another process died ({_gloo_detail(exc)})"
    return (f"{what}. The last checkpoint in {run_dir} is intact: under torchrun --max-restarts N the group restarts "
            "and resumes from it; otherwise run the same command with --resume")


def _gloo_detail(exc: BaseException) -> str:
    """The gist of a gloo message: "[…/pair.cc:553] Connection closed by peer [127.0.0.1]:30945. This is …"
    gives "Connection closed by peer [127.0.0.1]:30945"."""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return message.rsplit("] ", 1)[-1].split(". ", 1)[0] if "gloo/" in message else message.split(". ", 1)[0]

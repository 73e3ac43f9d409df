"""One model, many requests: model calls run one at a time on a single thread, behind a bounded queue.

A model's forward pass is not safe to run from several threads at once (and on two cores it would not be
faster), so every request hands its model work to one worker thread. Up to ``max_queue`` requests may be
running or waiting; the next one is refused at once (the server answers 503 with Retry-After) rather than
piling up without bound. A request also carries a deadline: work still waiting when it passes is skipped,
and a generation in progress stops at the next token.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

T = TypeVar("T")


class QueueFull(Exception):
    """Every place in the queue is taken."""


class DeadlinePassed(Exception):
    """The request's time ran out (while it waited or while it ran)."""


class ShuttingDown(Exception):
    """The server is stopping: no new work is taken, and work in progress stops at its next token."""


@dataclass(eq=False)  # hashed by identity: the worker keeps a set of the admitted ones
class Deadline:
    """When a request must be done by; also lets the request's owner stop it early (a client that left)."""

    seconds: float
    started: float = field(default_factory=time.monotonic)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def check(self) -> None:
        """Raise :class:`DeadlinePassed` if the time is up or the request was cancelled."""
        if self.cancelled.is_set() or time.monotonic() - self.started > self.seconds:
            raise DeadlinePassed


class ModelWorker:
    """Runs submitted functions one at a time, in order, with at most ``max_queue`` admitted at once."""

    def __init__(self, max_queue: int) -> None:
        self.max_queue = max_queue
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="neurallm-model")
        self._slots = threading.BoundedSemaphore(max_queue)
        self._admitted: set[Deadline] = set()
        self._lock = threading.Lock()
        self.closing = False

    def submit(self, fn: Callable[..., T], *args, deadline: Deadline | None = None) -> Future:
        """Queue ``fn(*args)``; raises :class:`QueueFull` at once when ``max_queue`` calls are admitted, and
        :class:`ShuttingDown` once :meth:`shutdown` was called."""
        if self.closing:
            raise ShuttingDown
        if not self._slots.acquire(blocking=False):
            raise QueueFull

        def run() -> T:
            if deadline is not None:
                deadline.check()  # its time ran out while it waited: skip the work
            return fn(*args)

        with self._lock:
            try:
                future = self._executor.submit(run)
            except BaseException:
                self._slots.release()
                raise
            if deadline is not None:
                self._admitted.add(deadline)

        def finished(_: Future) -> None:
            with self._lock:
                self._admitted.discard(deadline)
            self._slots.release()

        future.add_done_callback(finished)
        return future

    def shutdown(self) -> None:
        """Take no more work and stop what is admitted at its next token (the server is stopping)."""
        with self._lock:
            self.closing = True
            for deadline in self._admitted:
                deadline.cancelled.set()
        self._executor.shutdown(wait=False, cancel_futures=True)

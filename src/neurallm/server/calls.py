"""Running model work for a request: on the worker thread, within the request's deadline, stopped when the
client leaves.

Both kinds of request go through :class:`ModelCalls`: :meth:`ModelCalls.answer` waits for one result (and
watches the connection meanwhile: a client that hung up stops its generation at the next token, as a stream's
does), :meth:`ModelCalls.stream` hands the items the work emits to an async iterator as they come. Every
future is awaited or has its outcome read, so an abandoned request leaves no "Future exception was never
retrieved" or "Task was destroyed but it is pending" in the log.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from typing import Any

from fastapi import Request

from neurallm.errors import NeurallmError
from neurallm.server.errors import ApiError
from neurallm.server.worker import Deadline, DeadlinePassed, ModelWorker, QueueFull, ShuttingDown

RETRY_AFTER_SECONDS = 2
# the worker enforces the deadline between tokens; this is the extra wait before a stuck call is given up on
TIMEOUT_GRACE_SECONDS = 5.0
_END = object()


class ClientGone(Exception):
    """The client closed the connection before the answer was ready."""


def _read_outcome(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()  # marks the exception as retrieved


class ModelCalls:
    """Submits request work to ``worker`` and maps its failures to :class:`ApiError`."""

    def __init__(self, worker: ModelWorker, timeout: float) -> None:
        self.worker, self.timeout = worker, timeout

    def timeout_error(self) -> ApiError:
        return ApiError(504, f"the request took longer than the server's --timeout {self.timeout:g} s; ask for fewer tokens",
                        code="timeout")

    def stopping_error(self) -> ApiError:
        return ApiError(503, "the server is stopping; send the request again once it is back",
                        headers={"Retry-After": str(RETRY_AFTER_SECONDS)}, code="shutting_down")

    def _submit(self, fn: Callable, deadline: Deadline) -> Future:
        try:
            return self.worker.submit(fn, deadline, deadline=deadline)
        except QueueFull:
            raise ApiError(503, f"the server is busy ({self.worker.max_queue} requests running or waiting); retry in a moment",
                           headers={"Retry-After": str(RETRY_AFTER_SECONDS)}, code="server_busy") from None
        except (ShuttingDown, RuntimeError):  # RuntimeError: the executor was shut down a moment earlier
            raise self.stopping_error() from None

    def _failure(self, exc: BaseException) -> ApiError:
        if isinstance(exc, (DeadlinePassed, asyncio.TimeoutError)):
            return self.stopping_error() if self.worker.closing else self.timeout_error()
        if isinstance(exc, asyncio.CancelledError):
            return self.stopping_error()
        if isinstance(exc, NeurallmError):
            return ApiError(422, str(exc))
        raise exc

    async def answer(self, request: Request, fn: Callable[[Deadline], Any]) -> Any:
        """``fn(deadline)`` on the worker; its result, or an ApiError (503 busy, 504 time out, 422 bad input).

        While it waits, the connection is watched: a client that leaves cancels the deadline, so a generation
        stops at its next token instead of holding the worker for the requests behind it.
        """
        deadline = Deadline(self.timeout)
        done = asyncio.wrap_future(self._submit(fn, deadline))
        done.add_done_callback(_read_outcome)
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            finished, _ = await asyncio.wait({done, gone}, timeout=self.timeout + TIMEOUT_GRACE_SECONDS,
                                             return_when=asyncio.FIRST_COMPLETED)
            if done in finished:
                try:
                    return done.result()
                except BaseException as exc:  # noqa: BLE001  (mapped or re-raised)
                    raise self._failure(exc) from None
            if gone in finished:
                raise ClientGone
            raise self.timeout_error()
        finally:
            deadline.cancelled.set()  # whatever ended the wait, the work stops at its next token
            gone.cancel()

    async def stream(self, fn: Callable[[Deadline, Callable[[Any], None]], Any]) -> AsyncIterator[Any]:
        """Run ``fn(deadline, emit)`` on the worker; an async iterator of what it emits, then of its result.

        Refusals (busy, stopping) are raised here, before the response starts; failures while it runs are raised
        from the iterator. Leaving the iterator early (a client that left) stops the work at its next token.
        """
        loop = asyncio.get_running_loop()
        items: asyncio.Queue = asyncio.Queue()
        deadline = Deadline(self.timeout)

        def emit(item: Any) -> None:
            loop.call_soon_threadsafe(items.put_nowait, (True, item))

        def work(deadline: Deadline) -> None:
            # the outcome travels through the queue, so the future never holds an exception nobody reads
            try:
                result = fn(deadline, emit)
            except BaseException as exc:  # noqa: BLE001
                loop.call_soon_threadsafe(items.put_nowait, (False, exc))
            else:
                loop.call_soon_threadsafe(items.put_nowait, (False, _End(result)))

        def skipped(future: Future) -> None:
            # the work never ran: its time ran out while it waited, or the server stopped before it started
            failure = DeadlinePassed() if future.cancelled() else future.exception()
            if failure is not None:
                try:
                    loop.call_soon_threadsafe(items.put_nowait, (False, failure))
                except RuntimeError:  # the event loop has closed: nobody is waiting
                    pass

        self._submit(work, deadline).add_done_callback(skipped)
        return self._drain(items, deadline)

    async def _drain(self, items: asyncio.Queue, deadline: Deadline) -> AsyncIterator[Any]:
        try:
            while True:
                try:
                    is_item, value = await asyncio.wait_for(items.get(), self.timeout + TIMEOUT_GRACE_SECONDS)
                except asyncio.TimeoutError:
                    raise self.timeout_error() from None
                if is_item:
                    yield value
                elif isinstance(value, _End):
                    yield value
                    return
                else:
                    raise self._failure(value)
        finally:
            deadline.cancelled.set()


class _End:
    """The last item of a stream: the work's result."""

    def __init__(self, result: Any) -> None:
        self.result = result


def is_end(item: Any) -> bool:
    return isinstance(item, _End)


async def _disconnected(request: Request) -> None:
    """Return when the client closes the connection (the body has been read by then)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return

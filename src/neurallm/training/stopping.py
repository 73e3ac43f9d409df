"""Clean stops on Ctrl-C and SIGTERM (what ``timeout``, docker, systemd and SLURM send)."""

from __future__ import annotations

import signal
import threading


class StopRequest:
    """First Ctrl-C or SIGTERM: finish the step, save and stop cleanly. A second Ctrl-C: abort at once.

    SIGTERM never aborts: torchrun answers a Ctrl-C by sending SIGTERM to workers that already got the SIGINT,
    and that must not turn a clean stop into an abort. The previous handlers come back on exit.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self.reason = ""  # "Ctrl-C" or "SIGTERM", for the message
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.reason = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)

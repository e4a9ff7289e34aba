"""The one stop handler: the first SIGTERM/SIGINT asks the run to checkpoint and stop at a step
all ranks agree on; a second one stops at once (the signal's default action)."""

from __future__ import annotations

import os
import signal
import threading
from typing import Callable

from kiln.tracking.console import print_line


class StopRequest:
    """Installed for the duration of a run (`with StopRequest(...) as stop:`), then the previous
    handlers come back (a sweep's next trial, a test process). `on_stop` runs on the first signal
    (the Ray launcher tells its workers there)."""

    def __init__(self, what: str, on_stop: Callable[[], None] | None = None):
        self.what, self.on_stop = what, on_stop
        self.event = threading.Event()
        self._previous: dict = {}

    def is_set(self) -> bool:
        return self.event.is_set()

    def _handle(self, signum, frame) -> None:
        if self.event.is_set():
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.event.set()
        print_line(f"{signal.Signals(signum).name}: {self.what} (send it again to stop at once)")
        if self.on_stop is not None:
            self.on_stop()

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # signals reach only the main thread
            self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

"""Stopping a run cleanly on SIGTERM (a preemption notice) or SIGINT.

The handlers only record the signal; the training loop looks at `requested` between steps,
stops there and saves that step. Signals that arrive after the first, while the state is
being saved, are recorded and ignored, so a scheduler that repeats its notice or a second
Ctrl-C cannot cut the checkpoint's commit short. The handlers are put back once the save
has committed.

In a multi-process job the signal may reach one process only: `parallel.preemption` has
every process stop at the same step once any of them has one. Handlers can only be
installed from the main thread; elsewhere this does nothing.
"""

from __future__ import annotations

import signal
import threading

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    def __init__(self):
        self.requested: int | None = None  # the first signal's number
        self.ignored = 0
        self._previous: dict = {}

    def _handler(self, signum, frame) -> None:
        if self.requested is None:
            self.requested = signum
        else:
            self.ignored += 1

    def install(self) -> StopSignals:
        if not self._previous and threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handler)
        return self

    def restore(self) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous.clear()

    def reason(self) -> str:
        """How the stop is reported; a process of a job may stop for another's signal."""
        if self.requested is None:
            return "stopped by a signal to another process of the job"
        return f"stopped by {signal.Signals(self.requested).name}"

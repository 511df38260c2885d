"""SIGTERM and Ctrl-C (SIGINT): stop the worker cleanly; a second signal exits at once.

First signal: the running trial stops within one batch, is failed and re-queued, and resumes
from its last epoch checkpoint on whichever worker takes it next; the worker then exits. With
`--finish-trial-on-signal` the running trial is finished first instead. Either way no new trial
starts. Second signal: the process exits on the spot; the trial it leaves RUNNING is failed and
re-queued by another worker's sweep once its heartbeat is older than the grace period.

The handler only sets a flag and writes with `os.write`: printing through Python's buffered
streams from a signal handler can deadlock against the main thread holding the same lock.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    def __init__(self, finish_trial: bool = False, grace_period: float | None = None,
                 prefix: str = "") -> None:
        self.finish_trial = finish_trial
        self.grace_period = grace_period
        self.prefix = prefix  # "w1 " for one of several processes sharing a terminal
        self.signal_name: str | None = None
        self._event = threading.Event()
        self._count = 0
        self._previous: dict[int, object] = {}

    def install(self) -> "StopRequest":
        # Python delivers signals to the main thread only; elsewhere (a test thread) do nothing.
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def stop_training(self) -> bool:
        """Asked before every batch: should the running trial stop now?"""
        return self._event.is_set() and not self.finish_trial

    def wait(self, seconds: float) -> bool:
        """Sleep up to `seconds`, waking at once on a signal; True if stopping."""
        return self._event.wait(seconds)

    def request(self, name: str = "request") -> None:
        """Stop as a first signal would (for callers that are not signals)."""
        self.signal_name = self.signal_name or name
        self._event.set()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self._count += 1
        name = signal.Signals(signum).name
        if self._count > 1:
            later = (f" once its heartbeat is {self.grace_period:g} s old" if self.grace_period else "")
            os.write(2, f"{self.prefix}hpsearch: second {name}: exiting now; the running trial (if any) is failed "
                        f"and re-queued by the next worker{later}\n".encode())
            os._exit(128 + signum)
        self.request(name)
        what = ("finishing the running trial, then exiting" if self.finish_trial
                else "stopping the running trial (it is re-queued and resumes from its last epoch)")
        os.write(2, f"{self.prefix}hpsearch: {name}: {what}; send it again to exit at once\n".encode())

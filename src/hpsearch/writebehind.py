"""A worker's trial writes sent behind its back: the worker trains on while they travel.

Optuna's storage protocol makes one call per parameter, user attribute and report, and waits for
each: about 35 writes per trial here, 5 ms each through the proxy (a gRPC call, then a database
transaction) and 3 ms on PostgreSQL directly, so 100-190 ms of every trial was the worker waiting
on round trips (BENCHMARKS.md, section 5). Nobody needs those writes to have landed before the
worker goes on, except the worker itself at a few known points. `WriteBehind` wraps the worker's
storage (`RetryingStorage`, so outages are still waited out) and:

- **queues** the trial writes (`set_trial_param`, `set_trial_user_attr`, `set_trial_system_attr`,
  `set_trial_intermediate_value`) and returns at once; a background thread sends them, a few at a
  time. A later write of the same key replaces a queued one that has not left yet (the learning
  curve, rewritten every epoch, is sent once if two epochs queue up); a key is never sent twice at
  once, so the last value written is the one stored.
- **waits for a trial's queued writes** before reading that trial (`get_trial`: Optuna's `tell`
  reads the trial for its last reported value first) and before changing its state. So a trial is
  never finished with writes still on the way, and `tell`, a sweep's `tell` and the dashboard see
  every parameter, report and attribute of a finished trial. Reads of the trial list
  (`get_all_trials`: the sampler, the pruner, the budget) do not wait: other trials are not written
  here, and the running trial's own values are in Optuna's `Trial` already.
- **raises a write's error at the next call for that trial**: a write refused because another
  worker failed the trial meanwhile (`UpdateFinishedTrialError`) surfaces at the trial's next
  report or attribute, or at its `tell`, just as when the write itself raised it; queued writes
  of that trial are then dropped. The storage gone for longer than `reconnect_timeout` stops the
  worker, as before.
- `then(callback, trial_id)` runs a callback once every write queued before it has landed, and
  only if no write of that trial was refused: the epoch checkpoint's old file is removed only
  after the pointer to the new one is stored (checkpoint.py), and never when the trial was taken
  over meanwhile (its re-queued copy resumes from that old file).

What a crash loses: a worker killed with writes still queued (milliseconds' worth) loses them, as
it loses the epoch it was training. Its trial is RUNNING with a lapsing lease either way; the
sweep re-queues it, and the copy resumes from the last checkpoint whose pointer landed.
Everything else is delegated, unchanged, by Optuna's public storage interface.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from optuna.distributions import BaseDistribution
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState

from hpsearch.storage import delegating

log = logging.getLogger("hpsearch.writebehind")

Key = tuple[int, str, Any]  # (trial id, method, the key written: a name or a step)
Write = tuple[str, tuple]  # (method, its arguments)
SENDERS = 4  # writes in flight at once (the worker picks 8 through a proxy, 2 on a database)


class _WriteBehind(BaseStorage):
    """`inner` with the trial writes queued and sent by a background thread (module docstring);
    every other method is delegated (`WriteBehind` below)."""

    def __init__(self, inner: BaseStorage, senders: int = SENDERS) -> None:
        if senders < 1:
            raise ValueError(f"senders must be >= 1, got {senders}")
        self.inner = inner
        self.senders = senders
        # Queued work in order: dicts of writes (sent together, a few at a time) and callbacks.
        self._queue: collections.deque[dict[Key, Write] | tuple[int | None, Callable[[], None]]] = \
            collections.deque()
        self._open: collections.Counter[int] = collections.Counter()  # per trial: queued + in flight
        self._failed: dict[int, BaseException] = {}  # per trial: a write's error, raised once
        self._refused: set[int] = set()  # trials a write of which failed: their callbacks do not run
        self._busy = False  # the sender holds a part of the queue
        self._closed = False
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._ids: dict[tuple[int, int], int] = {}  # (study id, trial number) -> trial id
        self._made: dict[int, int] = {}  # trial id -> study id: trials made here, not read yet

    # --- the queue ------------------------------------------------------------------------
    def _defer(self, trial_id: int, method: str, key: Any, *args: Any) -> None:
        with self._changed:
            self._raise_failed(trial_id, clear=False)
            if not self._queue or isinstance(self._queue[-1], tuple):
                self._queue.append({})
            part = self._queue[-1]
            k = (trial_id, method, key)
            if k not in part:
                self._open[trial_id] += 1
            part[k] = (method, (trial_id, *args))
            self._start()
            self._changed.notify_all()

    def then(self, callback: Callable[[], None], trial_id: int | None = None) -> None:
        """Run `callback` (in the background) once every write queued so far has been sent, unless
        a write of `trial_id` failed."""
        with self._changed:
            self._queue.append((trial_id, callback))
            self._start()
            self._changed.notify_all()

    def flush(self, trial_id: int | None = None) -> None:
        """Wait until the writes queued so far (of `trial_id`, or all) have been sent."""
        with self._changed:
            if trial_id is None:
                self._changed.wait_for(lambda: not self._queue and not self._busy)
            else:
                self._changed.wait_for(lambda: self._open[trial_id] == 0)
                del self._open[trial_id]

    def _raise_failed(self, trial_id: int, clear: bool) -> None:
        error = self._failed.pop(trial_id, None) if clear else self._failed.get(trial_id)
        if error is not None:
            raise error

    def _start(self) -> None:
        if self._thread is None:
            self._pool = ThreadPoolExecutor(self.senders, thread_name_prefix="hpsearch-write")
            self._thread = threading.Thread(target=self._run, name="hpsearch-write-behind", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: bool(self._queue) or self._closed)
                if not self._queue:
                    return  # closed
                part = self._queue.popleft()
                self._busy = True
            try:
                if isinstance(part, tuple):
                    self._callback(*part)
                else:
                    self._send(part)
            finally:
                with self._changed:
                    self._busy = False
                    self._changed.notify_all()

    def _send(self, part: dict[Key, Write]) -> None:
        assert self._pool is not None
        keys = list(part)
        errors = list(self._pool.map(self._one, [part[k] for k in keys]))
        with self._changed:
            for (trial_id, _, _), error in zip(keys, errors):
                self._open[trial_id] -= 1
                if error is not None and trial_id not in self._failed:
                    self._failed[trial_id] = error
                    if len(self._refused) >= 10_000:
                        self._refused.clear()
                    self._refused.add(trial_id)
                    self._drop(trial_id)

    def _one(self, write: Write) -> BaseException | None:
        method, args = write
        try:
            getattr(self.inner, method)(*args)
            return None
        except Exception as e:  # raised in the worker's thread at its next call for the trial
            return e

    def _drop(self, trial_id: int) -> None:
        """A write of the trial failed: its queued writes are not sent (under the lock)."""
        for part in self._queue:
            if isinstance(part, tuple):
                continue
            for k in [k for k in part if k[0] == trial_id]:
                del part[k]
                self._open[trial_id] -= 1

    def _callback(self, trial_id: int | None, callback: Callable[[], None]) -> None:
        with self._changed:
            if trial_id in self._refused:
                return
        try:
            callback()
        except Exception:  # housekeeping (an old checkpoint file): never the worker's end
            log.warning("write-behind callback %r failed", callback, exc_info=True)

    # --- the trial writes: queued -----------------------------------------------------------
    def set_trial_param(self, trial_id: int, param_name: str, param_value_internal: float,
                        distribution: BaseDistribution) -> None:
        self._defer(trial_id, "set_trial_param", param_name, param_name, param_value_internal, distribution)

    def set_trial_intermediate_value(self, trial_id: int, step: int, intermediate_value: float) -> None:
        self._defer(trial_id, "set_trial_intermediate_value", step, step, intermediate_value)

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        json.dumps(value)  # a value the storage cannot store fails here, where it was set
        self._defer(trial_id, "set_trial_user_attr", key, key, value)

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        json.dumps(value)
        self._defer(trial_id, "set_trial_system_attr", key, key, value)

    # --- the points that wait for a trial's writes ------------------------------------------
    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        trial_id = self.inner.create_new_trial(study_id, template_trial)
        with self._changed:
            if len(self._made) >= 1_000:
                self._made.clear()
            self._made[trial_id] = study_id  # its number comes with its first read (Optuna's Trial reads it)
        return trial_id

    def get_trial(self, trial_id: int) -> FrozenTrial:
        self.flush(trial_id)
        trial = self.inner.get_trial(trial_id)
        with self._changed:
            study_id = self._made.pop(trial_id, None)
        if study_id is not None:
            self._remember((study_id, trial.number), trial_id)  # the slot claim's lookup, answered here
        return trial

    def set_trial_state_values(self, trial_id: int, state: TrialState, values: Any = None) -> bool:
        self.flush(trial_id)
        with self._changed:
            self._raise_failed(trial_id, clear=True)
        return self.inner.set_trial_state_values(trial_id, state, values)

    # A trial's id never changes: asked of the storage once (the slot claim, the resume check
    # and a tell by number each look it up).
    def get_trial_id_from_study_id_trial_number(self, study_id: int, trial_number: int) -> int:
        key = (study_id, trial_number)
        tid = self._ids.get(key)
        if tid is None:
            tid = self.inner.get_trial_id_from_study_id_trial_number(study_id, trial_number)
            self._remember(key, tid)
        return tid

    def _remember(self, key: tuple[int, int], trial_id: int) -> None:
        if len(self._ids) >= 10_000:
            self._ids.clear()
        self._ids[key] = trial_id

    # --- hpsearch's own extras of RetryingStorage -------------------------------------------
    def record_lease(self, trial_id: int, key: str, value: Any) -> bool:
        return self.inner.record_lease(trial_id, key, value)  # a beat is due now, not queued

    def close(self, flush: bool = True) -> None:
        """Send what is queued (unless `flush` is False: a worker leaving on an error drops it),
        stop the sender and close `inner`, giving back its connections (SQLite then folds its
        write-ahead log into the database file)."""
        if flush:
            self.flush()
        with self._changed:
            self._closed = True
            self._queue.clear()
            self._changed.notify_all()
        if self._thread is not None and flush:
            self._thread.join()
        if self._pool is not None:
            self._pool.shutdown(wait=flush)
        self.inner.close()


# Every other abstract method of Optuna's storage interface (the reads of the trial list, study
# attributes, trial creation) goes straight to `inner`; so does `get_n_trials`, which `inner`
# answers better than BaseStorage's default (it reads every trial).
WriteBehind = delegating(_WriteBehind, "WriteBehind", also=("get_n_trials", "remove_session"))


def then(storage: BaseStorage, callback: Callable[[], None], trial_id: int | None = None) -> None:
    """`callback` once the writes made so far through `storage` have landed, unless one of trial
    `trial_id` was refused: at once on a storage that writes as it is called (where a refused
    write raised in the caller instead)."""
    if isinstance(storage, _WriteBehind):
        storage.then(callback, trial_id)
    else:
        callback()


def flush(storage: BaseStorage) -> None:
    """Wait for every write queued through `storage` (nothing to wait for on another storage)."""
    if isinstance(storage, _WriteBehind):
        storage.flush()

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
- **sends the tell behind the trial's writes**: the state change of a trial run here (made or
  taken by this worker) is queued after that trial's writes and sent once they have landed, so a
  trial is never finished with writes still on the way, and a sweep's `tell` and the dashboard see
  every parameter, report and attribute of a finished trial. The worker does not wait for any of
  it: it creates, reads and samples its next trial while they travel.
- **sends a trial's tail after the next trial has begun**: a trial's last writes and its tell come
  in one burst as it ends, just before the worker creates the next trial, reads the trial list and
  samples, all of which it waits on. Sent at once, the burst would be served first by the proxy
  or the database, and the worker would wait on it all the same. So a write waits `DELAY_S` for
  the rest of its burst, after a tell the queue waits for the next trial's first write (its
  sampler has run by then; `HOLD_S` at most), nothing new is sent while the worker waits on a
  call of its own (`PATIENCE_S` at most: threads sharing a storage wait on calls nearly all the
  time between them), and a flush sends at once. Two writes travel at once: nothing waits on them.
- **reads a trial run here as written and told**: until its queue drains, such a trial is answered
  from a shadow (the trial as last read, with every write and the tell made here since applied;
  `get_trial`), and it appears so in reads of the trial list (`get_all_trials`): Optuna's `tell`
  reads the trial first, the sampler must see the previous trial finished as a sequential search
  would, and the budget count must see it finished. Only this worker writes its running trial;
  the one exception, another worker's sweep failing it when its lease looked late, makes the
  storage refuse the next write or the tell. A trial not run here (another's, failed by a sweep
  here) is read from the storage once the writes made to it here have landed.
- **raises a write's error at the next call for that trial**: a write refused because another
  worker failed the trial meanwhile (`UpdateFinishedTrialError`) surfaces at the trial's next
  report or attribute, or at its `tell`, just as when the write itself raised it; queued writes
  of that trial are then dropped. A tell refused after it was queued comes back from `lost()`,
  and the worker notes it (worker.py). The storage gone for longer than `reconnect_timeout` stops
  the worker, as before.
- `then(callback, trial_id)` runs a callback once every write queued before it has landed, and
  only if no write of that trial was refused: the epoch checkpoint's old file is removed only
  after the pointer to the new one is stored (checkpoint.py), and never when the trial was taken
  over meanwhile (its re-queued copy resumes from that old file).

What a crash loses: a worker killed with writes or a tell still queued (under a second's worth)
loses them, as it loses the epoch it was training. Its trial is RUNNING with a lapsing lease either way; the
sweep re-queues it, and the copy resumes from the last checkpoint whose pointer landed.
Everything else is delegated, unchanged, by Optuna's public storage interface.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import json
import logging
import threading
import time
from collections.abc import Callable, Container, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any, NamedTuple

from optuna.distributions import BaseDistribution
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState

from hpsearch.storage import delegating

log = logging.getLogger("hpsearch.writebehind")

Key = tuple[int, str, Any]  # (trial id, method, the key written: a name or a step)
Write = tuple[str, tuple]  # (method, its arguments)
SENDERS = 4  # writes in flight at once (the worker picks 2; 8 through a proxy when its tell waits)
# When to send, so that a trial's tail does not hold up the next trial: a trial's last writes and
# its tell come in one burst as it ends, just before the worker creates the next trial, reads the
# trial list and samples, all of which it waits on. Sent at once, the burst would be served first
# (by the proxy or the database) and the worker would wait on it all the same.
DELAY_S = 0.05  # a write waits this long for the rest of its burst before the queue sends
HOLD_S = 0.5  # after a tell, the queue waits at most this long for the next trial's first write
# ... and while a call is waited on, at most this long after the queue got work: workers that share
# one storage (threads in a process) are nearly always waiting on some call between them, and the
# queue must drain all the same (a tell held longer lets the trial's lease lapse: it is no longer
# renewed once told).
PATIENCE_S = 1.0


class _Tell(NamedTuple):
    """A queued tell: the trial's state change, sent once its writes queued before it landed."""

    trial_id: int
    state: TrialState
    values: Any


class Lost(NamedTuple):
    """A tell sent behind that the storage refused: the trial was finished elsewhere meanwhile
    (another worker's sweep failed it when its lease looked late)."""

    number: int
    state: TrialState
    error: BaseException


class _Shadow:
    """A trial run here as this worker wrote it: the trial as last read, with every write made
    here since applied. Only this worker writes its running trial (a sweep elsewhere may fail it,
    and then the next write or the tell is refused), so this is what the storage holds once the
    queue has drained."""

    def __init__(self, trial_id: int, read: FrozenTrial) -> None:
        self.trial_id = trial_id
        self.reset(read)

    def reset(self, read: FrozenTrial) -> None:
        self.read = read
        self.params = dict(read.params)
        self.distributions = dict(read.distributions)
        self.user_attrs = dict(read.user_attrs)
        self.system_attrs = dict(read.system_attrs)
        self.intermediate_values = dict(read.intermediate_values)
        self.state, self.values, self.complete = read.state, read.values, read.datetime_complete

    def write(self, method: str, key: Any, args: tuple) -> None:
        if method == "set_trial_param":
            internal, distribution = args
            self.params[key] = distribution.to_external_repr(internal)
            self.distributions[key] = distribution
        elif method == "set_trial_intermediate_value":
            self.intermediate_values[key] = args[0]
        elif method == "set_trial_user_attr":
            self.user_attrs[key] = copy.deepcopy(args[0])
        elif method == "set_trial_system_attr":
            self.system_attrs[key] = copy.deepcopy(args[0])

    def frozen(self) -> FrozenTrial:
        return FrozenTrial(
            number=self.read.number, state=self.state, value=None, values=self.values,
            datetime_start=self.read.datetime_start, datetime_complete=self.complete,
            params=dict(self.params), distributions=dict(self.distributions),
            user_attrs=copy.deepcopy(self.user_attrs), system_attrs=copy.deepcopy(self.system_attrs),
            intermediate_values=dict(self.intermediate_values), trial_id=self.trial_id)


class _WriteBehind(BaseStorage):
    """`inner` with the trial writes queued and sent by a background thread (module docstring);
    every other method is delegated (`WriteBehind` below)."""

    def __init__(self, inner: BaseStorage, senders: int = SENDERS, tell_behind: bool = True) -> None:
        if senders < 1:
            raise ValueError(f"senders must be >= 1, got {senders}")
        self.inner = inner
        self.senders = senders
        self.tell_behind = tell_behind  # False: a tell waits for the trial's writes, then is sent
        # Queued work in order: dicts of writes (sent together, a few at a time), callbacks and
        # tells (`_Tell`, a tuple too: a barrier like a callback).
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
        self._fresh: set[int] = set()  # trials made or started here: shadowed from their next read
        self._shadows: dict[int, _Shadow] = {}  # trials running here (and told, until the tell lands)
        self._telling: dict[int, _Shadow] = {}  # trials told here whose tell has not landed yet
        self._lost: list[Lost] = []  # tells refused after they were queued, until `lost()` takes them
        self._dirty_since: float | None = None  # monotonic time the queue last went from empty to not
        self._hold_until: float | None = None  # after a tell: until the next trial's first write (HOLD_S)
        self._waited = 0  # calls the worker waits on, under way: the queue sends nothing new meanwhile
        self._urgent = 0  # flushes waiting: the queue sends at once

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
            shadow = self._shadows.get(trial_id)
            if shadow is not None:
                shadow.write(method, key, args[1:])
            if trial_id not in self._telling:
                self._hold_until = None  # the next trial has begun to write: its sampler has run
            self._dirty()
            self._start()
            self._changed.notify_all()

    def then(self, callback: Callable[[], None], trial_id: int | None = None) -> None:
        """Run `callback` (in the background) once every write queued so far has been sent, unless
        a write of `trial_id` failed."""
        with self._changed:
            self._queue.append((trial_id, callback))
            self._dirty()
            self._start()
            self._changed.notify_all()

    def flush(self, trial_id: int | None = None) -> None:
        """Wait until the writes queued so far (of `trial_id`, or all) have been sent."""
        with self._changed:
            self._urgent += 1
            self._changed.notify_all()
            try:
                if trial_id is None:
                    self._changed.wait_for(lambda: not self._queue and not self._busy)
                else:
                    self._changed.wait_for(lambda: self._open[trial_id] == 0)
                    del self._open[trial_id]
            finally:
                self._urgent -= 1

    def _dirty(self) -> None:
        if self._dirty_since is None:
            self._dirty_since = time.monotonic()

    def _wait_s(self) -> float | None:
        """How long the sender waits before it takes the next part of the queue (0: now, None:
        until something changes); under the lock."""
        if not self._queue:
            return None
        if self._urgent:
            return 0.0
        now = time.monotonic()
        dirty = self._dirty_since if self._dirty_since is not None else now
        if self._waited and now < dirty + PATIENCE_S:
            return dirty + PATIENCE_S - now  # or until the call returns
        until = dirty + DELAY_S
        if self._hold_until is not None:
            until = max(until, self._hold_until)
        return max(0.0, until - now)

    @contextlib.contextmanager
    def _waiting(self) -> Iterator[None]:
        """Around a call the worker waits on: nothing new is sent until it returns (or for
        `PATIENCE_S` since the queue got work)."""
        with self._changed:
            self._waited += 1
        try:
            yield
        finally:
            with self._changed:
                self._waited -= 1
                self._changed.notify_all()

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
                while not self._closed:
                    wait = self._wait_s()
                    if wait == 0.0:
                        break
                    self._changed.wait(wait)
                if not self._queue:
                    return  # closed
                part = self._queue.popleft()
                self._busy = True
            try:
                if isinstance(part, _Tell):
                    self._tell(part)
                elif isinstance(part, tuple):
                    self._callback(*part)
                else:
                    self._send(part)
            finally:
                with self._changed:
                    self._busy = False
                    if not self._queue:
                        self._dirty_since = None
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
                    if trial_id not in self._telling:  # read from the storage from now on
                        self._shadows.pop(trial_id, None)
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
        """A write of the trial failed: its queued writes are not sent (under the lock); a queued
        tell of it is not sent either, and comes back from `lost()` (`_tell`)."""
        for part in self._queue:
            if isinstance(part, tuple):
                continue
            for k in [k for k in part if k[0] == trial_id]:
                del part[k]
                self._open[trial_id] -= 1

    def _tell(self, tell: _Tell) -> None:
        with self._changed:
            error = self._failed.pop(tell.trial_id, None) if tell.trial_id in self._refused else None
        if error is None:
            try:
                self.inner.set_trial_state_values(tell.trial_id, tell.state, tell.values)
            except Exception as e:  # refused (finished elsewhere) or the storage gone for good
                error = e
        with self._changed:
            shadow = self._telling.pop(tell.trial_id)
            self._shadows.pop(tell.trial_id, None)
            self._open[tell.trial_id] -= 1
            if error is not None:
                log.warning("trial %d: its tell did not land: %s", shadow.read.number, error)
                self._lost.append(Lost(shadow.read.number, tell.state, error))
            self._changed.notify_all()

    def lost(self) -> list[Lost]:
        """The tells sent behind that the storage refused since the last call."""
        with self._changed:
            taken, self._lost = self._lost, []
        return taken

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
        with self._waiting():
            trial_id = self.inner.create_new_trial(study_id, template_trial)
        with self._changed:
            if len(self._made) >= 1_000:
                self._made.clear()
            self._made[trial_id] = study_id  # its number comes with its first read (Optuna's Trial reads it)
            self._mark_fresh(trial_id)
        return trial_id

    def _mark_fresh(self, trial_id: int) -> None:
        if not self.tell_behind:
            return
        if len(self._fresh) >= 1_000:
            self._fresh.clear()
        self._fresh.add(trial_id)

    def get_trial(self, trial_id: int) -> FrozenTrial:
        with self._changed:
            shadow = self._shadows.get(trial_id)
            if shadow is not None and self._open[trial_id] > 0 and trial_id not in self._failed:
                return shadow.frozen()  # as it will be stored once its queued writes land
        self.flush(trial_id)
        with self._waiting():
            trial = self.inner.get_trial(trial_id)
        with self._changed:
            study_id = self._made.pop(trial_id, None)
            if trial_id in self._fresh and trial.state == TrialState.RUNNING:
                self._fresh.discard(trial_id)
                if len(self._shadows) >= 1_000:  # trials left running by an error in Optuna's ask
                    self._shadows = {k: v for k, v in self._shadows.items() if k in self._telling}
                self._shadows[trial_id] = _Shadow(trial_id, copy.deepcopy(trial))
            elif trial_id in self._shadows and trial_id not in self._telling:
                self._shadows[trial_id].reset(copy.deepcopy(trial))  # its lease, as stored
        if study_id is not None:
            self._remember((study_id, trial.number), trial_id)  # the slot claim's lookup, answered here
        return trial

    def set_trial_state_values(self, trial_id: int, state: TrialState, values: Any = None) -> bool:
        with self._changed:
            shadow = self._shadows.get(trial_id)
            if state.is_finished() and shadow is not None and trial_id not in self._telling:
                self._raise_failed(trial_id, clear=True)
                # The tell of a trial run here, sent behind its last writes: the worker goes on to
                # the next trial while they land, and reads meanwhile see this trial finished.
                shadow.state, shadow.values, shadow.complete = state, values, datetime.now()
                self._telling[trial_id] = shadow
                self._open[trial_id] += 1
                self._queue.append(_Tell(trial_id, state, values))
                self._dirty()
                self._hold_until = time.monotonic() + HOLD_S
                self._start()
                self._changed.notify_all()
                return True
        self.flush(trial_id)
        with self._changed:
            self._raise_failed(trial_id, clear=True)
        changed = self.inner.set_trial_state_values(trial_id, state, values)
        if changed and state == TrialState.RUNNING:  # a re-queued trial taken here
            with self._changed:
                self._mark_fresh(trial_id)
        return changed

    def get_all_trials(self, study_id: int, deepcopy: bool = True,
                       states: Container[TrialState] | None = None) -> list[FrozenTrial]:
        with self._changed:
            telling = list(self._telling.values())
        if not telling:
            with self._waiting():
                return self.inner.get_all_trials(study_id, deepcopy=deepcopy, states=states)
        # A trial told here reads as told, though its tell may still be on its way.
        with self._waiting():
            trials = list(self.inner.get_all_trials(study_id, deepcopy=deepcopy))
        for shadow in telling:
            n = shadow.read.number
            if n < len(trials) and trials[n].number == n and not trials[n].state.is_finished() \
                    and trials[n].datetime_start == shadow.read.datetime_start:  # this study's trial n
                trials[n] = shadow.frozen()
        return trials if states is None else [t for t in trials if t.state in states]

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
        written = self.inner.record_lease(trial_id, key, value)  # a beat is due now, not queued
        with self._changed:
            shadow = self._shadows.get(trial_id)
            if written and shadow is not None:
                shadow.system_attrs[key] = copy.deepcopy(value)
        return written

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


def lost(storage: BaseStorage) -> list[Lost]:
    """The tells sent behind through `storage` that were refused since the last call (none on a
    storage that writes as it is called: there a refused tell raised in the caller)."""
    return storage.lost() if isinstance(storage, _WriteBehind) else []


def flush(storage: BaseStorage) -> None:
    """Wait for every write queued through `storage` (nothing to wait for on another storage)."""
    if isinstance(storage, _WriteBehind):
        storage.flush()

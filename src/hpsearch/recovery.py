"""Trials whose worker is gone: find them, fail them, queue a copy that resumes from a checkpoint.

A running trial holds a lease: the system attribute `hpsearch:lease`, the wall-clock time its
worker last wrote it, renewed every `heartbeat_interval` seconds by a thread (`Lease`). It is an
ordinary trial attribute written through Optuna's public storage API, so it works the same on
SQLite, PostgreSQL and through the gRPC proxy (which cannot carry Optuna's own heartbeats).
Three ways a trial is left behind, and who picks it up:
- its worker died (kill -9, node lost, proxy or network gone for good): the lease is no longer
  renewed; once it is older than `grace_period` any worker's sweep fails the trial and queues a
  copy (WAITING, same parameters, system attrs `failed_trial` / `retry_history`, the user
  attributes and reported values inherited, at most `max_retry` times). Workers sweep when they
  start, before every trial and while they wait, at most once per heartbeat interval. Nodes'
  clocks must agree to well within the grace period (NTP does).
- its worker died between creating the trial and its first lease: `Sweeper` fails it once this
  worker has seen it without a lease for a whole grace period (its own clock).
- its worker was stopped (SIGTERM, Ctrl-C): the worker fails the trial and queues the copy itself
  (`requeue`), with no retry limit: being stopped is not the trial's fault.
The copy inherits the trial's `epoch_checkpoint` user attribute, which is where it resumes.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

log = logging.getLogger("hpsearch.recovery")

LEASE = "hpsearch:lease"
OVER_BUDGET = "hpsearch:over_budget"  # system attr of a trial that lost the race for the last slot


def requeue(study: optuna.Study, trial: FrozenTrial, max_retry: int | None = None) -> bool:
    """Queue a copy of a failed trial, marked as Optuna's `RetryHeartbeatStaleTrialCallback`
    marks it (`failed_trial`, `retry_history`), without the dead trial's lease. False when the
    trial has been retried `max_retry` times already."""
    if OVER_BUDGET in trial.system_attrs:
        return False  # it never held a slot: nothing to re-run
    system_attrs: dict[str, Any] = {"failed_trial": trial.number, **trial.system_attrs}
    system_attrs.pop(LEASE, None)
    system_attrs["retry_history"] = [*system_attrs.get("retry_history", []), trial.number]
    if max_retry is not None and len(system_attrs["retry_history"]) > max_retry:
        return False
    study.add_trial(optuna.create_trial(
        state=TrialState.WAITING,
        params=trial.params,
        distributions=trial.distributions,
        user_attrs=trial.user_attrs,
        system_attrs=system_attrs,
        intermediate_values=trial.intermediate_values,
    ))
    return True


def retry_source(system_attrs: dict) -> int | None:
    """The number of the trial this one re-runs (the latest in its retry chain), or None."""
    history = system_attrs.get("retry_history") or []
    return history[-1] if history else None


def trial_id(storage: Any, study: optuna.Study, number: int) -> int:
    """A trial's storage id from its number, by the storage's public lookups."""
    sid = storage.get_study_id_from_name(study.study_name)
    return storage.get_trial_id_from_study_id_trial_number(sid, number)


class Lease:
    """Renew a running trial's lease every `interval` seconds in a thread, until `stop()`.

    The first renewal is written at once, by the thread: the worker does not wait for it, and a
    trial seen without a lease is failed only after a whole grace period (`Sweeper`). A renewal
    lost to an outage is written again one interval later; a trial that another worker has failed
    meanwhile (its lease had expired) ends the thread.
    """

    def __init__(self, storage: Any, trial_id: int, interval: float) -> None:
        self.storage = storage
        self.trial_id = trial_id
        self.interval = interval
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{trial_id}", daemon=True)

    def start(self) -> "Lease":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._done.set()
        if self._thread.is_alive():
            self._thread.join()

    def _renew(self) -> bool:
        try:
            self.storage.record_lease(self.trial_id, LEASE, time.time())
            return True
        except (optuna.exceptions.UpdateFinishedTrialError, KeyError, RuntimeError):
            return False  # finished or failed by another worker: nothing left to hold

    def _run(self) -> None:
        if not self._renew():
            return
        while not self._done.wait(self.interval):
            if not self._renew():
                return


class Sweeper:
    def __init__(self, study: optuna.Study, storage: Any, grace_period: float,
                 min_interval: float = 0.0, max_retry: int | None = None) -> None:
        self.study = study
        self.storage = storage
        self.grace_period = grace_period
        self.max_retry = max_retry
        # Sweeping more often than leases are renewed finds nothing new; with short trials and
        # many workers it is a visible share of the storage traffic (BENCHMARKS.md).
        self.min_interval = min_interval
        self._last = -math.inf
        self._no_lease_since: dict[int, float] = {}  # trial number -> when this worker first saw it
        self._sid: int | None = None

    def sweep(self) -> bool:
        """Fail trials whose lease expired (and queue their copies); False when skipped as too soon."""
        now = time.monotonic()
        if now - self._last < self.min_interval:
            return False
        self._last = now
        if self._sid is None:
            self._sid = self.storage.get_study_id_from_name(self.study.study_name)
        running = self.storage.get_all_trials(self._sid, deepcopy=False, states=(TrialState.RUNNING,))
        wall = time.time()
        stale: list[tuple[FrozenTrial, str]] = []
        seen: dict[int, float] = {}
        for t in running:
            lease = t.system_attrs.get(LEASE)
            if lease is not None:
                if wall - float(lease) > self.grace_period:
                    stale.append((t, f"its lease is {wall - float(lease):.0f} s old"))
                continue
            since = seen[t.number] = self._no_lease_since.get(t.number, now)
            if now - since > self.grace_period:
                stale.append((t, f"it had no lease for {self.grace_period} s"))
                del seen[t.number]
        self._no_lease_since = seen
        for trial, why in stale:
            self._fail_and_requeue(trial, why)
        return True

    def _fail_and_requeue(self, trial: FrozenTrial, why: str) -> None:
        tid = self.storage.get_trial_id_from_study_id_trial_number(self._sid, trial.number)
        try:
            if not self.storage.set_trial_state_values(tid, state=TrialState.FAIL):
                return
        except optuna.exceptions.UpdateFinishedTrialError:
            return  # another worker got there first, or it finished after all
        failed = self.storage.get_trial(tid)
        queued = requeue(self.study, failed, self.max_retry)
        log.warning("trial %d failed (%s)%s", trial.number, why,
                    "; re-queued" if queued else f"; not re-queued: retried {self.max_retry} times")

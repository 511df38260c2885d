"""Trials whose worker is gone: find them, fail them, queue a copy that resumes from a checkpoint.

Three ways a trial is left behind, and who picks it up:
- its worker died (kill -9, node lost): the heartbeat stops; after `grace_period` any worker's
  sweep fails it and Optuna's `RetryHeartbeatStaleTrialCallback` queues a copy (WAITING, same
  parameters, system attrs `failed_trial` / `retry_history`, the user attributes and reported
  values inherited). Workers sweep when they start, before every trial and while they wait, at
  most once per heartbeat interval.
- its worker died between creating the trial and its first heartbeat: Optuna never calls such a
  trial stale. `Sweeper` fails it once this worker has seen it without a heartbeat for a whole
  grace period (its own clock, so clocks on different nodes need not agree).
- its worker was stopped (SIGTERM, Ctrl-C): the worker fails the trial and queues the copy itself
  (`requeue`), with no retry limit: being stopped is not the trial's fault.
The copy inherits the trial's `epoch_checkpoint` user attribute, which is where it resumes.
"""

from __future__ import annotations

import copy
import logging
import math
import time
import warnings

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages._rdb import models
from optuna.storages._rdb.storage import _create_scoped_session
from optuna.trial import FrozenTrial, TrialState

log = logging.getLogger("hpsearch.recovery")


def requeue(study: optuna.Study, trial: FrozenTrial) -> None:
    """Queue a copy of a stopped trial, marked exactly as a heartbeat retry is (so the budget
    and the resume logic treat both alike)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        RetryHeartbeatStaleTrialCallback(max_retry=None, inherit_intermediate_values=True)(study, trial)


def retry_source(system_attrs: dict) -> int | None:
    """The number of the trial this one re-runs (the latest in its retry chain), or None."""
    history = system_attrs.get("retry_history") or []
    return history[-1] if history else None


class Sweeper:
    def __init__(self, study: optuna.Study, storage: RDBStorage, grace_period: float,
                 min_interval: float = 0.0) -> None:
        self.study = study
        self.storage = storage
        self.grace_period = grace_period
        # Sweeping more often than trials beat finds nothing new; with short trials and many
        # workers it is a visible share of the storage traffic (BENCHMARKS.md, overhead).
        self.min_interval = min_interval
        self._last = -math.inf
        self._no_beat_since: dict[int, float] = {}  # trial id -> when this worker first saw it

    def sweep(self) -> bool:
        """Fail stale trials (and queue their copies); False when skipped as too soon."""
        now = time.monotonic()
        if now - self._last < self.min_interval:
            return False
        self._last = now
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(self.study)
        self._sweep_never_beat()
        return True

    def _sweep_never_beat(self) -> None:
        study_id = self.study._study_id
        # One storage method call, so a database outage is retried like any other.
        ids = set(self.storage._call_with_retry("running_without_heartbeat", _running_without_heartbeat,
                                                study_id))
        now = time.monotonic()
        self._no_beat_since = {i: self._no_beat_since.get(i, now) for i in ids}
        for trial_id, since in list(self._no_beat_since.items()):
            if now - since <= self.grace_period:
                continue
            del self._no_beat_since[trial_id]
            try:
                if not self.storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                    continue
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # another worker got there first, or it finished after all
            trial = copy.deepcopy(self.storage.get_trial(trial_id))
            log.warning("trial %d never sent a heartbeat in %s s: failed and re-queued",
                        trial.number, self.grace_period)
            callback = self.storage.get_heartbeat_stale_trial_callback()
            if callback is not None:
                callback(self.study, trial)


def _running_without_heartbeat(storage: RDBStorage, study_id: int) -> list[int]:
    with _create_scoped_session(storage.scoped_session) as session:
        rows = (
            session.query(models.TrialModel.trial_id)
            .filter(models.TrialModel.study_id == study_id)
            .filter(models.TrialModel.state == TrialState.RUNNING)
            .filter(~models.TrialModel.heartbeats.any())
            .all()
        )
    return [r[0] for r in rows]

"""A worker's reads of the trial list, asked twice in a moment, answered once.

Around each trial the worker reads the study's whole trial list seven times (Optuna's ask looks
for a re-queued trial, the sampler's window, the slot claim, the pruner at each epoch, the budget
after the tell). Each is a round trip that, through the proxy, re-sends every running trial and
re-sorts the whole study in Optuna's gRPC client: about 10 ms at 10,000 trials. Two of them come
within tens of milliseconds of the one before: the look for a re-queued trial right after the
budget count that ended the previous trial, and the slot claim right after the sampler's read.

`ReadMemo` answers a read of the trial list from the previous one when that is at most
`max_age_s` old and no trial was created or finished through this storage since it began: a
trial created here must be followed by a read holding every trial numbered before it (the slot
claim counts them), and a trial finished here must read as finished.

What a memo can miss is what others wrote in the last `max_age_s` (0.25 s): a trial re-queued
elsewhere is taken at the next ask, and a trial finished elsewhere still looks running to one
slot claim, which then refuses a slot it might have had (the budget is never overshot). Through
the proxy, others' writes are up to its `--refresh` (5 s) old already.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Container
from typing import Any

from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState

from hpsearch.storage import delegating

MAX_AGE_S = 0.25


class _ReadMemo(BaseStorage):
    def __init__(self, inner: BaseStorage, max_age_s: float = MAX_AGE_S) -> None:
        self.inner = inner
        self.max_age_s = max_age_s
        self._lock = threading.Lock()
        self._generation = 0  # moves on with every trial created or finished here
        self._last: tuple[int, int, float, list[FrozenTrial]] | None = None  # generation, study, when, trials
        self._settled: dict[int, int] = {}  # by study: trials numbered below this were all finished when last read

    def get_all_trials(self, study_id: int, deepcopy: bool = True,
                       states: Container[TrialState] | None = None) -> list[FrozenTrial]:
        now = time.monotonic()
        with self._lock:
            generation, last = self._generation, self._last
        if last is not None and last[:2] == (generation, study_id) and now - last[2] <= self.max_age_s:
            trials = last[3]
        else:
            trials = self.inner.get_all_trials(study_id, deepcopy=False)
            with self._lock:
                if self._generation == generation:  # nothing created or finished while it ran
                    self._last = (generation, study_id, now, trials)
        if states is not None:
            trials = self._in_states(study_id, trials, states)
        return copy.deepcopy(trials) if deepcopy else list(trials)

    def _in_states(self, study_id: int, trials: list[FrozenTrial], states: Container[TrialState]) -> list[FrozenTrial]:
        """The trials in `states`. For unfinished states only (Optuna's look for a re-queued
        trial, the sweep's for running ones) the finished run from trial 0 is skipped: a finished
        trial never changes, so it is looked at once, not at every read."""
        start = 0
        unfinished_only = not any(s.is_finished() for s in TrialState if s in states)
        if unfinished_only and trials and trials[-1].number == len(trials) - 1:
            with self._lock:
                start = self._settled.get(study_id, 0)
            start = start if start <= len(trials) else 0
            settled = start
            while settled < len(trials) and trials[settled].state.is_finished():
                settled += 1
            with self._lock:
                self._settled[study_id] = settled
            start = settled
        return [t for t in trials[start:] if t.state in states]

    def _changing(self) -> None:
        with self._lock:
            self._generation += 1
            self._last = None

    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        self._changing()
        try:
            return self.inner.create_new_trial(study_id, template_trial)
        finally:
            self._changing()  # a read that ran beside it may not hold it

    def set_trial_state_values(self, trial_id: int, state: TrialState, values: Any = None) -> bool:
        self._changing()
        try:
            return self.inner.set_trial_state_values(trial_id, state, values)
        finally:
            self._changing()

    # hpsearch's own extras of the storage underneath (RetryingStorage)
    def record_lease(self, trial_id: int, key: str, value: Any) -> bool:
        return self.inner.record_lease(trial_id, key, value)

    def close(self) -> None:
        self.inner.close()


ReadMemo = delegating(_ReadMemo, "ReadMemo", also=(
    "get_trial_id_from_study_id_trial_number", "get_n_trials", "remove_session"))

"""What `hpsearch proxy` serves: the study's trials from memory, every write to the database first.

Optuna's cached storage (`get_storage`) keeps finished trials in memory but reads every unfinished
trial from the database again at every `get_all_trials`, with all its parameters and attributes.
Behind the proxy that is every worker's every read: with 64 workers, 64 running trials of ~20 rows
each, about 60 ms of the proxy's CPU per read at 10,000 trials, and a trial makes 7 or more such
reads (BENCHMARKS.md, section 5). Nearly all of the proxy's time went there.

`ProxyCache` answers reads from the trials as last read, with this proxy's own writes applied:

- **Writes** go to the database first (which checks that the trial is still running and makes the
  write durable), then the cached trial is replaced by a copy with the write applied (a state
  change re-reads the trial, for the database's timestamps). A reader sees its own writes at once.
- **Every trial made before one this proxy makes** is in its list once `create_new_trial`
  returns: the trials numbered since its last look are fetched by number (Optuna numbers a
  study's trials densely, under a lock on the study), wherever they were made (another proxy, a
  worker on the database directly). The worker's next read, its slot claim (study.py), so counts
  every trial made before its own, as on the database itself: the budget stays exact.
- **Everything else written elsewhere** (trials made or written through another proxy, a sweep
  through another path) is read with a full refresh through Optuna's cached storage every
  `refresh_s` seconds. Until then such a trial can be missing, or look older than it is: still
  RUNNING when it has finished, or with an older lease. All of these only delay: a RUNNING trial
  counts against the budget until the refresh (a worker may wait a little longer, never
  overshoot), a re-queued copy made elsewhere is taken up to `refresh_s` later, and a lease is
  judged stale only after a grace period many times `refresh_s`.

Public API only: `BaseStorage` methods of the storage underneath, `FrozenTrial`'s constructor-level
attributes. The trial ids the proxy is written through are learnt from `create_new_trial` and
`get_trial_id_from_study_id_trial_number`.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass, field
from typing import Any

from optuna.distributions import BaseDistribution
from optuna.storages import BaseStorage
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

REFRESH_S = 5.0  # the default: a tenth of the shortest sensible grace period (recovery.py)

Change = Callable[[FrozenTrial], FrozenTrial]


def _with(**entries: tuple[Any, Any]) -> Change:
    """A change that copies the trial with one (key, value) set in each named dict attribute
    (`user_attrs=("k", v)`): cached trials are never changed in place, a reader may hold them."""

    def change(t: FrozenTrial) -> FrozenTrial:
        t = copy.copy(t)
        for name, (key, value) in entries.items():
            setattr(t, name, {**getattr(t, name), key: value})
        return t

    return change


@dataclass
class _Study:
    trials: list[FrozenTrial]  # index == trial number (Optuna numbers densely from 0)
    refreshed: float  # time.monotonic() of the last full read
    replay: list[tuple[int, Change]] | None = None  # writes applied while a full read is running
    refreshing: threading.Lock = field(default_factory=threading.Lock)
    probing: threading.Lock = field(default_factory=threading.Lock)


class ProxyCache(BaseStorage):
    """`inner` (a storage on the database, Optuna's cached one in the proxy) with reads from memory."""

    def __init__(self, inner: BaseStorage, refresh_s: float = REFRESH_S) -> None:
        if refresh_s < 0:
            raise ValueError(f"refresh_s must be >= 0 seconds, got {refresh_s}")
        self.inner = inner
        self.refresh_s = refresh_s
        self._lock = threading.Lock()  # guards the fields below and every _Study's trials / replay
        self._studies: dict[int, _Study] = {}
        self._where: dict[int, tuple[int, int]] = {}  # trial id -> (study id, number)

    # --- reads ------------------------------------------------------------------------------
    def get_all_trials(self, study_id: int, deepcopy: bool = True,
                       states: Container[TrialState] | None = None) -> list[FrozenTrial]:
        study = self._fresh(study_id)
        with self._lock:
            trials = list(study.trials)
        if states is not None:
            trials = [t for t in trials if t.state in states]
        return copy.deepcopy(trials) if deepcopy else trials

    def get_trial(self, trial_id: int) -> FrozenTrial:
        with self._lock:
            where = self._where.get(trial_id)
            if where is not None:
                return self._studies[where[0]].trials[where[1]]
        return self.inner.get_trial(trial_id)

    def _fresh(self, study_id: int) -> _Study:
        """The study's trials, with every trial created so far; a full read when one is due."""
        with self._lock:
            study = self._studies.get(study_id)
            due = study is None or time.monotonic() - study.refreshed >= self.refresh_s
        return self._refresh(study_id) if due else study

    def _refresh(self, study_id: int) -> _Study:
        with self._lock:
            study = self._studies.get(study_id)
            if study is None:
                study = self._studies[study_id] = _Study(trials=[], refreshed=-float("inf"))
        with study.refreshing:
            with self._lock:
                if time.monotonic() - study.refreshed < self.refresh_s:
                    return study  # another thread refreshed it while this one waited
                study.replay = []
            try:
                trials = self.inner.get_all_trials(study_id, deepcopy=False)
            except BaseException:
                with self._lock:
                    study.replay = None
                raise
            if any(t.number != i for i, t in enumerate(trials)):  # not dense: never seen, but be safe
                raise RuntimeError(f"study id {study_id}: trial numbers are not 0..{len(trials) - 1}")
            unknown = self._unknown_ids(study_id, trials)
            with self._lock:
                for number, change in study.replay or []:
                    if number < len(trials):
                        trials[number] = change(trials[number])
                # Trials this proxy made while the read ran (found by its probe): kept, so a
                # worker's next read still holds the trial it has just made.
                trials.extend(study.trials[len(trials):])
                study.replay = None
                study.trials = trials
                study.refreshed = time.monotonic()
                self._where.update(unknown)
        return study

    def _unknown_ids(self, study_id: int, trials: Sequence[FrozenTrial]) -> dict[int, tuple[int, int]]:
        """The ids of unfinished trials this cache does not know yet (they may be written)."""
        with self._lock:
            known = {number for sid, number in self._where.values() if sid == study_id}
        found = {}
        for t in trials:
            if not t.state.is_finished() and t.number not in known:
                found[self.inner.get_trial_id_from_study_id_trial_number(study_id, t.number)] = (study_id, t.number)
        return found

    def _probe(self, study_id: int, study: _Study) -> None:
        """Add the trials created since the last look, wherever they were created (run after
        each trial this proxy creates: its list then holds every trial numbered before it)."""
        with study.probing:
            while True:
                with self._lock:
                    number = len(study.trials)
                try:
                    trial_id = self.inner.get_trial_id_from_study_id_trial_number(study_id, number)
                except KeyError:
                    return
                trial = self.inner.get_trial(trial_id)
                with self._lock:
                    if len(study.trials) == number:  # a full read may have brought it meanwhile
                        study.trials.append(trial)
                    self._where[trial_id] = (study_id, number)

    # --- writes: the database first, then the cached trial --------------------------------------
    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        trial_id = self.inner.create_new_trial(study_id, template_trial)
        with self._lock:
            study = self._studies.get(study_id)
        if study is not None and not self._append_own(study_id, study, trial_id):
            self._probe(study_id, study)
        return trial_id

    def _append_own(self, study_id: int, study: _Study, trial_id: int) -> bool:
        """Add the trial just made here when it is the next number after the list's last, as it
        is unless another creator came between: every trial numbered before it is then in the
        list, and one read of the trial replaces the probe's three."""
        with study.probing:
            trial = self.inner.get_trial(trial_id)
            with self._lock:
                if trial.number > len(study.trials):
                    return False  # trials made elsewhere came between: the probe reads them
                if trial.number == len(study.trials):
                    study.trials.append(trial)
                # (a full read that ran beside the create may have brought it already)
                self._where[trial_id] = (study_id, trial.number)
                return True

    def set_trial_param(self, trial_id: int, param_name: str, param_value_internal: float,
                        distribution: BaseDistribution) -> None:
        try:
            self.inner.set_trial_param(trial_id, param_name, param_value_internal, distribution)
        except KeyError:
            # Optuna's cache writes parameters only of trials it has read or made: one created
            # elsewhere (another proxy) is read into it first, then written.
            with self._lock:
                where = self._where.get(trial_id)
                studies = [where[0]] if where is not None else list(self._studies)
            for study_id in studies:
                self.inner.get_all_trials(study_id, deepcopy=False)
            self.inner.set_trial_param(trial_id, param_name, param_value_internal, distribution)
        external = distribution.to_external_repr(param_value_internal)
        self._apply(trial_id, _with(params=(param_name, external), distributions=(param_name, distribution)))

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        self.inner.set_trial_user_attr(trial_id, key, value)
        self._apply(trial_id, _with(user_attrs=(key, value)))

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        self.inner.set_trial_system_attr(trial_id, key, value)
        self._apply(trial_id, _with(system_attrs=(key, value)))

    def set_trial_intermediate_value(self, trial_id: int, step: int, intermediate_value: float) -> None:
        self.inner.set_trial_intermediate_value(trial_id, step, intermediate_value)
        self._apply(trial_id, _with(intermediate_values=(step, intermediate_value)))

    def set_trial_state_values(self, trial_id: int, state: TrialState,
                               values: Sequence[float] | None = None) -> bool:
        done = self.inner.set_trial_state_values(trial_id, state, values)
        # The database stamps datetime_start / datetime_complete: take the trial as it stored it.
        now = self.inner.get_trial(trial_id)
        self._apply(trial_id, lambda t: now)
        return done

    def _apply(self, trial_id: int, change: Change) -> None:
        with self._lock:
            where = self._where.get(trial_id)
            if where is None:
                # Created elsewhere since the last read: the next read's probe takes it from the
                # database, this write included. (Unfinished trials a read has seen are all known.)
                return
            study = self._studies[where[0]]
            study.trials[where[1]] = change(study.trials[where[1]])
            if study.replay is not None:
                study.replay.append((where[1], change))

    # --- studies: straight to the storage underneath --------------------------------------------
    def create_new_study(self, directions: Sequence[StudyDirection], study_name: str | None = None) -> int:
        return self.inner.create_new_study(directions, study_name)

    def delete_study(self, study_id: int) -> None:
        self.inner.delete_study(study_id)
        with self._lock:
            self._studies.pop(study_id, None)
            self._where = {tid: w for tid, w in self._where.items() if w[0] != study_id}

    def set_study_user_attr(self, study_id: int, key: str, value: Any) -> None:
        self.inner.set_study_user_attr(study_id, key, value)

    def set_study_system_attr(self, study_id: int, key: str, value: Any) -> None:
        self.inner.set_study_system_attr(study_id, key, value)

    def get_study_id_from_name(self, study_name: str) -> int:
        return self.inner.get_study_id_from_name(study_name)

    def get_study_name_from_id(self, study_id: int) -> str:
        return self.inner.get_study_name_from_id(study_id)

    def get_study_directions(self, study_id: int) -> list[StudyDirection]:
        return self.inner.get_study_directions(study_id)

    def get_study_user_attrs(self, study_id: int) -> dict[str, Any]:
        return self.inner.get_study_user_attrs(study_id)

    def get_study_system_attrs(self, study_id: int) -> dict[str, Any]:
        return self.inner.get_study_system_attrs(study_id)

    def get_all_studies(self) -> list[Any]:
        return self.inner.get_all_studies()

    def get_trial_id_from_study_id_trial_number(self, study_id: int, trial_number: int) -> int:
        return self.inner.get_trial_id_from_study_id_trial_number(study_id, trial_number)

    def remove_session(self) -> None:
        self.inner.remove_session()

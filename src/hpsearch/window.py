"""TPE on a bounded window of a large study's history, through Optuna's public API.

Optuna's TPE models every finished trial on every ask, in Python: on this project's default space
one ask costs ~0.3 s at 10,000 finished trials (BENCHMARKS.md, "Sampler cost per ask"), more than
a whole trial's storage traffic. Optuna has no option to bound that history, so this sampler
shows TPE a window of it instead:

- every finished trial while the study holds at most `size` of them: TPE sees exactly what it
  would see without the window (same trials, same order), so small studies sample identically;
- beyond that, the best 100 complete trials plus the most recent finished ones up to `size`,
  and every running trial (the constant liar's). TPE's "good" group is the best 25 trials once a
  study has 250 (its default gamma), so a window of >= 250 that keeps the best 100 gives TPE the
  same good group as the whole study; only its model of the rest is thinned to the recent trials,
  which TPE's default weights already favour (older trials weigh linearly less).

The window is a view storage (`BaseStorage`, Optuna's public storage interface) over the study's
trials, opened with `optuna.load_study`: reads of the trial list answer from the window, and
everything else, the writes TPE makes (the constant liar's system attributes) included, goes to
the real storage. One view per trial, built when the trial starts.
"""

from __future__ import annotations

import copy
import heapq
import threading
from collections.abc import Container, Sequence
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.storages import BaseStorage
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from hpsearch.config import MIN_HISTORY
from hpsearch.storage import delegating

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
# TPE's default gamma caps its "good" group at 25 trials from 250 on: MIN_HISTORY, the smallest
# window that keeps that group the same as the whole study's. The window keeps the best 100, 4x it.
KEEP_BEST = 100


class History:
    """The window of one study, kept up to date as trials finish. A finished trial never changes,
    so each one is looked at once (its value, for the best), however many asks follow: an ask on a
    study of 10,000 trials reads the few trials that finished since the last one, not 10,000."""

    def __init__(self, size: int, direction: StudyDirection, best: int = KEEP_BEST) -> None:
        self.size = size
        self._sign = 1.0 if direction == StudyDirection.MINIMIZE else -1.0
        self._keep = best
        self._reset()

    def _reset(self) -> None:
        self._done = 0  # every trial numbered below this is finished (or failed) and looked at
        self._seen: set[int] = set()  # finished trials from `_done` on, looked at
        self._open: list[int] = []  # unfinished trials (running, waiting) at the last update
        self._best: list[tuple[float, int]] = []  # heap of (-key, number): the best, worst on top
        self.finished = 0  # complete + pruned

    def update(self, trials: Sequence[FrozenTrial]) -> None:
        """`trials`: the study's trials in number order, as the storage lists them."""
        if trials and trials[-1].number != len(trials) - 1:  # not one study's 0..n-1: start over
            self._reset()
        self._open = []
        for t in trials[self._done:]:
            n = t.number
            if n in self._seen:
                continue
            state = t.state
            if not state.is_finished():
                self._open.append(n)
                continue
            self._seen.add(n)
            if state in FINISHED:
                self.finished += 1
            if state == TrialState.COMPLETE:
                entry = (-self._sign * t.value, n)
                if len(self._best) < self._keep:
                    heapq.heappush(self._best, entry)
                else:
                    heapq.heappushpop(self._best, entry)
        while self._done in self._seen:
            self._seen.discard(self._done)
            self._done += 1

    def window(self, trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
        """The trials TPE is shown: all of them up to `size` finished ones; beyond, the best
        complete trials, the most recent finished ones up to `size` in all, and every unfinished
        trial, in number order (as the storage gives them)."""
        self.update(trials)
        if self.size <= 0 or self.finished <= self.size:
            return list(trials)
        chosen = {n for _, n in self._best}
        for t in reversed(trials):  # the most recent first
            if len(chosen) >= self.size:
                break
            if t.state in FINISHED:
                chosen.add(t.number)
        return [trials[n] for n in sorted(chosen.union(self._open))]


class HistoryWindowSampler(optuna.samplers.BaseSampler):
    """`inner` (TPE) asked on a window of at most `size` finished trials of the study in `storage`
    (0: the whole study)."""

    def __init__(self, inner: optuna.samplers.BaseSampler, size: int, storage: BaseStorage) -> None:
        if size != 0 and size < MIN_HISTORY:
            raise ValueError(f"history window {size} is below {MIN_HISTORY}: use 0 (all) or >= {MIN_HISTORY}")
        self._inner = inner
        self._size = size
        self._store = storage
        self._views: dict[tuple[str, int], optuna.Study] = {}  # (study name, trial number) -> view
        self._ids: dict[str, int] = {}
        self._histories: dict[str, History] = {}
        self._lock = threading.Lock()

    # --- the view a trial is sampled on ---------------------------------------------------------

    def _view(self, study: optuna.Study, trial: FrozenTrial) -> optuna.Study:
        key = (study.study_name, trial.number)
        with self._lock:
            view = self._views.get(key)
        if view is None:
            shown = self._window(study)
            storage = WindowStorage(self._store, shown, self._id_of(study), study.directions)
            view = optuna.load_study(study_name=study.study_name, storage=storage, sampler=self._inner)
            with self._lock:
                self._views[key] = view
        return view

    def _window(self, study: optuna.Study) -> list[FrozenTrial]:
        trials = study.get_trials(deepcopy=False)
        with self._lock:
            history = self._histories.setdefault(study.study_name, History(self._size, study.direction))
            return history.window(trials)

    def _id_of(self, study: optuna.Study) -> int:
        if study.study_name not in self._ids:
            self._ids[study.study_name] = self._store.get_study_id_from_name(study.study_name)
        return self._ids[study.study_name]

    # --- BaseSampler: every call goes to `inner`, on the trial's view ---------------------------

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        with self._lock:  # a fresh view for a fresh trial (a re-asked number included)
            self._views.pop((study.study_name, trial.number), None)
            if len(self._views) > 256:  # views of trials that never told (a crash in ask)
                self._views.clear()  # a view still in use is rebuilt when next asked for
        self._inner.before_trial(self._view(study, trial), trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self._inner.infer_relative_search_space(self._view(study, trial), trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        return self._inner.sample_relative(self._view(study, trial), trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        return self._inner.sample_independent(self._view(study, trial), trial, param_name, param_distribution)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        with self._lock:
            self._views.pop((study.study_name, trial.number), None)
        self._inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._inner.reseed_rng()


class _WindowReads(BaseStorage):
    """Reads of the trial list answer from the window; every other method of Optuna's storage
    interface is delegated to the real storage (see `WindowStorage` below)."""

    def __init__(self, real: BaseStorage, trials: list[FrozenTrial], study_id: int,
                 directions: list[StudyDirection]) -> None:
        self.inner = real
        self._trials = trials
        self._id = study_id
        self._directions = directions

    # A study's id and directions never change: known once, not asked of the database per trial.
    def get_study_id_from_name(self, study_name: str) -> int:
        return self._id

    def get_study_directions(self, study_id: int) -> list[StudyDirection]:
        return list(self._directions)

    def get_all_trials(self, study_id: int, deepcopy: bool = True,
                       states: Container[TrialState] | None = None) -> list[FrozenTrial]:
        trials = self._trials if states is None else [t for t in self._trials if t.state in states]
        return copy.deepcopy(trials) if deepcopy else list(trials)


# Every abstract method of BaseStorage but the three above, delegated to the real storage.
WindowStorage = delegating(_WindowReads, "WindowStorage")

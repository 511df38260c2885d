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
the real storage. One view per trial, its trial list read when TPE first asks for it.

Sampling ahead (`sample_ahead`): once the study holds `ahead_from` finished trials, a worker
samples its next trial's parameters in a thread while the current trial trains (begun as the first
epoch it trains starts), with a second sampler of the same settings on a view of the study as it is then.
The next trial this worker thread asks for takes that sample instead of running TPE between two
trials: TPE's ask (tens of ms of the worker's CPU on a full window) leaves the path from one
trial to the next. The sample is the one TPE would have made a trial earlier: it has not seen the
result of the trial it overlapped, and sees that trial as running (the constant liar's view of it),
as if one more worker shared the study; on a study of `ahead_from` (default 1,000) trials or more
that is one result among a thousand. What TPE writes for the sample (the constant liar's note of
the sampled parameters) is kept and written to the trial that takes it. A sample is offered to
one trial only (the next this thread asks for) and dropped if that trial does not use it (a
re-queued trial with its parameters fixed); a sample ahead that failed is dropped and the trial
is sampled as usual.
"""

from __future__ import annotations

import copy
import heapq
import logging
import threading
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass, field
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
# The trial a sample ahead is made for: not in the study (TPE leaves it out of its model as "the
# trial being sampled"), and the id its writes are kept under until a real trial takes them.
AHEAD_ID = -1
AHEAD_THREAD = "hpsearch-sample-ahead"  # the name of the thread a sample ahead is made in

_log = logging.getLogger(__name__)


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


@dataclass
class _Ahead:
    """A sample made ahead for one worker thread's next trial."""

    thread: threading.Thread | None = None
    space: dict[str, BaseDistribution] | None = None
    params: dict[str, Any] | None = None
    writes: list[tuple[str, Any]] = field(default_factory=list)  # TPE's system attributes for the trial


class HistoryWindowSampler(optuna.samplers.BaseSampler):
    """`inner` (TPE) asked on a window of at most `size` finished trials of the study in `storage`
    (0: the whole study); with `ahead` (a second sampler of the same settings) and `ahead_from` > 0,
    each worker thread's next trial is sampled while its current one trains, once the study holds
    `ahead_from` finished trials (`sample_ahead`)."""

    def __init__(self, inner: optuna.samplers.BaseSampler, size: int, storage: BaseStorage,
                 ahead: optuna.samplers.BaseSampler | None = None, ahead_from: int = 0) -> None:
        if size != 0 and size < MIN_HISTORY:
            raise ValueError(f"history window {size} is below {MIN_HISTORY}: use 0 (all) or >= {MIN_HISTORY}")
        if ahead_from < 0:
            raise ValueError(f"ahead_from = {ahead_from}: use 0 (never sample ahead) or a number of finished trials")
        if ahead is inner and ahead is not None:
            raise ValueError("the sampler ahead must be its own instance: it samples while `inner` may")
        self._inner = inner
        self._size = size
        self._store = storage
        self._ahead_sampler = ahead if ahead_from > 0 else None
        self._ahead_from = ahead_from
        self._views: dict[tuple[str, int], optuna.Study] = {}  # (study name, trial number) -> view
        self._ids: dict[str, int] = {}
        self._histories: dict[str, History] = {}
        self._ahead: dict[tuple[str, int], _Ahead] = {}  # (study name, thread) -> its sample ahead
        self._taken: dict[tuple[str, int], _Ahead] = {}  # (study name, trial number) -> the sample it takes
        self._lock = threading.Lock()
        self._ahead_lock = threading.Lock()  # one sample ahead at a time on the sampler ahead

    # --- the view a trial is sampled on ---------------------------------------------------------

    def _view(self, study: optuna.Study, trial: FrozenTrial) -> optuna.Study:
        key = (study.study_name, trial.number)
        with self._lock:
            view = self._views.get(key)
        if view is None:
            view = self._open_view(study, self._inner, self._view_storage(study))
            with self._lock:
                self._views[key] = view
        return view

    def _view_storage(self, study: optuna.Study) -> _WindowReads:
        """`study`'s storage as TPE sees it: its trial list the window, read when first asked for."""
        return WindowStorage(self._store, lambda: self._window(study), self._id_of(study), study.directions)

    @staticmethod
    def _open_view(study: optuna.Study, sampler: optuna.samplers.BaseSampler, storage: BaseStorage) -> optuna.Study:
        return optuna.load_study(study_name=study.study_name, storage=storage, sampler=sampler)

    def _window(self, study: optuna.Study) -> list[FrozenTrial]:
        trials = study.get_trials(deepcopy=False)
        with self._lock:
            history = self._histories.setdefault(study.study_name, History(self._size, study.direction))
            return history.window(trials)

    def _id_of(self, study: optuna.Study) -> int:
        if study.study_name not in self._ids:
            self._ids[study.study_name] = self._store.get_study_id_from_name(study.study_name)
        return self._ids[study.study_name]

    # --- sampling ahead ---------------------------------------------------------------------------

    def sample_ahead(self, study: optuna.Study) -> None:
        """Sample this worker thread's next trial now, in a thread (called as an epoch of the
        current trial starts), if the study held `ahead_from` finished trials at the last ask and
        this thread has no sample ahead yet (one a trial: the next ask takes it)."""
        if self._ahead_sampler is None:
            return
        key = (study.study_name, threading.get_ident())
        with self._lock:
            history = self._histories.get(study.study_name)
            if history is None or history.finished < self._ahead_from or key in self._ahead:
                return
            ahead = self._ahead[key] = _Ahead()
        ahead.thread = threading.Thread(target=self._sample_ahead, args=(study, ahead),
                                        name=AHEAD_THREAD, daemon=True)
        ahead.thread.start()

    def _sample_ahead(self, study: optuna.Study, ahead: _Ahead) -> None:
        sampler = self._ahead_sampler
        assert sampler is not None
        try:
            with self._ahead_lock:
                storage = self._view_storage(study)
                view = self._open_view(study, sampler, storage)
                trial = FrozenTrial(number=AHEAD_ID, trial_id=AHEAD_ID, state=TrialState.RUNNING, value=None,
                                    datetime_start=None, datetime_complete=None, params={}, distributions={},
                                    user_attrs={}, system_attrs={}, intermediate_values={})
                sampler.before_trial(view, trial)
                space = sampler.infer_relative_search_space(view, trial)
                params = sampler.sample_relative(view, trial, space)
                ahead.writes = storage.kept
                ahead.space, ahead.params = space, params
        except Exception:  # noqa: BLE001: the trial is then sampled as usual, and fails there if it must
            _log.debug("sampling ahead failed; the next trial is sampled as usual", exc_info=True)

    def _take_ahead(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """Offer this thread's sample ahead, if any, to `trial`, the next trial it asks for."""
        with self._lock:
            ahead = self._ahead.pop((study.study_name, threading.get_ident()), None)
        if ahead is None:
            return
        if ahead.thread is not None:
            ahead.thread.join()  # begun as the last trial's training did: done by now, or nearly
        if ahead.params:  # made, and not TPE's random start ({}): offered to `trial`
            with self._lock:
                self._taken[(study.study_name, trial.number)] = ahead

    def _offered(self, study: optuna.Study, trial: FrozenTrial) -> _Ahead | None:
        """The sample ahead `trial` was offered (its space and parameters set), if any."""
        with self._lock:
            return self._taken.get((study.study_name, trial.number))

    # --- BaseSampler: every call goes to `inner`, on the trial's view ---------------------------

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        with self._lock:  # a fresh view for a fresh trial (a re-asked number included)
            self._views.pop((study.study_name, trial.number), None)
            self._taken.pop((study.study_name, trial.number), None)
            if len(self._views) > 256:  # views of trials that never told (a crash in ask)
                self._views.clear()  # a view still in use is rebuilt when next asked for
            if len(self._taken) > 256:
                self._taken.clear()
        self._take_ahead(study, trial)
        self._inner.before_trial(self._view(study, trial), trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        ahead = self._offered(study, trial)
        if ahead is not None:
            return dict(ahead.space)
        return self._inner.infer_relative_search_space(self._view(study, trial), trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        ahead = self._offered(study, trial)
        if ahead is not None and search_space == ahead.space:
            if ahead.writes:  # what TPE wrote for the sample, now the trial's
                tid = self._store.get_trial_id_from_study_id_trial_number(self._id_of(study), trial.number)
                for key, value in ahead.writes:
                    self._store.set_trial_system_attr(tid, key, value)
            _log.debug("trial %d takes the sample made ahead", trial.number)
            return dict(ahead.params)
        return self._inner.sample_relative(self._view(study, trial), trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        return self._inner.sample_independent(self._view(study, trial), trial, param_name, param_distribution)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        with self._lock:
            self._views.pop((study.study_name, trial.number), None)
            self._taken.pop((study.study_name, trial.number), None)
        self._inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._inner.reseed_rng()
        if self._ahead_sampler is not None:
            self._ahead_sampler.reseed_rng()


def sample_ahead(trial: optuna.Trial) -> None:
    """As an epoch of `trial` starts, let the study's sampler sample this worker's next trial while
    this one trains, if it can (`HistoryWindowSampler.sample_ahead`: once a trial, at the first
    epoch this worker trains of it, a resumed trial's included)."""
    start = getattr(trial.study.sampler, "sample_ahead", None)
    if start is not None:
        start(trial.study)


class _WindowReads(BaseStorage):
    """Reads of the trial list answer from the window (`window()`, called once, at the first
    read); writes for the trial sampled ahead (`AHEAD_ID`) are kept in `kept`; every other method
    of Optuna's storage interface is delegated to the real storage (see `WindowStorage` below)."""

    def __init__(self, real: BaseStorage, window: Callable[[], list[FrozenTrial]], study_id: int,
                 directions: list[StudyDirection]) -> None:
        self.inner = real
        self._window = window
        self._trials: list[FrozenTrial] | None = None
        self._id = study_id
        self._directions = directions
        self.kept: list[tuple[str, Any]] = []

    # A study's id and directions never change: known once, not asked of the database per trial.
    def get_study_id_from_name(self, study_name: str) -> int:
        return self._id

    def get_study_directions(self, study_id: int) -> list[StudyDirection]:
        return list(self._directions)

    def get_all_trials(self, study_id: int, deepcopy: bool = True,
                       states: Container[TrialState] | None = None) -> list[FrozenTrial]:
        if self._trials is None:
            self._trials = self._window()
        trials = self._trials if states is None else [t for t in self._trials if t.state in states]
        return copy.deepcopy(trials) if deepcopy else list(trials)

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        if trial_id == AHEAD_ID:
            self.kept.append((key, value))
        else:
            self.inner.set_trial_system_attr(trial_id, key, value)


# Every abstract method of BaseStorage but the four above, delegated to the real storage.
WindowStorage = delegating(_WindowReads, "WindowStorage")

"""The median pruner, with the complete trials' reports tallied once instead of walked each epoch.

Optuna's `MedianPruner` answers every report of every trial by reading the study's complete
trials and gathering their values at that step: a walk over the whole study per epoch (about 4 ms
of a worker's CPU at 10,000 trials, on top of the read), and a read of the trial list even at the
epochs it can never prune (before `n_warmup_steps`).

`MedianPruner` here makes the same decisions (`tests/test_pruning.py` holds it to Optuna's, report
by report, on studies with NaNs, gaps and both directions) with less work:

- the checks that need no other trial (no report yet, a warm-up step, not the first report of an
  interval) come first, so those epochs read nothing;
- the complete trials' reports are tallied per step as the study grows: a finished trial never
  changes, and trials are numbered 0, 1, 2, ... as they are created, so the run of finished
  trials from trial 0 is tallied once (as the budget tally does, `study.BudgetTally`) and each
  question looks only at the trials after it;
- each step's reports are kept sorted (NaN left out, as `numpy.nanpercentile` leaves them out),
  so the median is read from the middle instead of computed over every value again; numpy still
  does the interpolation between the middle two, so the value is numpy's to the last bit.

The read itself (the study's trial list: ~10 ms at 10,000 trials through the proxy) is the rest,
once per epoch past the warm-up: 13 reads a trial with the default 15 epochs. The worker reads it
ahead (`prefetch`, called from `fit`'s `on_epoch_start`), in a thread, while the epoch trains:
at once for epochs shorter than `PREFETCH_MAX_AGE_S / 2`, else timed by the previous epoch's
length to begin that long before the report. The report's decision uses the read when it began
at most `PREFETCH_MAX_AGE_S` (5 s) ago, else reads again (an epoch much longer than the last; one
read more then costs nothing that matters). A decision is so Optuna's on the study as it was up
to 5 s before the report: a trial that completed elsewhere in those seconds counts from the next
one. Through the proxy the other workers' trials are up to its refresh (5 s) old anyway.

Only Optuna's public API: `BasePruner`, `Study.get_trials`, `FrozenTrial`.
"""

from __future__ import annotations

import bisect
import collections
import math
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import optuna
from optuna.pruners import BasePruner
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState


PREFETCH_MAX_AGE_S = 5.0  # the oldest read of the trial list a decision may use (the proxy's refresh)


@dataclass
class _Read:
    """A read of the study's trial list for the next report, run by `timer` (a thread)."""

    timer: threading.Timer | None = None
    started: float | None = None  # time.monotonic() when it began; None: not yet
    cancelled: bool = False
    trials: list[FrozenTrial] | None = None  # None: not read, or the read failed
    done: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self, study: optuna.Study) -> None:
        with self.lock:
            if self.cancelled:
                return
            self.started = time.monotonic()
        try:
            self.trials = study.get_trials(deepcopy=False)
        except Exception:
            pass  # a storage outage: the report's own read meets it, and waits it out or raises
        finally:
            self.done.set()

    def result(self, max_age_s: float) -> list[FrozenTrial] | None:
        """The trials read, when the read began at most `max_age_s` ago (waiting for its end),
        else None; one not begun yet is cancelled."""
        with self.lock:
            if self.started is None:
                self.cancelled = True
                if self.timer is not None:
                    self.timer.cancel()
                return None
        if time.monotonic() - self.started > max_age_s:
            return None
        self.done.wait()
        return self.trials


@dataclass
class _Tally:
    """The complete trials among trials 0 .. n-1, all finished: how many, and their reports by step
    (how many, NaN included, and the others sorted)."""

    n: int = 0
    complete: int = 0
    reported: collections.Counter = field(default_factory=collections.Counter)
    ordered: dict[int, list[float]] = field(default_factory=dict)

    def advance(self, trials: list[FrozenTrial]) -> None:
        while self.n < len(trials) and trials[self.n].state.is_finished():
            t = trials[self.n]
            if t.state == TrialState.COMPLETE:
                self.complete += 1
                for step, value in t.intermediate_values.items():
                    self.reported[step] += 1
                    if not math.isnan(value):
                        bisect.insort(self.ordered.setdefault(step, []), value)
            self.n += 1


def median(ordered: list[float]) -> float:
    """`numpy.percentile(values, 50)` of the sorted `ordered`, from its middle one or two values:
    numpy interpolates between the two values around the middle position (weight 0 or 1/2), and
    so does this, by asking numpy the same of just those two."""
    n = len(ordered)
    middle = (n - 1) / 2
    lo = int(middle)
    pair = ordered[lo:lo + 2]
    return float(np.percentile(np.array(pair, dtype=float), 100 * (middle - lo) if len(pair) == 2 else 50))


class MedianPruner(BasePruner):
    """Optuna's `MedianPruner(n_startup_trials, n_warmup_steps, interval_steps, n_min_trials)`:
    prune a trial whose best report so far is worse than the median of the complete trials'
    reports at the same step."""

    def __init__(self, n_startup_trials: int = 5, n_warmup_steps: int = 0, interval_steps: int = 1,
                 n_min_trials: int = 1, prefetch_max_age_s: float = PREFETCH_MAX_AGE_S) -> None:
        # Optuna's own checks of the same arguments, with its messages.
        optuna.pruners.MedianPruner(n_startup_trials, n_warmup_steps, interval_steps, n_min_trials=n_min_trials)
        self.n_startup_trials = n_startup_trials
        self.n_warmup_steps = n_warmup_steps
        self.interval_steps = interval_steps
        self.n_min_trials = n_min_trials
        self.prefetch_max_age_s = prefetch_max_age_s
        self._tallies: dict[str, _Tally] = {}  # by study name: a worker may prune in several studies
        # By (study name, thread): the read started for that worker's next report.
        self._reads: dict[tuple[str, int], _Read] = {}
        self._epoch_started: dict[tuple[str, int], float] = {}  # when that worker's last epoch started
        self._lock = threading.Lock()

    def prefetch(self, study: optuna.Study, step: int) -> None:
        """Read `study`'s trials ahead for the report at `step` (called as that epoch starts), in
        a thread, unless that report is one the pruner answers without them (or
        `prefetch_max_age_s` is 0). The read begins when, by the last epoch's length, half of
        `prefetch_max_age_s` is left before the report: at once for epochs shorter than that."""
        now = time.monotonic()
        key = (study.study_name, threading.get_ident())
        with self._lock:
            last = self._epoch_started.get(key)
            self._epoch_started[key] = now
        answered_without = step < self.n_warmup_steps or (step - self.n_warmup_steps) % self.interval_steps
        if self.prefetch_max_age_s <= 0 or answered_without:
            return
        delay = 0.0 if last is None else max(0.0, now - last - self.prefetch_max_age_s / 2)
        read = _Read()
        read.timer = threading.Timer(delay, read.run, args=(study,))
        read.timer.name, read.timer.daemon = "hpsearch-prune-read", True
        with self._lock:
            unused = self._reads.pop(key, None)  # a trial that ended before its report, say
            self._reads[key] = read
        if unused is not None:
            unused.result(0)  # cancelled if not begun
        read.timer.start()

    def _trials(self, study: optuna.Study) -> list[FrozenTrial]:
        """The read started ahead when it is recent enough, else a read now."""
        with self._lock:
            read = self._reads.pop((study.study_name, threading.get_ident()), None)
        trials = read.result(self.prefetch_max_age_s) if read is not None else None
        return trials if trials is not None else study.get_trials(deepcopy=False)

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        step = trial.last_step
        if step is None or step < self.n_warmup_steps or not self._first_in_interval(step, trial):
            return False  # Optuna decides these the same way whatever the other trials hold
        trials = self._trials(study)
        tally = self._tally(study.study_name, trials)
        tail = [t for t in trials[tally.n:] if t.state == TrialState.COMPLETE]
        n_complete = tally.complete + len(tail)
        if n_complete == 0 or n_complete < self.n_startup_trials:
            return False
        maximize = study.direction == StudyDirection.MAXIMIZE
        reported = np.asarray(list(trial.intermediate_values.values()), dtype=float)
        best = np.nanmax(reported) if maximize else np.nanmin(reported)
        if math.isnan(best):
            return True
        extra = [t.intermediate_values[step] for t in tail if step in t.intermediate_values]
        if tally.reported[step] + len(extra) < self.n_min_trials:
            return False  # Optuna: too few reports at this step
        ordered = tally.ordered.get(step, [])
        finite = sorted(v for v in extra if not math.isnan(v))
        if finite:
            ordered = list(ordered)
            for v in finite:
                bisect.insort(ordered, v)
        if not ordered:
            return False  # Optuna: every report NaN (nanpercentile is NaN)
        p = median(ordered)
        return bool(best < p) if maximize else bool(best > p)

    def _first_in_interval(self, step: int, trial: FrozenTrial) -> bool:
        """Whether `step` is the trial's first report in its pruning interval (Optuna's rule)."""
        nearest = (step - self.n_warmup_steps) // self.interval_steps * self.interval_steps + self.n_warmup_steps
        before = max((s for s in trial.intermediate_values if s != step), default=-1)
        return before < nearest

    def _tally(self, study_name: str, trials: list[FrozenTrial]) -> _Tally:
        if trials and trials[-1].number != len(trials) - 1:
            return _Tally()  # not numbered 0..N-1: no prefix, every trial is the tail, walked each time
        tally = self._tallies.get(study_name)
        if tally is None or len(trials) < tally.n:  # new, or not the list tallied so far: start over
            tally = self._tallies[study_name] = _Tally()
        tally.advance(trials)
        return tally


def prefetch(trial: optuna.Trial, step: int) -> None:
    """Let the study's pruner start reading what it needs for the report at `step`, if it can
    (hpsearch's `MedianPruner`; any other pruner reads when asked, as usual)."""
    start = getattr(trial.study.pruner, "prefetch", None)
    if start is not None:
        start(trial.study, step)

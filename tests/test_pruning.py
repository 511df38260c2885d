"""The median pruner (src/hpsearch/pruning.py): the same decision as Optuna's MedianPruner at every
report, on studies that grow while trials run, finish out of order, report NaN and skip steps;
no read of the trial list at the epochs no other trial can change the answer for; and the read
started as the epoch starts (`prefetch`) used by its report when recent enough, and only then."""

from __future__ import annotations

import collections
import math
import random
import threading
import time
import warnings

import numpy as np
import optuna
import pytest
from optuna.storages import InMemoryStorage
from optuna.trial import TrialState

from hpsearch.config import PrunerConfig
from hpsearch.pruning import MedianPruner, median, prefetch
from hpsearch.study import make_pruner

pytestmark = pytest.mark.fast

SETTINGS = [
    dict(n_startup_trials=4, n_warmup_steps=2),  # the default study's
    dict(n_startup_trials=0, n_warmup_steps=0, interval_steps=3, n_min_trials=5),
    dict(n_startup_trials=12, n_warmup_steps=1, interval_steps=2, n_min_trials=2),
]


class LateTrialThree(InMemoryStorage):
    """Trial 3, once finished, is listed only after the study has 40 trials (as a reader may see a
    trial finished elsewhere late): until then the list has a gap, and no prefix may be kept."""

    def get_all_trials(self, study_id, deepcopy=True, states=None):
        trials = super().get_all_trials(study_id, deepcopy, states)
        late = len(super().get_all_trials(study_id, False)) < 40
        return [t for t in trials if not (late and t.number == 3 and t.state.is_finished())]


@pytest.mark.parametrize("direction", ["minimize", "maximize"])
@pytest.mark.parametrize("settings", SETTINGS, ids=["default", "interval3-min5", "startup12-interval2"])
def test_every_decision_is_optunas(direction: str, settings: dict) -> None:
    decide_as_optuna(direction, settings, None)


def test_every_decision_is_optunas_on_a_list_with_a_gap() -> None:
    decide_as_optuna("minimize", SETTINGS[0], LateTrialThree())


def decide_as_optuna(direction: str, settings: dict, storage) -> None:
    rng = random.Random(f"{direction}{settings}")
    study = optuna.create_study(direction=direction, storage=storage,
                                sampler=optuna.samplers.RandomSampler(seed=0))
    ours, optunas = MedianPruner(**settings), optuna.pruners.MedianPruner(**settings)
    running: list[optuna.Trial] = []
    last: dict[int, int] = {}
    quality: dict[int, float] = {}  # each trial's level: some trials are worse than others throughout
    decided = collections.Counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # both take nanmin / nanpercentile of all-NaN
        for _ in range(1000):
            r = rng.random()
            if r < 0.15 or not running:
                running.append(study.ask())
            elif r < 0.85:
                trial = rng.choice(running)
                step = last.get(trial.number, -1) + rng.choice([1, 1, 1, 2])  # sometimes a step skipped
                last[trial.number] = step
                level = quality.setdefault(trial.number, rng.gauss(0, 3))
                odd = rng.random()
                value = (float("nan") if odd < 0.03 else rng.choice([float("inf"), -float("inf")]) if odd < 0.04
                         else level + rng.gauss(0, 1))
                trial.report(value, step)
                frozen = next(t for t in study.get_trials(deepcopy=False) if t.number == trial.number)
                mine = ours.prune(study, frozen)
                assert mine == optunas.prune(study, frozen), (trial.number, step, frozen.intermediate_values)
                decided[mine] += 1
            else:
                trial = running.pop(rng.randrange(len(running)))
                ending = rng.choice(["complete", "complete", "complete", "pruned", "fail"])
                if ending == "complete":
                    study.tell(trial, rng.gauss(5, 3))
                else:
                    study.tell(trial, state=TrialState.PRUNED if ending == "pruned" else TrialState.FAIL)
    assert decided[True] >= 20 and decided[False] >= 20, decided  # both answers were compared


class CountingStorage(InMemoryStorage):
    def __init__(self) -> None:
        super().__init__()
        self.reads = 0  # by the test's own thread
        self.elsewhere = 0  # by any other thread (the prefetch)
        self.fail_elsewhere = False

    def get_all_trials(self, study_id, deepcopy=True, states=None):
        if threading.current_thread() is threading.main_thread():
            self.reads += 1
        else:
            self.elsewhere += 1
            if self.fail_elsewhere:
                raise ConnectionError("the database went away")
        return super().get_all_trials(study_id, deepcopy, states)


def _study_with_median_one(storage: CountingStorage, **pruner: float) -> tuple[optuna.Study, optuna.Trial]:
    """Three complete trials that reported 1.0 at step 2, and a running one that reports 2.0 there:
    worse than the median, so pruned, unless trials that reported more complete meanwhile."""
    study = optuna.create_study(storage=storage, pruner=MedianPruner(n_startup_trials=1, n_warmup_steps=2, **pruner))
    for _ in range(3):
        t = study.ask()
        t.report(1.0, 2)
        study.tell(t, 1.0)
    return study, study.ask()


def _complete_four_that_reported_ten(study: optuna.Study) -> None:
    for _ in range(4):
        t = study.ask()
        t.report(10.0, 2)
        study.tell(t, 10.0)


def test_the_read_started_with_the_epoch_is_the_reports_and_the_decision_is_on_the_study_then() -> None:
    storage = CountingStorage()
    study, trial = _study_with_median_one(storage)
    prefetch(trial, 2)  # the epoch starts
    time.sleep(0.5)  # the prefetch read finishes while it "trains" (with slack for a loaded machine)
    _complete_four_that_reported_ten(study)  # meanwhile, elsewhere: the median is now 10
    trial.report(2.0, 2)
    storage.reads = 0
    assert trial.should_prune()  # Optuna's answer on the study as the epoch started (median 1.0)
    assert storage.reads == 0 and storage.elsewhere == 1  # the report waited on no read of its own
    # The next report of the same step reads afresh (a prefetch is used once): median 10.
    assert not trial.should_prune() and storage.reads == 1


def test_a_read_older_than_the_limit_is_dropped_and_the_list_read_again() -> None:
    storage = CountingStorage()
    study, trial = _study_with_median_one(storage, prefetch_max_age_s=0.1)
    prefetch(trial, 2)
    time.sleep(0.3)  # a long epoch
    _complete_four_that_reported_ten(study)
    trial.report(2.0, 2)
    storage.reads = 0
    assert not trial.should_prune()  # on the study as now
    assert storage.reads == 1


def test_a_failed_prefetch_leaves_the_report_to_read_for_itself() -> None:
    storage = CountingStorage()
    study, trial = _study_with_median_one(storage)
    storage.fail_elsewhere = True
    prefetch(trial, 2)
    trial.report(2.0, 2)
    storage.reads = 0
    assert trial.should_prune()
    assert storage.reads == 1 and storage.elsewhere == 1


def test_no_prefetch_for_a_report_the_pruner_answers_without_reading() -> None:
    storage = CountingStorage()
    study, trial = _study_with_median_one(storage, interval_steps=2)
    for step in (0, 1, 3):  # warm-up steps, and a step inside an interval (2, 4, ... start one)
        prefetch(trial, step)
    off = MedianPruner(n_startup_trials=1, n_warmup_steps=2, prefetch_max_age_s=0)
    study.pruner = off
    prefetch(trial, 2)  # 0: never prefetched
    time.sleep(0.1)
    assert storage.elsewhere == 0


def test_warm_up_epochs_read_nothing_and_later_ones_read_once() -> None:
    storage = CountingStorage()
    study = optuna.create_study(storage=storage, pruner=MedianPruner(n_startup_trials=1, n_warmup_steps=2))
    for _ in range(3):
        t = study.ask()
        for step in range(4):
            t.report(1.0 + step, step)
        study.tell(t, 1.0)
    t = study.ask()
    for step, expected in [(0, 0), (1, 0), (2, 1), (3, 1)]:
        t.report(100.0, step)
        storage.reads = 0
        pruned = t.should_prune()
        assert storage.reads == expected, (step, storage.reads)
        assert pruned == (step >= 2)


def test_the_study_file_median_is_this_one_with_optunas_argument_checks() -> None:
    pruner = make_pruner(PrunerConfig(type="median", n_startup_trials=4, n_warmup_steps=2), max_epochs=15)
    assert isinstance(pruner, MedianPruner)
    assert (pruner.n_startup_trials, pruner.n_warmup_steps) == (4, 2)
    with pytest.raises(ValueError, match="interval_steps"):
        MedianPruner(interval_steps=0)


def test_the_median_of_the_middle_values_is_numpys_to_the_last_bit() -> None:
    rng = random.Random(3)
    for n in list(range(1, 12)) + [100, 101, 1000, 1001]:
        for _ in range(20):
            values = [rng.choice([rng.gauss(0, 1), round(rng.gauss(0, 1), 1), 1e300, -1e300, math.inf, -math.inf])
                      for _ in range(n)]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # numpy's inf - inf
                expected = np.percentile(np.array(values), 50)
                got = median(sorted(values))
            assert got == expected or (math.isnan(got) and math.isnan(expected)), (sorted(values), got, expected)


def test_after_a_long_epoch_the_read_begins_late_enough_to_be_used_and_one_not_begun_is_cancelled() -> None:
    # Half a second of slack either side of every moment, for a loaded machine.
    storage = CountingStorage()
    study, trial = _study_with_median_one(storage, prefetch_max_age_s=1.0)
    prefetch(trial, 1)  # a warm-up epoch: nothing read, its start noted
    time.sleep(1.2)  # it took 1.2 s
    prefetch(trial, 2)  # so this one's read begins 1.2 - 1.0 / 2 = 0.7 s from now
    time.sleep(0.2)
    assert storage.elsewhere == 0  # not yet
    time.sleep(1.0)
    trial.report(2.0, 2)
    storage.reads = 0
    assert trial.should_prune()
    assert storage.reads == 0 and storage.elsewhere == 1  # begun ~0.5 s before the report: used

    prefetch(trial, 2)  # (the same step again) the last epoch took ~1.2 s: a read ~0.7 s from now
    storage.reads = 0  # but this epoch ends at once
    assert trial.should_prune() and storage.reads == 1  # read now instead
    time.sleep(1.0)
    assert storage.elsewhere == 1  # and the cancelled read never ran

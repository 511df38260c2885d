"""A read of the trial list repeated within a moment is answered once (hpsearch.readmemo), never
across a trial created or finished through the same storage, nor from a read that ran beside one."""

from __future__ import annotations

import threading

import optuna
import pytest
from optuna.storages import InMemoryStorage
from optuna.study import StudyDirection
from optuna.trial import TrialState

from hpsearch.readmemo import ReadMemo

pytestmark = pytest.mark.fast


class Counted(InMemoryStorage):
    """Counts reads of the trial list; `hold` makes the next read or trial creation wait until
    `release` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0
        self.hold = False
        self.reading = threading.Event()
        self.release = threading.Event()

    def create_new_trial(self, study_id, template_trial=None):
        if self.hold:
            self.hold = False
            self.reading.set()
            self.release.wait(10)
        return super().create_new_trial(study_id, template_trial)

    def get_all_trials(self, study_id, deepcopy=True, states=None):
        self.reads += 1
        trials = super().get_all_trials(study_id, deepcopy, states)
        if self.hold:
            self.hold = False
            self.reading.set()
            self.release.wait(10)
        return trials


def setup(max_age_s=60.0):
    inner = Counted()
    memo = ReadMemo(inner, max_age_s=max_age_s)
    sid = memo.create_new_study([StudyDirection.MINIMIZE], "s")
    return inner, memo, sid


def test_a_read_repeated_within_its_age_is_answered_from_the_last():
    inner, memo, sid = setup()
    memo.create_new_trial(sid)
    first = memo.get_all_trials(sid, deepcopy=False)
    again = memo.get_all_trials(sid, deepcopy=False, states=(TrialState.RUNNING,))
    assert inner.reads == 1 and [t.number for t in first] == [t.number for t in again] == [0]
    assert memo.get_all_trials(sid, states=(TrialState.COMPLETE,)) == []
    assert inner.reads == 1
    _, fresh, sid = setup(max_age_s=0.0)
    fresh.get_all_trials(sid)
    fresh.get_all_trials(sid)
    assert fresh.inner.reads == 2  # older than max_age: read again


def test_a_trial_created_or_finished_here_is_read_at_once():
    inner, memo, sid = setup()
    memo.get_all_trials(sid)
    tid = memo.create_new_trial(sid)
    assert [t.number for t in memo.get_all_trials(sid)] == [0]  # the slot claim counts it
    memo.set_trial_state_values(tid, TrialState.COMPLETE, [1.0])
    assert [t.state for t in memo.get_all_trials(sid)] == [TrialState.COMPLETE]
    assert inner.reads == 3


def test_a_read_that_ran_beside_a_new_trial_is_not_kept():
    inner, memo, sid = setup()
    inner.hold = True
    reader = threading.Thread(target=memo.get_all_trials, args=(sid,))
    reader.start()
    assert inner.reading.wait(10)
    memo.create_new_trial(sid)  # while the read is still out
    inner.release.set()
    reader.join(10)
    assert [t.number for t in memo.get_all_trials(sid)] == [0]


def test_a_study_through_it_sees_its_own_trials():
    study = optuna.create_study(storage=ReadMemo(InMemoryStorage()))
    for i in range(5):
        trial = study.ask()
        assert [t.number for t in study.get_trials(states=(TrialState.RUNNING,))] == [i]
        study.tell(trial, float(i))
    assert [t.value for t in study.get_trials()] == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_a_read_made_while_a_trial_is_created_is_not_kept():
    inner, memo, sid = setup()
    inner.hold = True
    creator = threading.Thread(target=memo.create_new_trial, args=(sid,))
    creator.start()
    assert inner.reading.wait(10)
    assert memo.get_all_trials(sid) == []  # read while the trial is being made
    inner.release.set()
    creator.join(10)
    assert [t.number for t in memo.get_all_trials(sid)] == [0]


def test_reads_by_state_answer_as_a_filter_of_the_whole_list_as_trials_come_and_go() -> None:
    """The unfinished states skip the finished run from trial 0, which only grows: checked against a
    plain filter while trials are created, finish out of order, fail and are re-queued."""
    import random

    inner = InMemoryStorage()
    memo = ReadMemo(inner, max_age_s=0)  # every read a real one
    study = optuna.create_study(storage=memo)
    sid = memo.get_study_id_from_name(study.study_name)
    rng = random.Random(5)
    running: list[optuna.Trial] = []
    asks = [(TrialState.WAITING,), (TrialState.RUNNING,), (TrialState.RUNNING, TrialState.WAITING),
            (TrialState.COMPLETE,), (TrialState.FAIL, TrialState.WAITING), None]
    for _ in range(300):
        move = rng.random()
        if move < 0.4 or not running:
            running.append(study.ask())
        elif move < 0.5:
            study.enqueue_trial({})
        else:
            t = running.pop(rng.randrange(len(running)))
            study.tell(t, 1.0) if move < 0.8 else study.tell(t, state=TrialState.FAIL)
        for states in asks:
            got = [t.number for t in memo.get_all_trials(sid, deepcopy=False, states=states)]
            want = [t.number for t in inner.get_all_trials(sid, deepcopy=False, states=states)]
            assert got == want, (states, got, want)

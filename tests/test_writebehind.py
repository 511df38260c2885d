"""A worker's trial writes sent in the background (hpsearch.writebehind): they return before they
land, a trial's reads and its tell wait for them, the last value written is the one stored, and a
refused write surfaces at the trial's next call."""

from __future__ import annotations

import copy
import random
import threading
import time

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.storages import InMemoryStorage
from optuna.trial import TrialState

from hpsearch.writebehind import WriteBehind, then

pytestmark = pytest.mark.fast

WRITES = ("set_trial_param", "set_trial_user_attr", "set_trial_system_attr", "set_trial_intermediate_value")


class Gated(InMemoryStorage):
    """Trial writes wait for `gate` (and, with `jitter`, a random moment) before they land."""

    def __init__(self, jitter: float = 0.0) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.gate.set()
        self.jitter = jitter
        self.landed: list[tuple] = []

    def _land(self, name: str, *args):
        self.gate.wait()
        if self.jitter:
            time.sleep(random.uniform(0, self.jitter))
        result = getattr(super(), name)(*args)
        self.landed.append((name, *args[1:2]))
        return result

    def get_trial(self, trial_id):
        return copy.deepcopy(super().get_trial(trial_id))  # as a database answers: not the object Optuna's Trial edits

    def set_trial_param(self, *args):
        return self._land("set_trial_param", *args)

    def set_trial_user_attr(self, *args):
        return self._land("set_trial_user_attr", *args)

    def set_trial_system_attr(self, *args):
        return self._land("set_trial_system_attr", *args)

    def set_trial_intermediate_value(self, *args):
        return self._land("set_trial_intermediate_value", *args)


def test_trial_writes_return_before_they_land_and_tell_waits_for_them():
    inner = Gated()
    study = optuna.create_study(storage=WriteBehind(inner), study_name="s")
    trial = study.ask()
    inner.gate.clear()  # nothing the trial writes can land now
    x = trial.suggest_float("x", 0, 1)
    trial.set_user_attr("seed", 7)
    trial.report(0.5, 1)
    assert trial.should_prune() is False  # the pruner reads the trial list: it does not wait either
    stored = inner.get_trial(trial._trial_id)
    assert stored.params == {} and stored.user_attrs == {} and stored.intermediate_values == {}

    told = threading.Thread(target=study.tell, args=(trial, 0.25))
    told.start()
    told.join(0.3)
    assert told.is_alive(), "tell finished the trial while its writes were still queued"
    assert inner.get_trial(trial._trial_id).state == TrialState.RUNNING
    inner.gate.set()
    told.join(10)
    t = inner.get_trial(trial._trial_id)
    assert (t.state, t.value, t.params, t.user_attrs, t.intermediate_values) == (
        TrialState.COMPLETE, 0.25, {"x": x}, {"seed": 7}, {1: 0.5})


def test_a_trial_read_waits_for_its_writes():
    inner = Gated()
    storage = WriteBehind(inner)
    study = optuna.create_study(storage=storage)
    trial = study.ask()
    inner.gate.clear()
    trial.set_user_attr("curve", [1])
    seen: list = []
    reader = threading.Thread(target=lambda: seen.append(storage.get_trial(trial._trial_id).user_attrs))
    reader.start()
    reader.join(0.3)
    assert reader.is_alive() and not seen
    inner.gate.set()
    reader.join(10)
    assert seen == [{"curve": [1]}]


@pytest.mark.parametrize("seed", range(5))
def test_the_last_value_written_is_the_one_stored(seed):
    """Random writes of a few keys, landing at random moments, 1 to 4 at a time: after the tell the
    trial holds exactly what the same writes made directly would leave."""
    rng = random.Random(seed)
    inner, direct = Gated(jitter=0.002), InMemoryStorage()
    storages = [WriteBehind(inner, senders=rng.randint(1, 4)), direct]
    ids = []
    for s in storages:
        sid = s.create_new_study([optuna.study.StudyDirection.MINIMIZE], "s")
        ids.append(s.create_new_trial(sid))
    for _ in range(200):
        method = rng.choice(WRITES)
        key = rng.choice(["a", "b", "c"])
        value = rng.random()
        for s, tid in zip(storages, ids):
            if method == "set_trial_param":
                s.set_trial_param(tid, key, value, FloatDistribution(0, 1))
            elif method == "set_trial_intermediate_value":
                s.set_trial_intermediate_value(tid, "abc".index(key), value)
            else:
                getattr(s, method)(tid, key, value)
    for s, tid in zip(storages, ids):
        s.set_trial_state_values(tid, TrialState.COMPLETE, [1.0])
    got, want = (s.get_trial(tid) for s, tid in zip(storages, ids))
    assert (got.params, got.user_attrs, got.system_attrs, got.intermediate_values) == (
        want.params, want.user_attrs, want.system_attrs, want.intermediate_values)
    # Coalescing may skip a value that was replaced before it left, never reorder two of a key.
    assert len(inner.landed) <= 200


def test_a_refused_write_surfaces_at_the_trials_next_call_and_its_tell():
    inner = InMemoryStorage()
    storage = WriteBehind(inner)
    study = optuna.create_study(storage=storage)
    trial = study.ask()
    tid = trial._trial_id
    inner.set_trial_state_values(tid, TrialState.FAIL)  # another worker's sweep failed it meanwhile
    trial.set_user_attr("curve", [1])  # queued: the refusal comes back later
    storage.flush(tid)
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        trial.report(0.1, 1)
    other = study.ask()  # another trial is not held up by it
    other.set_user_attr("ok", True)
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        storage.set_trial_state_values(tid, TrialState.COMPLETE, [0.1])
    study.tell(other, 1.0)
    assert inner.get_trial(other._trial_id).user_attrs == {"ok": True}
    assert inner.get_trial(tid).state == TrialState.FAIL


def test_then_runs_once_the_writes_before_it_landed():
    """The epoch checkpoint's old file is removed only once the pointer to the new one is stored."""
    inner = Gated()
    storage = WriteBehind(inner)
    study = optuna.create_study(storage=storage)
    trial = study.ask()
    inner.gate.clear()
    trial.set_user_attr("epoch_checkpoint", "new")
    seen: list = []
    done = threading.Event()
    then(storage, lambda: (seen.append(inner.get_trial(trial._trial_id).user_attrs), done.set()))
    assert not done.wait(0.3)
    inner.gate.set()
    assert done.wait(10)
    assert seen == [{"epoch_checkpoint": "new"}]
    ran: list = []
    then(InMemoryStorage(), lambda: ran.append(1))  # a storage that writes at once: at once
    assert ran == [1]


def test_a_value_the_storage_cannot_store_fails_where_it_is_set():
    study = optuna.create_study(storage=WriteBehind(InMemoryStorage()))
    trial = study.ask()
    with pytest.raises(TypeError):
        trial.set_user_attr("bad", object())


def test_a_callback_of_a_trial_whose_write_was_refused_does_not_run():
    """A trial taken over while it trained: the old epoch checkpoint, which its re-queued copy
    resumes from, must not be removed after the pointer to the new one was refused."""
    inner = InMemoryStorage()
    storage = WriteBehind(inner)
    study = optuna.create_study(storage=storage)
    trial = study.ask()
    tid = trial._trial_id
    inner.set_trial_state_values(tid, TrialState.FAIL)  # taken over
    trial.set_user_attr("epoch_checkpoint", "new")  # refused in the background
    ran: list = []
    then(storage, lambda: ran.append("old file removed"), tid)
    then(storage, lambda: ran.append("unrelated"))
    storage.flush()
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        storage.set_trial_state_values(tid, TrialState.FAIL)  # the error, raised once and cleared
    then(storage, lambda: ran.append("later"), tid)
    storage.flush()
    assert ran == ["unrelated"]


def test_the_id_of_a_trial_made_here_is_known_once_it_is_read():
    class Lookups(Gated):
        looked_up = 0

        def get_trial_id_from_study_id_trial_number(self, study_id, trial_number):
            self.looked_up += 1
            return super().get_trial_id_from_study_id_trial_number(study_id, trial_number)

    inner = Lookups()
    storage = WriteBehind(inner)
    study = optuna.create_study(storage=storage)
    sid = storage.get_study_id_from_name(study.study_name)
    first, second = study.ask(), study.ask()  # Optuna's Trial reads each trial it makes
    assert storage.get_trial_id_from_study_id_trial_number(sid, second.number) == inner.get_trial_id_from_study_id_trial_number(sid, second.number)
    inner.looked_up = 0
    for t in (first, second):
        assert storage.get_trial(storage.get_trial_id_from_study_id_trial_number(sid, t.number)).number == t.number
    assert inner.looked_up == 0

"""A worker's trial writes and its tell sent in the background (hpsearch.writebehind): they return
before they land, the tell lands after the trial's writes, reads through the worker's storage see
the trial as written and told meanwhile, the last value written is the one stored, a refused write
surfaces at the trial's next call and a refused tell from `lost()`."""

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

    def set_trial_state_values(self, trial_id, state, values=None):
        changed = super().set_trial_state_values(trial_id, state, values)
        self.landed.append(("set_trial_state_values", state))
        return changed


def test_trial_writes_and_the_tell_return_before_they_land_and_the_tell_lands_last():
    inner = Gated()
    storage = WriteBehind(inner)
    study = optuna.create_study(storage=storage, study_name="s")
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
    told.join(5)
    assert not told.is_alive(), "tell waited for the trial's writes"
    assert inner.get_trial(trial._trial_id).state == TrialState.RUNNING  # nothing has landed
    # ... but every read through the worker's storage sees the trial as told.
    for t in (storage.get_trial(trial._trial_id), study.get_trials(deepcopy=False)[0],
              study.get_trials(states=(TrialState.COMPLETE,))[0]):
        assert (t.state, t.value, t.params, t.user_attrs, t.intermediate_values) == (
            TrialState.COMPLETE, 0.25, {"x": x}, {"seed": 7}, {1: 0.5})
    assert study.get_trials(states=(TrialState.RUNNING,)) == []
    inner.gate.set()
    storage.flush()
    t = inner.get_trial(trial._trial_id)
    assert (t.state, t.value, t.params, t.user_attrs, t.intermediate_values) == (
        TrialState.COMPLETE, 0.25, {"x": x}, {"seed": 7}, {1: 0.5})
    assert inner.landed[-1] == ("set_trial_state_values", TrialState.COMPLETE), "the state landed before a write"
    assert storage.lost() == []


def test_a_trial_run_here_reads_with_its_queued_writes_and_another_waits_for_them():
    inner = Gated()
    storage = WriteBehind(inner)
    study = optuna.create_study(storage=storage)
    trial = study.ask()
    inner.gate.clear()
    trial.set_user_attr("curve", [1])
    assert storage.get_trial(trial._trial_id).user_attrs == {"curve": [1]}  # at once, as it will be stored
    assert inner.get_trial(trial._trial_id).user_attrs == {}
    inner.gate.set()
    storage.flush()
    # A trial this storage did not make or start (another worker's, failed by a sweep here, say):
    # its read waits for the writes made to it here.
    sid = storage.get_study_id_from_name(study.study_name)
    other = inner.create_new_trial(sid)
    inner.gate.clear()
    storage.set_trial_user_attr(other, "stop_reason", "stale")
    seen: list = []
    reader = threading.Thread(target=lambda: seen.append(storage.get_trial(other).user_attrs))
    reader.start()
    reader.join(0.3)
    assert reader.is_alive() and not seen
    inner.gate.set()
    reader.join(10)
    assert seen == [{"stop_reason": "stale"}]


def two_told(inner: Gated):
    """A study on `inner` behind a WriteBehind, with two trials told while nothing can land: the
    first one's tell queued behind its attribute, the second's behind the first one's tell."""
    storage = WriteBehind(inner)
    study = optuna.create_study(storage=storage)
    first, second = study.ask(), study.ask()
    inner.gate.clear()
    first.set_user_attr("stop_reason", "done")
    study.tell(first, 1.0)
    study.tell(second, 2.0)
    return storage, study, first, second


def test_a_tell_refused_after_it_was_sent_behind_comes_back_from_lost():
    inner = Gated()
    storage, study, first, second = two_told(inner)
    inner.set_trial_state_values(first._trial_id, TrialState.FAIL)  # a sweep elsewhere failed it meanwhile
    inner.gate.set()
    storage.flush()
    lost = storage.lost()
    assert [(x.number, x.state, type(x.error)) for x in lost] == [
        (first.number, TrialState.COMPLETE, optuna.exceptions.UpdateFinishedTrialError)]
    assert storage.lost() == []  # each one once
    assert [t.state for t in study.get_trials()] == [TrialState.FAIL, TrialState.COMPLETE]
    assert storage.get_trial(first._trial_id).state == TrialState.FAIL  # no longer read as told


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
        s.get_trial(ids[-1])  # as Optuna's Trial reads the trial it makes
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
    fields = ("state", "values", "params", "distributions", "user_attrs", "system_attrs", "intermediate_values")
    want = direct.get_trial(ids[1])
    told = storages[0].get_trial(ids[0])  # read while the writes may still be landing: as told
    assert [getattr(told, f) for f in fields] == [getattr(want, f) for f in fields]
    storages[0].flush()
    got = inner.get_trial(ids[0])
    assert [getattr(got, f) for f in fields] == [getattr(want, f) for f in fields]
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


def test_the_worker_notes_a_refused_tell_and_counts_its_budget_afresh():
    import io

    from rich.console import Console

    from hpsearch.errors import StorageError
    from hpsearch.progress import Display
    from hpsearch.storage import StorageStopped
    from hpsearch.study import BudgetTally
    from hpsearch.worker import _refused_tells

    class Gone(Gated):
        """The storage gone for good (past reconnect_timeout) when a given trial's tell is sent."""

        gone_for: int | None = None
        error: Exception = StorageError("the storage did not come back within 600 s")

        def set_trial_state_values(self, trial_id, state, values=None):
            if trial_id == self.gone_for:
                raise self.error
            return super().set_trial_state_values(trial_id, state, values)

    inner = Gone()
    storage, study, first, second = two_told(inner)
    tally = BudgetTally()
    before = tally.state(study.get_trials(deepcopy=False), 10)  # read as told: both complete
    assert (before.complete, before.failed) == (2, 0)
    inner.set_trial_state_values(first._trial_id, TrialState.FAIL)  # a sweep elsewhere
    inner.gate.set()
    storage.flush()
    log = io.StringIO()
    assert _refused_tells(storage, tally, Display(Console(file=log, width=400), live=False))
    assert f"trial {first.number} was finished elsewhere before its complete result was recorded here" in log.getvalue()
    after = tally.state(study.get_trials(deepcopy=False), 10)
    assert (after.complete, after.failed) == (1, 1)  # not the stale prefix's 2 complete
    assert not _refused_tells(storage, tally, Display(Console(file=log, width=400), live=False))

    third = study.ask()
    inner.gone_for = third._trial_id
    study.tell(third, 3.0)
    storage.flush()
    with pytest.raises(StorageError):
        _refused_tells(storage, tally, Display(Console(file=log, width=400), live=False))

    # A stop while the storage was away cut the tell short: the trial is left to the sweep (it stays
    # RUNNING, and is re-queued once its lease lapses), and the worker leaves as stopped, not failed.
    fourth = study.ask()
    inner.gone_for, inner.error = fourth._trial_id, StorageStopped("stopped while waiting for the storage")
    study.tell(fourth, 4.0)
    storage.flush()
    assert _refused_tells(storage, tally, Display(Console(file=log, width=400), live=False))
    assert f"trial {fourth.number} was finished elsewhere" not in log.getvalue()
    assert inner.get_trial(fourth._trial_id).state == TrialState.RUNNING


def test_a_trials_tail_is_sent_after_the_next_trial_has_begun(monkeypatch):
    """A trial's last writes and its tell wait until the next trial writes (its creation, reads and
    sampling, which the worker waits on, go first), or until a flush."""
    import hpsearch.writebehind as wb

    monkeypatch.setattr(wb, "HOLD_S", 60.0)  # only the next trial's write or a flush ends the hold here
    inner = Gated()
    storage = WriteBehind(inner)
    study = optuna.create_study(storage=storage)
    first = study.ask()
    first.set_user_attr("stop_reason", "done")
    study.tell(first, 1.0)
    second = study.ask()  # created and read while the first one's tail waits
    assert study.get_trials(deepcopy=False)[0].state == TrialState.COMPLETE  # read as told meanwhile
    time.sleep(0.3)
    assert inner.get_trial(first._trial_id).state == TrialState.RUNNING and inner.landed == []
    x = second.suggest_float("x", 0, 1)  # the next trial's first write: the tail goes now
    deadline = time.monotonic() + 10
    while inner.get_trial(second._trial_id).params != {"x": x} and time.monotonic() < deadline:
        time.sleep(0.01)
    assert inner.landed[:3] == [("set_trial_user_attr", "stop_reason"), ("set_trial_state_values", TrialState.COMPLETE),
                                ("set_trial_param", "x")]
    study.tell(second, 2.0)
    time.sleep(0.3)
    assert inner.get_trial(second._trial_id).state == TrialState.RUNNING  # held again, until ...
    storage.flush()  # ... a flush (the worker leaving), which sends at once
    assert inner.get_trial(second._trial_id).state == TrialState.COMPLETE


def test_a_call_waited_on_holds_the_queue_back_only_for_a_while(monkeypatch):
    """Nothing new is sent while a call is waited on, but only for `PATIENCE_S`: threads sharing
    a storage wait on some call nearly all the time between them, and a trial's tell held longer
    let its lease lapse (64 workers on 4 storages failed every trial that way)."""
    import hpsearch.writebehind as wb

    monkeypatch.setattr(wb, "PATIENCE_S", 1.0)  # well past the checks below, on a loaded machine too
    release = threading.Event()

    class SlowReads(Gated):
        def get_all_trials(self, study_id, deepcopy=True, states=None):
            if threading.current_thread().name == "reader":
                release.wait(30)  # another thread's read, under way throughout
            return super().get_all_trials(study_id, deepcopy, states)

    inner = SlowReads()
    storage = WriteBehind(inner)
    study = optuna.create_study(storage=storage)
    trial = study.ask()
    reader = threading.Thread(target=study.get_trials, name="reader")
    reader.start()
    try:
        time.sleep(0.1)  # the read is under way
        trial.set_user_attr("a", 1)
        time.sleep(0.15)
        assert inner.landed == []  # held back while the read is under way ...
        deadline = time.monotonic() + 5
        while not inner.landed and time.monotonic() < deadline:
            time.sleep(0.01)
        assert inner.landed == [("set_trial_user_attr", "a")]  # ... but not for as long as it lasts
        assert reader.is_alive()
    finally:
        release.set()
        reader.join()

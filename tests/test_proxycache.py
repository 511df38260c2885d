"""The proxy's trial cache (hpsearch.proxycache) against the database it fronts.

A study is driven at random through the cache (trials asked, parameters, attributes, reports,
state changes, re-queued copies) while a second writer works on the same database directly, as
another proxy or a worker on the database would. After every step the cache must answer exactly
as the database does for everything written through it and for every trial created anywhere,
after each trial it makes, and for the second writer's other writes once a refresh is due.
"""

from __future__ import annotations

import random
import threading
import time

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.storages import get_storage
from optuna.trial import TrialState

from hpsearch.proxycache import ProxyCache
from hpsearch.storage import RetryingStorage, open_rdb

pytestmark = pytest.mark.fast


def picture(trials):
    """What a reader can see of each trial."""
    return [(t.number, t.state, t.values, t.params, t.user_attrs, t.system_attrs, t.intermediate_values,
             t.datetime_start, t.datetime_complete) for t in trials]


@pytest.fixture
def db(tmp_path):
    url = f"sqlite:///{tmp_path / 'c.db'}"
    rdb = open_rdb(url)
    yield url, rdb
    rdb.engine.dispose()


def cache_over(url, rdb, refresh_s):
    return ProxyCache(RetryingStorage(get_storage(rdb), url), refresh_s)


def step(rng: random.Random, study: optuna.Study, storage) -> None:
    """One random write through `study` (whose storage is `storage`)."""
    sid = storage.get_study_id_from_name(study.study_name)
    running = storage.get_all_trials(sid, deepcopy=False, states=(TrialState.RUNNING,))
    event = rng.random()
    if event < 0.25 or not running:
        if rng.random() < 0.2:
            study.enqueue_trial({"x": rng.random()}, user_attrs={"queued": True})
        else:
            study.ask({"x": FloatDistribution(0, 1)})
        return
    t = rng.choice(running)
    tid = storage.get_trial_id_from_study_id_trial_number(sid, t.number)
    if event < 0.45:
        storage.set_trial_user_attr(tid, rng.choice("abc"), {"v": rng.random()})
    elif event < 0.6:
        storage.set_trial_system_attr(tid, "hpsearch:lease", time.time())
    elif event < 0.7:
        # (a new name: Optuna never sets a trial's parameter twice)
        storage.set_trial_param(tid, f"p{len(t.params)}", rng.random(), FloatDistribution(0, 1))
    elif event < 0.8:
        storage.set_trial_intermediate_value(tid, rng.randrange(4), rng.random())
    else:
        state = rng.choice([TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL])
        study.tell(t.number, rng.random() if state == TrialState.COMPLETE else None, state=state)


@pytest.mark.parametrize("seed", range(4))
def test_the_cache_answers_as_the_database_for_its_own_writes_and_every_trial_before_its_own(db, seed):
    url, rdb = db
    cache = cache_over(url, rdb, refresh_s=1e9)  # no refresh: only its own writes and its probes
    direct = RetryingStorage(rdb, url)
    via_cache = optuna.create_study(storage=cache, study_name="s", sampler=optuna.samplers.RandomSampler(seed))
    sid = cache.get_study_id_from_name("s")
    rng = random.Random(seed)
    for _ in range(120):
        step(rng, via_cache, cache)
        assert picture(cache.get_all_trials(sid, deepcopy=False)) == picture(direct.get_all_trials(sid))
        if rng.random() < 0.15:  # made elsewhere: in the list once this cache makes a trial
            made = direct.create_new_trial(sid)  # (not `ask`, which could pop a WAITING trial: a write)
            mine = cache.create_new_trial(sid)
            ours = cache.get_all_trials(sid, deepcopy=False)
            theirs = direct.get_all_trials(sid)
            assert [t.number for t in ours] == [t.number for t in theirs]
            assert picture(ours[-2:]) == picture(theirs[-2:])
            assert [cache.get_trial(made).number, cache.get_trial(mine).number] == [t.number for t in theirs[-2:]]
    counts = {s: len(cache.get_all_trials(sid, states=(s,))) for s in TrialState}
    assert counts[TrialState.COMPLETE] and counts[TrialState.RUNNING] and counts[TrialState.WAITING] >= 0


def test_writes_made_elsewhere_are_seen_once_a_refresh_is_due(db):
    url, rdb = db
    cache = cache_over(url, rdb, refresh_s=0.3)
    direct = RetryingStorage(rdb, url)
    study = optuna.create_study(storage=cache, study_name="s")
    trial = study.ask()
    sid = cache.get_study_id_from_name("s")
    cache.get_all_trials(sid)
    tid = direct.get_trial_id_from_study_id_trial_number(sid, trial.number)
    direct.set_trial_user_attr(tid, "elsewhere", 1)
    direct.set_trial_state_values(tid, TrialState.FAIL)
    stale = cache.get_all_trials(sid)[0]
    assert stale.state == TrialState.RUNNING and "elsewhere" not in stale.user_attrs  # within refresh_s
    time.sleep(0.35)
    assert picture(cache.get_all_trials(sid)) == picture(direct.get_all_trials(sid))
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):  # the database decides writes
        cache.set_trial_user_attr(tid, "late", 1)


def test_a_trial_created_elsewhere_and_written_here_before_a_read_is_whole(db):
    url, rdb = db
    cache = cache_over(url, rdb, refresh_s=1e9)
    direct = RetryingStorage(rdb, url)
    optuna.create_study(storage=cache, study_name="s").ask()
    sid = cache.get_study_id_from_name("s")
    cache.get_all_trials(sid)
    tid = direct.create_new_trial(sid)
    cache.set_trial_user_attr(tid, "k", "v")  # a trial this cache has not seen yet
    cache.set_trial_param(tid, "x", 0.5, FloatDistribution(0, 1))
    cache.create_new_trial(sid)  # its probe takes the one made elsewhere from the database
    assert picture(cache.get_all_trials(sid)) == picture(direct.get_all_trials(sid))
    assert cache.get_all_trials(sid)[1].user_attrs == {"k": "v"}


def test_writes_and_trials_made_during_a_full_read_are_kept(db):
    """A full read takes the database as it was when it began: what this proxy wrote and made
    meanwhile is applied again on top of it, not lost until the next refresh."""
    url, rdb = db
    cache = cache_over(url, rdb, refresh_s=1e9)
    direct = RetryingStorage(rdb, url)
    study = optuna.create_study(storage=cache, study_name="s")
    running = study.ask()
    sid = cache.get_study_id_from_name("s")
    tid = cache.get_trial_id_from_study_id_trial_number(sid, running.number)
    cache.get_all_trials(sid)
    read, written = threading.Event(), threading.Event()
    real = cache.inner.get_all_trials

    def slow_read(*args, **kwargs):  # the database read done, the answer not yet in the cache
        trials = real(*args, **kwargs)
        read.set()
        written.wait(10)
        return trials

    cache.inner.get_all_trials = slow_read
    cache.refresh_s = 0.0
    reader = threading.Thread(target=cache.get_all_trials, args=(sid,))
    reader.start()
    assert read.wait(10)
    cache.refresh_s = 1e9  # the reads below (the ask's) answer from memory and do not wait for it
    cache.set_trial_user_attr(tid, "during", 1)
    study.ask()  # a new trial, made while the read was running
    written.set()
    reader.join()
    cache.inner.get_all_trials = real
    mine = cache.get_all_trials(sid)
    assert [t.number for t in mine] == [0, 1] and mine[0].user_attrs == {"during": 1}
    assert picture(mine) == picture(direct.get_all_trials(sid))


def test_readers_and_writers_in_threads_end_as_the_database(db):
    """The proxy serves its requests from a thread pool: full reads racing writes lose none."""
    url, rdb = db
    cache = cache_over(url, rdb, refresh_s=0.0)  # a full read at every read: the most racing
    direct = RetryingStorage(rdb, url)
    study = optuna.create_study(storage=cache, study_name="s")
    sid = cache.get_study_id_from_name("s")
    trials = [study.ask() for _ in range(4)]
    stop = threading.Event()

    def read():
        while not stop.is_set():
            cache.get_all_trials(sid, deepcopy=False)

    readers = [threading.Thread(target=read) for _ in range(3)]
    for r in readers:
        r.start()
    try:
        for i in range(60):
            t = trials[i % 4]
            tid = cache.get_trial_id_from_study_id_trial_number(sid, t.number)
            cache.set_trial_user_attr(tid, f"k{i}", i)
    finally:
        stop.set()
        for r in readers:
            r.join()
    cache.refresh_s = 1e9  # from here on the cache answers from memory: it must hold every write
    assert picture(cache.get_all_trials(sid)) == picture(direct.get_all_trials(sid))
    assert sum(len(t.user_attrs) for t in cache.get_all_trials(sid)) == 60

"""The storage layer: retries, writes that landed, stop requests and redaction (on a storage that
fails on purpose), then leases, the sweep and the exact budget on SQLite, PostgreSQL and the gRPC
proxy alike."""

from __future__ import annotations

import io
import logging
import secrets
import threading
import time
from pathlib import Path

import optuna
import pytest
from optuna.storages import InMemoryStorage
from optuna.trial import TrialState
from rich.console import Console

import hpsearch.storage as storage_mod
from conftest import REPO
from hpsearch.config import load_config
from hpsearch.errors import StorageError
from hpsearch.objective import suggest_hparams, work_ahead
from hpsearch.progress import Display
from hpsearch.recovery import LEASE, OVER_BUDGET, Lease, Sweeper, trial_id
from hpsearch.signals import StopRequest
from hpsearch.storage import RetryingStorage, StorageStopped, open_storage
from hpsearch.study import budget_state, open_study
from hpsearch.worker import open_worker_storage, trial_loop
from storages import FlakyStorage, Proxy, pg_database

URL = "postgresql+psycopg2://someone:s3cret-pw@db.example:5432/hpsearch"


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch):
    monkeypatch.setattr(storage_mod, "FIRST_DELAY_S", 0.01)
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def flaky(fail: dict, timeout: float = 30, stop=None) -> tuple[RetryingStorage, FlakyStorage]:
    inner = FlakyStorage(InMemoryStorage(), fail)
    return RetryingStorage(inner, URL, timeout, stop), inner


# --- retries, on a storage that fails on purpose --------------------------------------------------


@pytest.mark.fast
def test_a_tell_whose_commit_landed_before_the_connection_broke_is_done():
    storage, inner = flaky({})
    study = optuna.create_study(storage=storage)
    trial = study.ask()
    inner.fail["set_trial_state_values"] = ("after", 1)
    study.tell(trial, 0.25)  # was: UpdateFinishedTrialError from the retry
    assert inner.calls["set_trial_state_values"] == 2
    [t] = study.get_trials()
    assert t.state == TrialState.COMPLETE and t.value == 0.25


@pytest.mark.fast
def test_a_study_created_before_the_connection_broke_is_found_on_the_retry():
    storage, inner = flaky({"create_new_study": ("after", 1)})
    study = optuna.create_study(storage=storage, study_name="s")
    assert [s.study_name for s in storage.get_all_studies()] == ["s"]
    assert study.study_name == "s" and inner.calls["create_new_study"] == 2


@pytest.mark.fast
def test_a_write_that_did_not_land_is_retried_until_it_does():
    storage, inner = flaky({"set_trial_user_attr": ("before", 2)})
    study = optuna.create_study(storage=storage)
    trial = study.ask()
    trial.set_user_attr("k", 1)
    assert inner.calls["set_trial_user_attr"] == 3
    assert study.get_trials()[0].user_attrs == {"k": 1}


@pytest.mark.fast
def test_a_state_someone_else_wrote_is_not_taken_for_ours():
    storage, inner = flaky({})
    study = optuna.create_study(storage=storage)
    trial = study.ask()
    tid = trial_id(storage, study, trial.number)
    inner.inner.set_trial_state_values(tid, TrialState.FAIL)  # another worker's sweep
    inner.fail["set_trial_state_values"] = ("before", 1)
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        storage.set_trial_state_values(tid, TrialState.COMPLETE, [1.0])


@pytest.mark.fast
def test_errors_that_waiting_cannot_fix_are_not_retried():
    storage, inner = flaky({})
    with pytest.raises(KeyError):
        storage.get_study_id_from_name("no such study")
    assert inner.calls["get_study_id_from_name"] == 1


@pytest.mark.fast
def test_a_stop_request_ends_the_wait_at_once():
    stop = StopRequest()
    storage, inner = flaky({"get_all_studies": ("before", 1000)}, timeout=600, stop=stop)
    stop.request()
    with pytest.raises(StorageStopped, match="stopped while waiting for storage"):
        storage.get_all_studies()
    assert inner.calls["get_all_studies"] == 1


@pytest.mark.fast
def test_a_stop_request_during_a_long_back_off_wakes_it(monkeypatch):
    monkeypatch.setattr(storage_mod, "FIRST_DELAY_S", 300.0)
    stop = StopRequest()
    storage, inner = flaky({"get_all_studies": ("before", 1000)}, timeout=600, stop=stop)
    threading.Timer(0.2, stop.request).start()
    started = time.monotonic()
    with pytest.raises(StorageStopped):
        storage.get_all_studies()
    assert time.monotonic() - started < 60  # not the 300 s back-off
    assert inner.calls["get_all_studies"] == 1


@pytest.mark.fast
def test_giving_up_is_one_error_without_the_password(caplog):
    storage, inner = flaky({"get_all_studies": ("before", 1000)}, timeout=0.1)
    with caplog.at_level("WARNING", logger="hpsearch"), pytest.raises(StorageError) as e:
        storage.get_all_studies()
    message = str(e.value)
    assert "reconnect_timeout" in message and "***" in message and "s3cret-pw" not in message
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "retrying get_all_studies" in logged and "s3cret-pw" not in logged
    assert inner.calls["get_all_studies"] >= 2


@pytest.mark.fast
def test_no_private_optuna_name_in_src():
    """Optuna documents underscored names as not for users: none may appear in hpsearch."""
    import re

    bad = re.compile(r"optuna(\.\w+)*\._(?!_)|\._(trial_id|study_id|storage|backend|cached_frozen_trial)\b"
                     r"|_create_scoped_session|storages\._rdb")
    found = []
    for path in (REPO / "src" / "hpsearch").glob("*.py"):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if bad.search(line) and "getLogger" not in line:
                found.append(f"{path.name}:{n}: {line.strip()}")
    assert found == []


# --- the same tests on every real storage ----------------------------------------------------------


@pytest.fixture(scope="module")
def pg():
    with pg_database() as url:
        yield url


@pytest.fixture(scope="module")
def proxy(pg, tmp_path_factory):
    p = Proxy(pg, tmp_path_factory.mktemp("proxy") / "proxy.log").start()
    yield p
    p.stop()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres),
                        pytest.param("grpc", marks=pytest.mark.postgres)])
def storage_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'hpsearch.db'}"
    if request.param == "postgresql":
        return request.getfixturevalue("pg")
    return request.getfixturevalue("proxy").url


def config(n_trials: int = 10, heartbeat: int = 1, grace: int = 2):
    cfg = load_config(REPO / "studies" / "cnn.toml")
    name = f"t-{secrets.token_hex(4)}"
    return cfg.model_copy(update={
        "study": cfg.study.model_copy(update={"name": name}),
        "budget": cfg.budget.model_copy(update={"n_trials": n_trials}),
        "storage": cfg.storage.model_copy(update={"heartbeat_interval": heartbeat, "grace_period": grace,
                                                  "reconnect_timeout": 60.0}),
    })


def test_a_tell_that_landed_is_done_on_a_real_storage(storage_url):
    cfg = config()
    storage = open_storage(storage_url, cfg.storage)
    study = open_study(cfg, storage)
    trial = study.ask()
    storage.backend = flaky_backend = FlakyStorage(storage.backend, {"set_trial_state_values": ("after", 1)})
    study.tell(trial, 0.5)
    assert flaky_backend.calls["set_trial_state_values"] == 2
    fresh = open_storage(storage_url)
    [t] = optuna.load_study(study_name=cfg.study.name, storage=fresh).get_trials()
    assert t.state == TrialState.COMPLETE and t.value == 0.5
    storage.close()
    fresh.close()


def test_expired_leases_are_failed_and_requeued_and_live_ones_kept(storage_url):
    cfg = config(grace=2)
    storage = open_storage(storage_url, cfg.storage)
    study = open_study(cfg, storage)

    def running(lease_age: float | None) -> tuple[int, int]:
        trial = study.ask()
        tid = trial_id(storage, study, trial.number)
        if lease_age is not None:
            storage.set_trial_system_attr(tid, LEASE, time.time() - lease_age)
        return trial.number, tid

    dead, _ = running(lease_age=100)
    alive, alive_id = running(lease_age=None)
    lease = Lease(storage, alive_id, interval=0.5).start()
    never, _ = running(lease_age=None)  # died before its first lease
    sweeper = Sweeper(study, storage, grace_period=2, max_retry=3)
    try:
        sweeper.sweep()
        states = {t.number: t.state for t in study.get_trials(deepcopy=False)}
        assert states[dead] == TrialState.FAIL and states[alive] == states[never] == TrialState.RUNNING
        time.sleep(2.5)  # past the grace period for the trial that never had a lease
        sweeper.sweep()
    finally:
        lease.stop()
    ts = study.get_trials(deepcopy=False)
    states = {t.number: t.state for t in ts}
    assert states[alive] == TrialState.RUNNING and states[never] == TrialState.FAIL
    copies = {t.system_attrs["retry_history"][-1]: t for t in ts if "retry_history" in t.system_attrs}
    assert set(copies) == {dead, never}
    assert all(t.state == TrialState.WAITING and LEASE not in t.system_attrs for t in copies.values())
    storage.close()


class TrivialObjective:
    """A trial's storage traffic without training: suggestions, attributes, reports."""

    taken_over = None
    interrupted = None

    def __init__(self, cfg, ahead: bool = False) -> None:
        self.cfg = cfg
        self.ahead = ahead  # work ahead as each epoch starts, as hpsearch's objective does

    def __call__(self, trial: optuna.Trial) -> float:
        hp = suggest_hparams(trial, self.cfg.search)
        trial.set_user_attr("hparams", hp.to_dict())
        for epoch in (1, 2):
            if self.ahead:
                work_ahead(trial, epoch)
                time.sleep(0.05)  # the epoch's training, during which the next trial is sampled
            trial.report(hp.lr * epoch, epoch)
        return hp.lr


def run_workers(url: str | list[str], cfg, n: int, storages: int = 1, ahead: bool = False) -> list:
    """`n` workers, each the real `trial_loop` in a thread, sharing `storages` storage objects
    (with several URLs: one storage object for each, the workers dealt out in turn)."""
    urls = [url] * storages if isinstance(url, str) else url
    storages = len(urls)
    opened = [open_worker_storage(u, cfg, pool_size=4, max_overflow=4) for u in urls]  # as `hpsearch worker`
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            storage = opened[i % storages]
            study = open_study(cfg, storage, worker_index=i)
            trial_loop(study, storage, cfg, TrivialObjective(cfg, ahead),
                       Display(Console(file=io.StringIO()), live=False), StopRequest())
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not errors, errors
    trials = optuna.load_study(study_name=cfg.study.name, storage=opened[0]).get_trials(deepcopy=False)
    for s in opened:
        s.close()
    return trials


def counted(trials) -> list:
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    return [t for t in trials if t.state.is_finished() and OVER_BUDGET not in t.system_attrs
            and t.number not in retried]


def test_eight_workers_end_with_exactly_the_budget(storage_url):
    cfg = config(n_trials=12)
    trials = run_workers(storage_url, cfg, 8)
    assert len(counted(trials)) == 12
    assert all(t.state.is_finished() for t in trials)
    over = [t for t in trials if OVER_BUDGET in t.system_attrs]
    assert all(t.state == TrialState.FAIL and not t.params for t in over)


def test_workers_sample_ahead_on_every_storage(storage_url, caplog):
    """Four workers of one storage, each sampling its next trial while the current one trains
    (window.py) from 10 finished trials on: the samples are taken, with TPE's note of them."""
    cfg = config(n_trials=40)
    cfg = cfg.model_copy(update={"sampler": cfg.sampler.model_copy(update={"sample_ahead_from": 10})})
    with caplog.at_level(logging.DEBUG, logger="hpsearch.window"):
        trials = run_workers(storage_url, cfg, 4, ahead=True)
    messages = [r.getMessage() for r in caplog.records]
    assert len(counted(trials)) == len([t for t in trials if t.state == TrialState.COMPLETE]) == 40
    assert not [m for m in messages if "sampling ahead failed" in m]
    took = [int(m.split()[1]) for m in messages if m.endswith("takes the sample made ahead")]
    # from trial ~12 on (10 finished, and each worker's next trial), nearly every trial takes one
    assert len(took) >= 20, messages
    assert all("tpe:relative_params:0" in trials[n].system_attrs for n in took)


@pytest.mark.postgres
@pytest.mark.parametrize("via", ["postgresql", "grpc"])
def test_64_workers_end_with_exactly_the_budget(via, pg, request):
    url = pg if via == "postgresql" else request.getfixturevalue("proxy").url
    cfg = config(n_trials=100, heartbeat=2, grace=20)  # 64 threads on 2 cores: beats come late
    trials = run_workers(url, cfg, 64, storages=4)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(counted(trials)) == len(complete) == 100, [(t.number, t.state) for t in trials]
    over = [t for t in trials if OVER_BUDGET in t.system_attrs]
    print(f"\n64 workers via {via}: {len(complete)} complete, {len(over)} over-budget claims refused")
    study = optuna.load_study(study_name=cfg.study.name, storage=open_storage(url))
    b = budget_state(study, 100)
    assert b.finished == 100 and b.running == b.waiting == 0


@pytest.mark.postgres
def test_workers_on_two_proxies_and_on_the_database_end_with_exactly_the_budget(pg, proxy, tmp_path):
    """A proxy answers reads from memory (proxycache.py); the trials made through the other proxy
    or on the database directly are found at its every read, so each slot claim still counts
    every trial made before its own."""
    second = Proxy(pg, tmp_path / "second.log").start()
    try:
        cfg = config(n_trials=40, heartbeat=2, grace=20)
        trials = run_workers([proxy.url, second.url, pg], cfg, 24)
    finally:
        second.stop()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(counted(trials)) == len(complete) == 40, [(t.number, t.state) for t in trials]
    assert all(t.state.is_finished() for t in trials)
    # A trial is refused only when the budget is truly taken: each worker at most once at the end.
    # (A proxy that did not know the trials made before its own would refuse it, and again.)
    assert len([t for t in trials if OVER_BUDGET in t.system_attrs]) < 24


def test_a_proxy_that_is_not_there_is_one_line(monkeypatch):
    from storages import free_port

    monkeypatch.setattr(storage_mod, "PROXY_READY_S", 1.0)

    with pytest.raises(StorageError, match="no hpsearch proxy answers at grpc://127.0.0.1"):
        open_storage(f"grpc://127.0.0.1:{free_port()}")
    with pytest.raises(StorageError, match="a proxy is grpc://host:port"):
        open_storage("grpc://127.0.0.1:13000/db")


def test_proxy_restart_is_waited_out(pg, tmp_path: Path):
    proxy = Proxy(pg, tmp_path / "proxy.log").start()
    try:
        cfg = config()
        storage = open_storage(proxy.url, cfg.storage)
        study = open_study(cfg, storage)
        trial = study.ask()
        proxy.stop()
        threading.Timer(1.0, proxy.start).start()
        trial.report(1.0, 1)  # waits for the new proxy
        study.tell(trial, 1.0)
        assert study.get_trials()[0].state == TrialState.COMPLETE
        storage.close()
    finally:
        time.sleep(0.1)
        proxy.stop()


test_proxy_restart_is_waited_out = pytest.mark.postgres(test_proxy_restart_is_waited_out)


def test_proxy_command_errors_are_one_line(tmp_path):
    from conftest import run_cli

    r = run_cli("proxy", "--storage", "grpc://127.0.0.1:13000", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "not another proxy" in r.stderr, r.stderr
    r = run_cli("proxy", "--storage", "postgresql+psycopg2://u:s3cret-pw@127.0.0.1:1/x", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "cannot open storage" in r.stderr, r.stderr
    assert "s3cret-pw" not in r.stderr + r.stdout



def test_tpe_on_a_history_window_through_every_storage(storage_url):
    """Beyond `[sampler] history` finished trials, TPE is asked on the window (window.py) through
    SQLite, PostgreSQL and the proxy alike, and what TPE writes through the window (the constant
    liar's note of its proposal on the running trial) lands in the real storage."""
    from hpsearch.config import MIN_HISTORY
    from hpsearch.window import HistoryWindowSampler

    from test_window import Seen

    cfg = config(n_trials=1000)
    storage = open_storage(storage_url, cfg.storage)
    study = open_study(cfg, storage)
    scratch = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for i in range(MIN_HISTORY + 10):
        t = scratch.ask()
        suggest_hparams(t, cfg.search)
        scratch.tell(t, float(i % 17))
    study.add_trials(scratch.trials)
    inner = Seen(seed=0, n_startup_trials=8, multivariate=True, group=True, constant_liar=True)
    study.sampler = HistoryWindowSampler(inner, MIN_HISTORY, storage)

    trial = study.ask()
    suggest_hparams(trial, cfg.search)
    assert inner.finished_seen and max(inner.finished_seen) == MIN_HISTORY
    fresh = open_storage(storage_url)
    running = fresh.get_all_trials(fresh.get_study_id_from_name(study.study_name), states=(TrialState.RUNNING,))
    assert [t.number for t in running] == [trial.number]
    assert any("relative_params" in key for key in running[0].system_attrs)
    study.tell(trial, 0.5)

"""Many workers on one PostgreSQL study: the real server on 127.0.0.1:5432, real worker processes,
real MNIST. Each test module run gets a fresh database (`hpsearch_test_<random>`), dropped after.

What is checked: workers started at once share one study and honour its budget; a worker killed
with -9 loses nothing (its trial is re-queued and resumes from its epoch checkpoint); a PostgreSQL
restart mid-search is waited out; SIGTERM stops a worker in seconds and re-queues its trial; a
wrong URL is one line with the password hidden; the compose file names its services and settings.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from conftest import REPO, hpsearch_cmd, run_cli
from hpsearch.recovery import OVER_BUDGET, requeue
from storages import HOST, PORT, admin_connection
from storages import Proxy

pytestmark = pytest.mark.postgres


# Tiny CNNs and no pruner: every trial runs max_epochs, so "epochs trained" is exact.
STUDY = """\
[study]
name = "{name}"

[data]
dataset = "idx"

[search]
lr = {{ low = 2e-3, high = 1e-2, log = true }}
weight_decay = {{ low = 1e-6, high = 1e-4, log = true }}
optimizer = {{ choices = ["adam", "adamw"] }}
conv1_channels = {{ low = 4, high = 8 }}
conv2_channels = {{ low = 8, high = 16 }}
dropout = {{ low = 0.0, high = 0.3 }}
batch_size = 256

[training]
max_epochs = {max_epochs}
patience = 5

[sampler]
n_startup_trials = 3
seed = 7

[pruner]
type = "none"

[budget]
n_trials = {n_trials}

[storage]
heartbeat_interval = {heartbeat_interval}
grace_period = {grace_period}
reconnect_timeout = 120
"""


@pytest.fixture(scope="module")
def pg_url():
    con, user = admin_connection()
    name = f"hpsearch_test_{secrets.token_hex(4)}"
    with con.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    con.close()
    yield f"postgresql+psycopg2://{user}@{HOST}:{PORT}/{name}"
    con, _ = admin_connection()  # a new connection: the restart test killed the old ones
    with con.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    con.close()


def write_study(path: Path, name: str, n_trials: int, max_epochs: int,
                heartbeat_interval: int = 1, grace_period: int = 4) -> Path:
    path.write_text(STUDY.format(name=name, n_trials=n_trials, max_epochs=max_epochs,
                                 heartbeat_interval=heartbeat_interval, grace_period=grace_period))
    return path


class Workers:
    """`hpsearch worker` processes with their output in files (no pipe to fill up and block)."""

    def __init__(self, tmp: Path, study: Path, url: str, mnist: Path) -> None:
        self.tmp, self.study, self.url, self.mnist = tmp, study, url, mnist
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []

    def start(self, *extra: str, threads: str | None = "1") -> subprocess.Popen:
        i = len(self.procs)
        log = self.tmp / f"worker{i}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("HPSEARCH_")}
        env.update(PYTHONUNBUFFERED="1", HPSEARCH_STORAGE=self.url)
        cmd = hpsearch_cmd("worker", "--study", str(self.study), "--data-dir", str(self.mnist),
                           "--artifacts", str(self.tmp / "artifacts"), *extra)
        if threads is not None:
            cmd += ["--threads", threads]
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, cwd=self.tmp, env=env, stdout=out, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        self.logs.append(log)
        return proc

    def wait(self, timeout: float = 240) -> list[int]:
        deadline = time.monotonic() + timeout
        codes = []
        for p in self.procs:
            try:
                codes.append(p.wait(max(1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                self.kill()
                pytest.fail(f"workers still running after {timeout} s:\n{self.output()}")
        return codes

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    def output(self) -> str:
        return "\n".join(f"--- {log.name}\n{log.read_text()}" for log in self.logs)


@pytest.fixture(scope="module")
def proxy(pg_url, tmp_path_factory):
    """`hpsearch proxy` in front of the test database, for the tests that go through it."""
    p = Proxy(pg_url, tmp_path_factory.mktemp("proxy") / "proxy.log").start()
    yield p
    p.stop()


@pytest.fixture
def workers(request, tmp_path, pg_url, mnist_dir):
    """Worker processes on the database directly, or (parametrised "proxy") through the proxy."""
    url = request.getfixturevalue("proxy").url if getattr(request, "param", "direct") == "proxy" else pg_url
    made: list[Workers] = []

    def make(study: Path) -> Workers:
        w = Workers(tmp_path, study, url, mnist_dir)
        made.append(w)
        return w

    yield make
    for w in made:
        w.kill()


BOTH = pytest.mark.parametrize("workers", ["direct", "proxy"], indirect=True)


def via(request) -> str:
    """A suffix that keeps the study names of the two variants of a test apart."""
    return "-proxy" if request.node.callspec.params.get("workers") == "proxy" else ""


def trials(url: str, name: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)


def wait_for(predicate, what: str, timeout: float, w: Workers, poll: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if all(p.poll() is not None for p in w.procs):
            break
        time.sleep(poll)
    pytest.fail(f"timed out waiting for {what}:\n{w.output()}")


def running_with_checkpoint(url: str, name: str):
    try:
        ts = trials(url, name)
    except KeyError:  # the workers have not created the study yet
        return None
    for t in ts:
        if t.state == TrialState.RUNNING and t.user_attrs.get("epoch_checkpoint"):
            return t
    return None


def describe(ts) -> str:
    """One line per trial, for a failing assertion's message (pytest cuts FrozenTrial's repr)."""
    return "\n".join(
        f"#{t.number} {t.state.name} user={t.user_attrs} system={t.system_attrs}" for t in ts
    )


def budget_counted(ts) -> list[optuna.trial.FrozenTrial]:
    """Trials that count toward the budget, as the workers count them (`BudgetTally`): finished,
    not the failed ones a re-queued copy replaced, and not one refused past the budget (a worker
    whose view of the study was missing a trial made elsewhere, say one made on the database
    while the proxy had not read it yet, may create a trial and then find it over the budget)."""
    retried = {n for t in ts for n in t.system_attrs.get("retry_history", [])}
    return [t for t in ts if t.state.is_finished() and t.number not in retried and OVER_BUDGET not in t.system_attrs]


# --- the tests ----------------------------------------------------------------------------------


def test_three_workers_started_at_once_share_one_study(tmp_path, pg_url, workers):
    name, budget = "at-once", 6
    study = write_study(tmp_path / "s.toml", name, n_trials=budget, max_epochs=2)
    w = workers(study)
    for i in range(3):  # at the same moment, on a study that does not exist yet
        w.start("--worker-index", str(i))
    assert w.wait() == [0, 0, 0], w.output()

    names = [s.study_name for s in optuna.get_all_study_summaries(pg_url, include_best_trial=False)]
    assert names.count(name) == 1
    ts = trials(pg_url, name)
    numbers = [t.number for t in ts]
    assert len(numbers) == len(set(numbers))
    assert not [t for t in ts if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    complete = [t for t in ts if t.state == TrialState.COMPLETE]
    # Exactly the budget: a trial created past it is refused before it trains (README: "Budget").
    assert len(complete) == budget, [(t.number, t.state) for t in ts]
    over = [t for t in ts if OVER_BUDGET in t.system_attrs]
    assert all(t.state == TrialState.FAIL and not t.params for t in over)
    ts = [t for t in ts if t not in over]
    assert len(ts) == len(complete)
    # The work was shared (a worker that started late may find it all taken), and no worker
    # repeated another's parameters: same sampler seed in the file, different worker indexes.
    assert len({t.user_attrs["worker"] for t in ts}) >= 2
    assert len({t.params["lr"] for t in ts}) == len(ts)
    for t in ts:
        a = t.user_attrs
        assert a["seed"] >= 0 and a["host"] and a["device"] == "cpu" and a["threads"] == 1
        assert a["code_version"].startswith("0.1.0")
        assert set(a["versions"]) >= {"torch", "optuna", "python"}
        assert a["epochs"] == a["epochs_trained"] == 2
        assert a["epoch_checkpoint"] is None  # removed once the trial ended
    # Only the best weights stay in the store: one file per complete trial.
    assert len(list((tmp_path / "artifacts").iterdir())) == len(complete)


@BOTH
def test_kill_9_mid_trial_loses_nothing(tmp_path, pg_url, workers, request):
    # Five epochs: a trial seen past its first epoch is still training when the kill lands.
    name, budget, epochs = "kill-9" + via(request), 4, 5
    study = write_study(tmp_path / "s.toml", name, n_trials=budget, max_epochs=epochs)
    w = workers(study)
    for i in range(3):
        w.start("--worker-index", str(i))

    victim = wait_for(lambda: running_with_checkpoint(pg_url, name), "a trial past its first epoch", 120, w)
    pid = int(victim.user_attrs["worker"].rsplit(":", 1)[1])
    os.kill(pid, signal.SIGKILL)
    killed_at = time.time()
    codes = w.wait()  # the survivors finish the search, the re-queued trial included
    assert sorted(codes) == [-signal.SIGKILL, 0, 0], w.output()

    ts = {t.number: t for t in trials(pg_url, name)}
    dead = ts[victim.number]
    assert dead.state == TrialState.FAIL
    saved_epoch = dead.user_attrs["epoch_checkpoint"]["epoch"]  # its last checkpoint, at death
    assert 1 <= saved_epoch < epochs
    copies = [t for t in ts.values() if victim.number in t.system_attrs.get("retry_history", [])]
    assert len(copies) == 1, w.output()
    copy = copies[0]
    assert copy.state == TrialState.COMPLETE
    assert copy.params == dead.params
    assert copy.user_attrs["resumed_from_trial"] == victim.number
    assert copy.user_attrs["resumed_from_epoch"] == saved_epoch
    assert copy.user_attrs["epochs_trained"] == epochs - saved_epoch  # not from scratch
    assert copy.user_attrs["epochs"] == epochs
    assert copy.user_attrs["seed"] == dead.user_attrs["seed"]
    assert sorted(copy.intermediate_values) == list(range(1, epochs + 1))
    # Nothing else lost: every other trial finished, and the budget is met.
    assert [t.number for t in ts.values() if not t.state.is_finished()] == []
    assert [t.number for t in ts.values() if t.state == TrialState.FAIL and OVER_BUDGET not in t.system_attrs] == [
        victim.number]  # (a trial refused past the budget is failed too, and never ran)
    assert len(budget_counted(ts.values())) >= budget
    requeued_after = dead.datetime_complete.timestamp() - killed_at
    print(f"\nkill -9 -> trial {victim.number} failed and re-queued after {requeued_after:.1f} s "
          f"(heartbeat 1 s, grace period 4 s)")
    # The dead trial's checkpoint was replaced by the copy's and removed with it.
    assert len(list((tmp_path / "artifacts").iterdir())) == len(
        [t for t in ts.values() if t.state == TrialState.COMPLETE])


def test_postgres_restart_mid_search_is_waited_out(tmp_path, pg_url, workers):
    pg_version = sorted(os.listdir("/etc/postgresql"))[-1] if os.path.isdir("/etc/postgresql") else None
    if pg_version is None or os.geteuid() != 0:
        pytest.fail("restarting PostgreSQL needs root and pg_ctlcluster (Debian's postgresql-common)")
    name, budget = "restart", 6
    # A grace period longer than the restart: trials keep their owner through the outage.
    study = write_study(tmp_path / "s.toml", name, n_trials=budget, max_epochs=3,
                        heartbeat_interval=1, grace_period=20)
    w = workers(study)
    w.start("--processes", "2", threads=None)  # two workers on this node, one command
    wait_for(lambda: running_with_checkpoint(pg_url, name), "a trial past its first epoch", 120, w)
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", pg_version, "main", "restart"],
                   check=True, capture_output=True, timeout=60)
    assert w.wait() == [0], w.output()

    out = w.output()
    assert "unreachable" in out and "is back after" in out, out  # the wait was logged
    ts = trials(pg_url, name)
    assert [t.state for t in ts].count(TrialState.COMPLETE) >= budget
    assert [t.number for t in ts if not t.state.is_finished()] == []
    assert {t.user_attrs["worker_index"] for t in ts} == {0, 1}  # both processes worked
    assert {t.user_attrs["threads"] for t in ts} == {1}  # the node's 2 cores, shared by 2


def test_proxy_going_away_mid_search_is_waited_out(tmp_path, pg_url, mnist_dir):
    """The proxy stopped (SIGTERM) and started again on its port while workers train through it:
    they wait, then carry on; nothing is lost and the budget is exact."""
    proxy = Proxy(pg_url, tmp_path / "proxy.log").start()
    name, budget = "proxy-away", 4
    # A grace period longer than the outage: trials keep their owner through it.
    study = write_study(tmp_path / "s.toml", name, n_trials=budget, max_epochs=3,
                        heartbeat_interval=1, grace_period=30)
    w = Workers(tmp_path, study, proxy.url, mnist_dir)
    try:
        for i in range(2):
            w.start("--worker-index", str(i))
        wait_for(lambda: running_with_checkpoint(pg_url, name), "a trial past its first epoch", 120, w)
        proxy.stop()
        time.sleep(3)  # workers' calls fail meanwhile and are retried
        proxy.start()
        assert w.wait() == [0, 0], w.output()
    finally:
        w.kill()
        proxy.stop()
    out = w.output()
    assert "unreachable" in out and "is back after" in out, out
    ts = trials(pg_url, name)
    assert [t.number for t in ts if not t.state.is_finished()] == []
    assert len(budget_counted(ts)) == budget
    assert [t.state for t in ts].count(TrialState.COMPLETE) == budget


def test_sigterm_while_the_proxy_is_away_exits_at_once(tmp_path, pg_url, mnist_dir):
    """A stop request ends the wait for an unreachable storage (not after reconnect_timeout)."""
    proxy = Proxy(pg_url, tmp_path / "proxy.log").start()
    study = write_study(tmp_path / "s.toml", "away-sigterm", n_trials=2, max_epochs=6, grace_period=30)
    w = Workers(tmp_path, study, proxy.url, mnist_dir)
    try:
        proc = w.start()
        wait_for(lambda: running_with_checkpoint(pg_url, "away-sigterm"), "a trial past its first epoch", 120, w)
        proxy.stop()
        time.sleep(2)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)  # reconnect_timeout is 120 s
        except subprocess.TimeoutExpired:
            pytest.fail(f"worker still waiting for the proxy 30 s after SIGTERM:\n{w.output()}")
    finally:
        w.kill()
        proxy.stop()
    assert proc.returncode == 0, w.output()
    assert "while waiting for the storage" in w.output() and "Traceback" not in w.output()


@BOTH
def test_sigterm_stops_within_30_s_and_requeues(tmp_path, pg_url, workers, request):
    name = "sigterm" + via(request)
    study = write_study(tmp_path / "s.toml", name, n_trials=3, max_epochs=6)
    w = workers(study)
    proc = w.start()
    victim = wait_for(lambda: running_with_checkpoint(pg_url, name), "a trial past its first epoch", 120, w)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"worker still running 30 s after SIGTERM:\n{w.output()}")
    took = time.monotonic() - sent
    assert proc.returncode == 0, w.output()
    print(f"\nSIGTERM -> worker exited after {took:.1f} s")

    ts = {t.number: t for t in trials(pg_url, name)}
    stopped = ts[victim.number]
    assert stopped.state == TrialState.FAIL
    assert "stopped by a signal" in stopped.user_attrs["stop_reason"]
    waiting = [t for t in ts.values() if t.state == TrialState.WAITING]
    assert len(waiting) == 1 and waiting[0].system_attrs["retry_history"] == [victim.number]
    pointer = waiting[0].user_attrs["epoch_checkpoint"]  # where the copy will resume
    assert pointer["trial"] == victim.number and pointer["epoch"] >= 1
    assert (tmp_path / "artifacts" / pointer["artifact_id"]).is_file()
    assert "re-queued" in w.output()


@BOTH
def test_second_signal_exits_at_once_and_the_next_worker_recovers(tmp_path, pg_url, workers, request):
    name = "finish" + via(request)
    study = write_study(tmp_path / "s.toml", name, n_trials=2, max_epochs=8)
    w = workers(study)
    proc = w.start("--finish-trial-on-signal")
    victim = wait_for(lambda: running_with_checkpoint(pg_url, name), "a trial past its first epoch", 120, w)
    seen = len(victim.intermediate_values)
    proc.send_signal(signal.SIGINT)

    def trained_on():
        t = next(t for t in trials(pg_url, name) if t.number == victim.number)
        return t.state == TrialState.RUNNING and len(t.intermediate_values) > seen + 1

    wait_for(trained_on, "the trial to keep training after the first Ctrl-C", 60, w, poll=0.05)
    assert proc.poll() is None, w.output()
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pytest.fail(f"a second Ctrl-C did not exit at once:\n{w.output()}")
    assert proc.returncode == 130
    assert "second SIGINT: exiting now" in w.output()
    # Left RUNNING, without its worker: the next worker's sweep fails and re-queues it.
    left = next(t for t in trials(pg_url, name) if t.number == victim.number)
    assert left.state == TrialState.RUNNING
    # And a trial whose worker died before its first heartbeat (Optuna never calls that stale).
    orphan = optuna.load_study(study_name=name, storage=pg_url).ask()

    assert w.start().wait(120) == 0, w.output()
    ts = {t.number: t for t in trials(pg_url, name)}
    assert ts[victim.number].state == ts[orphan.number].state == TrialState.FAIL
    copies = {t.system_attrs["retry_history"][-1]: t for t in ts.values() if "retry_history" in t.system_attrs}
    assert set(copies) == {victim.number, orphan.number}
    assert all(t.state == TrialState.COMPLETE for t in copies.values())
    assert copies[victim.number].user_attrs["resumed_from_trial"] == victim.number
    assert "resumed_from_trial" not in copies[orphan.number].user_attrs
    assert len(budget_counted(ts.values())) == 2, describe(ts.values()) + "\n" + w.output()
    assert not [t for t in ts.values() if not t.state.is_finished()], describe(ts.values())


def test_trial_failed_by_another_worker_is_dropped_and_resumed(tmp_path, pg_url, workers):
    """What a worker sees when others thought it dead (a database outage longer than the grace
    period): its trial was failed and re-queued behind its back. It must drop that trial, not
    crash, and the copy must resume from the checkpoint."""
    name = "taken-over"
    study = write_study(tmp_path / "s.toml", name, n_trials=1, max_epochs=6, grace_period=30)
    w = workers(study)
    proc = w.start()
    victim = wait_for(lambda: running_with_checkpoint(pg_url, name), "a trial past its first epoch", 120, w)
    # Do exactly what another worker's sweep does to a stale trial.
    storage = optuna.storages.RDBStorage(pg_url)
    other = optuna.load_study(study_name=name, storage=storage)
    storage.set_trial_state_values(victim._trial_id, TrialState.FAIL)
    requeue(other, storage.get_trial(victim._trial_id))
    assert proc.wait(120) == 0, w.output()

    assert "was failed by another worker while it ran here" in w.output()
    ts = trials(pg_url, name)
    copy = next(t for t in ts if t.system_attrs.get("retry_history") == [victim.number])
    assert copy.state == TrialState.COMPLETE, w.output()
    assert copy.user_attrs["resumed_from_trial"] == victim.number
    assert [t.number for t in ts if t.state == TrialState.FAIL and OVER_BUDGET not in t.system_attrs] == [victim.number]


def test_wrong_url_is_one_line_without_the_password(tmp_path, mnist_dir):
    study = write_study(tmp_path / "s.toml", "wrong-url", n_trials=1, max_epochs=1)
    r = run_cli("worker", "--study", str(study), "--data-dir", str(mnist_dir), cwd=tmp_path,
                env={"HPSEARCH_STORAGE": f"postgresql+psycopg2://someone:s3cret-pw@{HOST}:1/nodb"})
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hpsearch: error: cannot open storage"), r.stderr
    assert "***" in err[0] and "s3cret-pw" not in r.stderr + r.stdout


# --- the compose files, parsed (tests/test_compose.py runs the stack) ------------------------------


def test_compose_file_names_four_services_with_their_settings():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"db", "proxy", "worker", "dashboard"}

    db = services["db"]
    assert db["image"] == "${POSTGRES_IMAGE:-postgres:16-bookworm}"  # the registry's by default
    assert "ports" not in db  # not published to the host by default
    assert "pg_isready" in " ".join(db["healthcheck"]["test"])
    volume = db["volumes"][0].split(":")[0]
    assert volume in compose["volumes"]  # a named volume, not a host folder
    assert db["environment"]["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD:?")  # no default

    proxy = services["proxy"]  # between the database and the workers
    assert proxy["command"][:1] == ["proxy"] and proxy["depends_on"]["db"]["condition"] == "service_healthy"
    assert "postgresql" in proxy["environment"]["HPSEARCH_STORAGE"] and "ports" not in proxy
    assert "13000" in " ".join(proxy["healthcheck"]["test"])

    worker = services["worker"]
    assert worker["build"] and worker["depends_on"]["proxy"]["condition"] == "service_healthy"
    assert worker["environment"]["HPSEARCH_STORAGE"] == "grpc://proxy:13000"
    assert "container_name" not in worker and "ports" not in worker  # scalable
    assert "deploy" not in worker  # CPU workers; the GPUs come with docker-compose.gpu.yml
    gpu = yaml.safe_load((REPO / "docker-compose.gpu.yml").read_text())["services"]["worker"]
    gpus = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert gpus[0]["driver"] == "nvidia" and "gpu" in gpus[0]["capabilities"]
    # The build's base images default to the Dockerfile's own defaults, the registry images.
    dockerfile = (REPO / "Dockerfile").read_text()
    for arg, value in worker["build"]["args"].items():
        if arg != "GIT_COMMIT":
            default = value.removeprefix(f"${{{arg}:-").removesuffix("}")
            assert f"ARG {arg}={default}\n" in dockerfile, arg
    command = " ".join(worker["command"])
    assert command.startswith("worker --study")

    dash = services["dashboard"]
    assert dash["ports"] == ["127.0.0.1:8080:8080"]  # the host's loopback only
    assert dash["command"] == ["dashboard", "--host", "0.0.0.0", "--port", "8080"]
    assert dash["depends_on"]["proxy"]["condition"] == "service_healthy"

    # Credentials only from .env: the URL is built in the environment from ${POSTGRES_PASSWORD},
    # and no command line carries it.
    for service in services.values():
        assert "postgresql" not in " ".join(service.get("command", []))
        for key, value in (service.get("environment") or {}).items():
            if "postgresql" in str(value):
                assert ":${POSTGRES_PASSWORD" in value and "@db:5432/" in value, (key, value)
    assert services["worker"]["environment"]["HPSEARCH_STORAGE"]
    example = (REPO / ".env.example").read_text()
    assert "POSTGRES_PASSWORD=\n" in example  # empty: compose refuses to start until it is set
    tracked = subprocess.run(["git", "ls-files", ".env", ".env.example"], cwd=REPO, capture_output=True,
                             text=True).stdout.split()
    assert tracked == [".env.example"]
    assert "USER hpsearch" in (REPO / "Dockerfile").read_text()  # not root in the image

"""The Slurm launcher, run for real: a one-node Slurm cluster on this machine
(deploy/slurm/local-cluster.sh, started here if it is not up; needs root), the job-array script
deploy/slurm/hpsearch-worker.sbatch, the PostgreSQL server on 127.0.0.1:5432 (a fresh database)
and the real MNIST test set.

What is checked: a 2-task array runs a study to its budget with both tasks taking trials, the
storage URL's password on no command line and in no log; `scancel` of one task mid-trial fails and
re-queues its trial at once and the other task resumes it from the epoch checkpoint; so does
preemption by a job of a higher partition; the time limit's early SIGTERM (--signal) stops a
worker cleanly before the limit; the scripts refuse a storage file others can read, with one line
and exit code 2. Every job submitted is cancelled at the end, also when a test fails.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from optuna.trial import TrialState

from conftest import REPO
from hpsearch.recovery import OVER_BUDGET
from test_postgres import budget_counted, pg_url, trials, write_study  # noqa: F401 (pg_url: fixture)

pytestmark = pytest.mark.slurm

SCRIPT = REPO / "deploy" / "slurm" / "hpsearch-worker.sbatch"
PROXY = REPO / "deploy" / "slurm" / "hpsearch-proxy.sbatch"
CLUSTER = REPO / "deploy" / "slurm" / "local-cluster.sh"
HPSEARCH = Path(sys.executable).parent / "hpsearch"  # the venv's entry point, as a user would set it
PASSWORD = "not-a-real-password-7f3a"  # trust auth ignores it; it must show up nowhere


@pytest.fixture(scope="module")
def cluster() -> None:
    r = subprocess.run(["bash", str(CLUSTER)], capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        pytest.fail(f"the local Slurm cluster did not come up (root needed):\n{r.stdout}{r.stderr}")


class Jobs:
    """Jobs this test submitted through the batch script; all are cancelled at teardown."""

    def __init__(self, tmp: Path, url: str, mnist: Path) -> None:
        self.tmp, self.url = tmp, url
        self.ids: list[str] = []
        storage = tmp / "storage"
        storage.write_text(url + "\n")
        storage.chmod(0o600)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("HPSEARCH_")}
        self.env.update(HPSEARCH_STORAGE_FILE=str(storage), HPSEARCH_CMD=str(HPSEARCH),
                        HPSEARCH_DATA_DIR=str(mnist), HPSEARCH_ARTIFACTS=str(tmp / "artifacts"),
                        PYTHONUNBUFFERED="1")

    def submit(self, study: Path, tasks: int, *options: str) -> str:
        self.env["HPSEARCH_STUDY"] = str(study)
        r = subprocess.run(
            ["sbatch", "--parsable", f"--array=0-{tasks - 1}", "--cpus-per-task=1", "--time=10", *options,
             f"--chdir={self.tmp}", f"--output={self.tmp}/slurm-%A_%a.out",
             str(SCRIPT), "--threads", "1"],
            env=self.env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        job = r.stdout.strip().split(";")[0]
        self.ids.append(job)
        return job

    def states(self, job: str) -> dict[str, str]:
        """Array task -> state for the job's tasks still known to squeue."""
        r = subprocess.run(["squeue", "--noheader", "--array", "--jobs", job, "--format=%K %T"],
                           capture_output=True, text=True, timeout=30)
        return dict(line.split() for line in r.stdout.splitlines() if line.strip())

    def wait(self, job: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.states(job):
            if time.monotonic() > deadline:
                pytest.fail(f"job {job} still queued/running after {timeout} s: {self.states(job)}\n"
                            f"{self.output()}")
            time.sleep(1)

    def output(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()}" for p in sorted(self.tmp.glob("slurm-*.out")))

    def cancel_all(self) -> None:
        for job in self.ids:
            subprocess.run(["scancel", job], capture_output=True, timeout=30)
        for job in self.ids:
            deadline = time.monotonic() + 120
            while self.states(job) and time.monotonic() < deadline:
                time.sleep(1)


@pytest.fixture
def jobs(cluster, tmp_path, pg_url, mnist_dir):  # noqa: F811 (pg_url: the fixture imported above)
    user_host = pg_url.split("://", 1)[1].split("@", 1)
    url = f"postgresql+psycopg2://{user_host[0]}:{PASSWORD}@{user_host[1]}"
    j = Jobs(tmp_path, url, mnist_dir)
    yield j
    j.cancel_all()


def test_array_of_two_runs_the_study_to_its_budget(tmp_path, jobs):
    name, budget = "slurm-budget", 4
    study = write_study(tmp_path / "budget.toml", name, n_trials=budget, max_epochs=2)
    started = time.monotonic()
    job = jobs.submit(study, tasks=2)

    # While the workers run, the password is on no process's command line.
    seen_running = False
    while jobs.states(job):
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                argv = cmdline.read_bytes().split(b"\0")
            except OSError:  # the process ended
                continue
            assert not any(PASSWORD.encode() in a for a in argv), argv
            seen_running = seen_running or any(b"hpsearch" in a for a in argv) and b"worker" in argv
        if time.monotonic() - started > 300:
            pytest.fail(f"job {job} did not finish in 300 s:\n{jobs.output()}")
        time.sleep(0.5)
    elapsed = time.monotonic() - started
    assert seen_running, "no hpsearch worker process was ever seen"

    out = jobs.output()
    ts = trials(jobs.url, name)
    counted = budget_counted(ts)
    assert len(counted) == budget and all(t.state == TrialState.COMPLETE for t in counted), out
    assert {t.user_attrs["worker_index"] for t in ts} == {0, 1}, f"both array tasks take trials\n{out}"
    assert all(t.user_attrs["threads"] == 1 for t in ts)
    assert out.count("study budget reached") == 2, out
    assert PASSWORD not in out
    print(f"2-task array, {budget} trials x 2 epochs: {elapsed:.1f} s from sbatch to both tasks done")


def _running_with_checkpoint(url: str, name: str):
    try:
        ts = trials(url, name)
    except KeyError:  # no worker has created the study yet
        return None
    return next((t for t in ts if t.state == TrialState.RUNNING and t.user_attrs.get("epoch_checkpoint")),
                None)


def test_scancel_of_one_task_requeues_its_trial_and_the_other_task_resumes_it(tmp_path, jobs):
    # Enough epochs that a trial is still running well after its first checkpoint.
    name, budget = "slurm-scancel", 3
    study = write_study(tmp_path / "scancel.toml", name, n_trials=budget, max_epochs=10)
    job = jobs.submit(study, tasks=2)

    deadline = time.monotonic() + 240
    victim = None
    while victim is None:
        victim = _running_with_checkpoint(jobs.url, name)
        if victim is None and (time.monotonic() > deadline or not jobs.states(job)):
            pytest.fail(f"no trial reached its first epoch checkpoint:\n{jobs.output()}")
        time.sleep(0.1)
    task = victim.user_attrs["worker_index"]  # the array index: one worker per task
    cancelled_at = time.time()
    r = subprocess.run(["scancel", f"{job}_{task}"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    jobs.wait(job, timeout=300)

    out = jobs.output()
    ts = trials(jobs.url, name)
    failed = ts[victim.number]
    assert failed.state == TrialState.FAIL, out
    copies = [t for t in ts if t.user_attrs.get("resumed_from_trial") == victim.number]
    assert len(copies) == 1, f"the stopped trial is resumed exactly once\n{out}"
    copy = copies[0]
    assert copy.state == TrialState.COMPLETE, out
    assert copy.user_attrs["resumed_from_epoch"] >= 1
    assert copy.user_attrs["worker_index"] == 1 - task, "the other array task resumes it"
    assert copy.user_attrs["epochs_trained"] == copy.user_attrs["epochs"] - copy.user_attrs["resumed_from_epoch"]
    # SIGTERM re-queues at once: no waiting for the heartbeat to go stale.
    requeued_after = failed.datetime_complete.timestamp() - cancelled_at
    assert requeued_after < 30, f"re-queued {requeued_after:.1f} s after scancel\n{out}"
    assert "SIGTERM: stopping the running trial" in (tmp_path / f"slurm-{job}_{task}.out").read_text()
    counted = budget_counted(ts)
    assert len(counted) == budget and all(t.state == TrialState.COMPLETE for t in counted), out
    resumed_after = copy.datetime_start.timestamp() - cancelled_at
    print(f"scancel -> trial {victim.number} failed and re-queued after {requeued_after:.2f} s; copy "
          f"{copy.number} started {resumed_after:.2f} s after scancel on task {1 - task}, resumed after epoch "
          f"{copy.user_attrs['resumed_from_epoch']}")


def test_each_task_gets_its_own_worker_index_and_gpu(tmp_path, jobs):
    # What the script hands to `hpsearch worker`, recorded by a stand-in executable: the script's
    # own plumbing (indices across the array, GPUs round-robin, extra options, the URL only in
    # the environment). Slurm leaves CUDA_VISIBLE_DEVICES alone without --gres, as set here.
    fake = tmp_path / "fake-hpsearch"
    fake.write_text('#!/usr/bin/env bash\n'
                    'echo "$SLURM_ARRAY_TASK_ID $SLURM_PROCID $* | ${HPSEARCH_STORAGE%%:*}" '
                    '>"$HPSEARCH_RECORD/$SLURM_ARRAY_TASK_ID-$SLURM_PROCID"\n')
    fake.chmod(0o755)
    (tmp_path / "record").mkdir()
    jobs.env.update(HPSEARCH_CMD=str(fake), HPSEARCH_RECORD=str(tmp_path / "record"), CUDA_VISIBLE_DEVICES="4,6")
    job = jobs.submit(tmp_path / "study.toml", 2, "--ntasks=2")
    jobs.wait(job, timeout=120)
    lines = sorted(p.read_text().strip() for p in (tmp_path / "record").iterdir())
    assert lines == [
        f"{a} {t} worker --study {tmp_path}/study.toml --worker-index {2 * a + t} --device cuda:{t} "
        f"--threads 1 | postgresql+psycopg2"
        for a in (0, 1) for t in (0, 1)
    ], jobs.output()


def _poll(predicate, what: str, jobs: Jobs, timeout: float = 240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}:\n{jobs.output()}")


def test_preemption_stops_a_task_cleanly_and_the_other_resumes_its_trial(tmp_path, jobs):
    # local-cluster.sh's partition `urgent` preempts `debug` (PreemptMode=REQUEUE, GraceTime=30):
    # a job there takes the CPU of one of the two worker tasks, whose worker gets SIGTERM.
    name, budget = "slurm-preempt", 2
    study = write_study(tmp_path / "preempt.toml", name, n_trials=budget, max_epochs=16)
    job = jobs.submit(study, 2)

    def both_checkpointed():
        try:
            ts = trials(jobs.url, name)
        except KeyError:
            return None
        running = [t for t in ts if t.state == TrialState.RUNNING and t.user_attrs.get("epoch_checkpoint")]
        return running if len(running) == 2 else None

    _poll(both_checkpointed, "two running trials with epoch checkpoints", jobs)
    submitted = time.time()
    r = subprocess.run(["sbatch", "--parsable", "--partition=urgent", "--cpus-per-task=1", "--time=5",
                        f"--output={tmp_path}/urgent-%j.out", "--wrap", "sleep 5"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    jobs.ids.append(r.stdout.strip())

    def budget_met():
        counted = budget_counted(trials(jobs.url, name))
        return len(counted) >= budget and all(t.state == TrialState.COMPLETE for t in counted)

    _poll(budget_met, "the budget to be met", jobs)
    out = jobs.output()
    ts = trials(jobs.url, name)
    stopped = [t for t in ts if t.state == TrialState.FAIL and OVER_BUDGET not in t.system_attrs]
    assert len(stopped) == 1, out
    victim = stopped[0]
    copy = next(t for t in ts if t.user_attrs.get("resumed_from_trial") == victim.number)
    assert copy.state == TrialState.COMPLETE and copy.user_attrs["resumed_from_epoch"] >= 1, out
    assert copy.user_attrs["worker_index"] != victim.user_attrs["worker_index"], "the other task resumes it"
    preempted = (tmp_path / f"slurm-{job}_{victim.user_attrs['worker_index']}.out").read_text()
    assert "SIGTERM: stopping the running trial" in preempted and "second SIGTERM" not in preempted, preempted
    # The worker stopped within the GraceTime, so Slurm had nothing left to kill and requeue: the
    # task simply ended, with exit code 0.
    r = subprocess.run(["scontrol", "show", "job", f"{job}_{victim.user_attrs['worker_index']}"],
                       capture_output=True, text=True, timeout=30)
    assert "JobState=COMPLETED" in r.stdout and "ExitCode=0:0" in r.stdout, r.stdout
    print(f"preemption -> trial {victim.number} failed and re-queued "
          f"{victim.datetime_complete.timestamp() - submitted:.2f} s after the urgent job's sbatch; copy "
          f"{copy.number} resumed after epoch {copy.user_attrs['resumed_from_epoch']}")


def test_time_limit_signal_stops_the_worker_cleanly(tmp_path, jobs):
    # --signal=TERM@N (as in the script, with shorter times) reaches the worker before the time
    # limit, mid-trial: it re-queues the trial with its checkpoint and exits 0 in time. Slurm may
    # send it up to 60 s early, so the limit is cut to 1 minute only once a trial is running.
    name = "slurm-timelimit"
    study = write_study(tmp_path / "timelimit.toml", name, n_trials=2, max_epochs=200)
    # No early stopping: on a quiet machine a trial otherwise ends in seconds, before the signal.
    study.write_text(study.read_text().replace("patience = 5", "patience = 200"))
    job = jobs.submit(study, 1, "--signal=TERM@45")
    _poll(lambda: _running_with_checkpoint(jobs.url, name), "a trial's first epoch checkpoint", jobs)
    r = subprocess.run(["scontrol", "update", f"JobId={job}_0", "TimeLimit=1"], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, r.stderr
    jobs.wait(job, timeout=180)

    out = jobs.output()
    assert "SIGTERM: stopping the running trial" in out and "stopped by SIGTERM" in out, out
    r = subprocess.run(["scontrol", "show", "job", f"{job}_0"], capture_output=True, text=True, timeout=30)
    assert "JobState=COMPLETED" in r.stdout, r.stdout + out  # not TIMEOUT: it stopped before the limit
    ts = trials(jobs.url, name)
    stopped = [t for t in ts if t.state == TrialState.FAIL and OVER_BUDGET not in t.system_attrs]
    assert len(stopped) == 1, out
    copy = next(t for t in ts if t.system_attrs.get("retry_history") == [stopped[0].number])
    assert copy.state == TrialState.WAITING and copy.user_attrs["epoch_checkpoint"]["epoch"] >= 1


def _run_script(tmp_path: Path, storage: Path, script: Path = SCRIPT, **env_extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HPSEARCH_")}
    env.update(HPSEARCH_STORAGE_FILE=str(storage), HPSEARCH_STUDY="cnn", HPSEARCH_CMD=str(HPSEARCH), **env_extra)
    return subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize("script", [SCRIPT, PROXY], ids=lambda p: p.name)
@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644], ids=oct)
def test_storage_file_readable_by_others_is_refused(tmp_path, mode, script):
    storage = tmp_path / "storage"
    storage.write_text(f"postgresql+psycopg2://hpsearch:{PASSWORD}@db:5432/hpsearch\n")
    storage.chmod(mode)
    r = _run_script(tmp_path, storage, script)
    assert r.returncode == 2
    assert r.stderr.strip() == (f"{script.name}: error: {storage} is readable by others "
                                f"(mode {mode:o}); run: chmod 600 {storage}")
    assert PASSWORD not in r.stdout + r.stderr


def test_proxy_job_serves_postgresql_only(tmp_path):
    r = _run_script(tmp_path, tmp_path / "unused", PROXY, HPSEARCH_STORAGE=f"sqlite:///{tmp_path}/x.db")
    assert r.returncode == 2
    assert r.stderr.strip() == ("hpsearch-proxy.sbatch: error: the proxy serves a PostgreSQL database; "
                                "HPSEARCH_STORAGE is not a postgresql URL")


def test_missing_or_foreign_storage_file_is_refused(tmp_path):
    missing = tmp_path / "nope"
    r = _run_script(tmp_path, missing)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "no storage: set HPSEARCH_STORAGE or write the URL to" in r.stderr

    # Mode 600 but someone else's file (the tier runs as root, as the cluster needs).
    foreign = tmp_path / "foreign"
    foreign.write_text("postgresql+psycopg2://u@db/x\n")
    foreign.chmod(0o600)
    os.chown(foreign, 65534, -1)
    r = _run_script(tmp_path, foreign)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert f"{foreign} belongs to another user" in r.stderr

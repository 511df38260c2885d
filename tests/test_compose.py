"""The compose stack for real, with the README's commands: the image built from Dockerfile,
docker-compose.yml's PostgreSQL, proxy, two CPU workers and the dashboard, on the cnn-quick study
(the shipped MNIST copy in the image). One worker is stopped mid-trial and its trial must be
re-queued and resumed from its checkpoint by the other. The registry's base images cannot be
pulled here: deploy/docker/build-base-images.sh builds the stand-ins from Debian packages.

Needs a Docker engine (CI installs and starts one: .ci/run); without it the tests fail, never skip.
HPSEARCH_COMPOSE_RESULTS=<file.json> also writes the measured figures there.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import time
import urllib.request
from datetime import datetime
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROJECT = "hpsearch-ci"  # -p: apart from a stack of your own named hpsearch
STUDY = "cnn-quick"
UV_VERSION = re.search(r"^ARG UV_IMAGE=ghcr.io/astral-sh/uv:([0-9.]+)$",
                       (REPO / "Dockerfile").read_text(), re.M).group(1)
STANDINS = {
    "PYTHON_IMAGE": "hpsearch-local/python:3.11-bookworm",
    "UV_IMAGE": f"hpsearch-local/uv:{UV_VERSION}",
    "POSTGRES_IMAGE": "hpsearch-local/postgres:bookworm",
}

pytestmark = [pytest.mark.compose, pytest.mark.timeout(900)]

# The trials as Optuna's public API sees them, read in the proxy container straight from
# PostgreSQL (its HPSEARCH_STORAGE is the database URL; the database publishes no port).
TRIALS = """
import json, os, optuna
optuna.logging.set_verbosity(optuna.logging.WARNING)
try:
    study = optuna.load_study(study_name=%r, storage=os.environ["HPSEARCH_STORAGE"])
except KeyError:
    print("[]"); raise SystemExit
print(json.dumps([dict(number=t.number, state=t.state.name, user_attrs=t.user_attrs,
                       system_attrs=t.system_attrs, epochs=len(t.intermediate_values),
                       complete=t.datetime_complete and t.datetime_complete.isoformat())
                  for t in study.trials], default=str))
""" % STUDY


def run(cmd: list[str], env: dict, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def docker_env(tmp: Path) -> dict:
    """The environment for docker and compose: BuildKit on (the Dockerfile's cache mount needs it).
    Docker 23+ clients build with BuildKit only through buildx; where the `docker` on PATH has no
    buildx, Debian's docker.io client (20.10, BuildKit built in) is put first on PATH."""
    if shutil.which("docker") is None:
        pytest.fail("no docker on PATH: install docker.io and docker-compose and start dockerd (.ci/run does)")
    env = dict(os.environ, DOCKER_BUILDKIT="1", COMPOSE_DOCKER_CLI_BUILD="1")
    if subprocess.run(["docker", "buildx", "version"], capture_output=True).returncode != 0:
        debian = Path("/usr/bin/docker")
        if not debian.is_file():
            pytest.fail("the docker client has no buildx and /usr/bin/docker (Debian's docker.io) is missing")
        (tmp / "bin").mkdir(exist_ok=True)
        (tmp / "bin" / "docker").symlink_to(debian)
        env["PATH"] = f"{tmp / 'bin'}{os.pathsep}{env['PATH']}"
    if subprocess.run(["docker", "info"], env=env, capture_output=True).returncode != 0:
        pytest.fail("the Docker engine is not running: start dockerd (.ci/run does)")
    return env


def compose_cmd(env: dict) -> list[str]:
    """`docker compose` (v2) where the client has it, else Debian's docker-compose (1.29)."""
    if subprocess.run(["docker", "compose", "version"], env=env, capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose", path=env["PATH"]) is None:
        pytest.fail("neither `docker compose` nor docker-compose: install docker-compose (.ci/run does)")
    return ["docker-compose"]


def env_file(path: Path, password: str | None) -> Path:
    """.env.example with the README's edits: a password, CPU workers, the quick study, stand-ins."""
    text = (REPO / ".env.example").read_text()
    if password is not None:
        edits = {"POSTGRES_PASSWORD=\n": f"POSTGRES_PASSWORD={password}\n",
                 "COMPOSE_FILE=docker-compose.yml:docker-compose.gpu.yml\n": "COMPOSE_FILE=docker-compose.yml\n",
                 "HPSEARCH_STUDY=cnn\n": f"HPSEARCH_STUDY={STUDY}\n"}
        edits.update({f"# {name}={image}\n": f"{name}={image}\n" for name, image in STANDINS.items()})
        for old, new in edits.items():
            assert old in text, f".env.example has no line {old!r}: the README's edits no longer apply"
            text = text.replace(old, new)
    path.write_text(text)
    return path


def test_the_example_env_file_is_refused_before_anything_starts(tmp_path):
    env = docker_env(tmp_path)
    compose = compose_cmd(env) + ["--env-file", str(env_file(tmp_path / ".env", None)), "-p", PROJECT + "-refused"]
    r = run(compose + ["up", "-d"], env, check=False)
    assert r.returncode != 0
    assert "set POSTGRES_PASSWORD in .env (see .env.example)" in r.stderr
    containers = run(["docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={PROJECT}-refused"], env)
    assert containers.stdout.strip() == ""


@pytest.fixture
def stack(tmp_path):
    """The compose command for this test's project; `down -v` afterwards, pass or fail."""
    env = docker_env(tmp_path)
    env["GIT_COMMIT"] = run(["git", "rev-parse", "HEAD"], env).stdout.strip()
    compose = compose_cmd(env) + ["--env-file", str(env_file(tmp_path / ".env", secrets.token_hex(16))),
                                  "-p", PROJECT]
    yield compose, env
    logs = run(compose + ["logs", "--no-color", "--tail", "40"], env, check=False)
    print(logs.stdout[-8000:])
    run(compose + ["down", "-v", "--remove-orphans"], env, timeout=180, check=False)


def trials(compose: list[str], env: dict) -> list[dict]:
    r = run(compose + ["exec", "-T", "proxy", "python", "-c", TRIALS], env, timeout=120)
    return json.loads(r.stdout.strip().splitlines()[-1])


def wait_for(what: str, check, timeout: float, poll: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(poll)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def containers(env: dict, service: str) -> list[dict]:
    ids = run(["docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={PROJECT}",
               "--filter", f"label=com.docker.compose.service={service}"], env).stdout.split()
    return json.loads(run(["docker", "inspect", *ids], env).stdout) if ids else []


def test_compose_stack_runs_a_search_and_requeues_a_stopped_workers_trial(stack):
    compose, env = stack
    def exists(image):
        return run(["docker", "image", "inspect", image], env, check=False).returncode == 0
    figures = {"base_images_existed": all(exists(i) for i in STANDINS.values()),
               "image_existed": exists("hpsearch:latest")}
    t = time.monotonic()
    run(["bash", "deploy/docker/build-base-images.sh"], env)
    figures["base_images_s"] = round(time.monotonic() - t, 1)
    t = time.monotonic()
    run(compose + ["build"], env, timeout=900)
    figures["build_s"] = round(time.monotonic() - t, 1)
    image = json.loads(run(["docker", "image", "inspect", "hpsearch:latest"], env).stdout)[0]
    figures["image_bytes"] = image["Size"]
    assert image["Config"]["User"] == "hpsearch"  # not root

    up_at = datetime.now()  # naive local time, as Optuna's datetime_complete (both UTC here)
    run(compose + ["up", "-d", "--scale", "worker=2"], env, timeout=300)

    # A trial past its first epoch, with a checkpoint and epochs left: stop its worker now.
    def running_mid_trial():
        return next((x for x in trials(compose, env) if x["state"] == "RUNNING"
                     and x["user_attrs"].get("epoch_checkpoint") and x["epochs"] <= 2), None)  # of 4
    victim = wait_for("a trial past its first epoch", running_mid_trial, 300)
    workers = {c["Config"]["Hostname"]: c for c in containers(env, "worker")}
    assert len(workers) == 2
    stopped = workers[victim["user_attrs"]["host"]]["Name"].lstrip("/")
    other = next(c["Name"].lstrip("/") for c in workers.values() if c["Name"].lstrip("/") != stopped)
    t = time.monotonic()
    run(["docker", "stop", stopped], env, timeout=120)  # SIGTERM; SIGKILL only after stop_grace_period
    figures["stop_s"] = round(time.monotonic() - t, 1)
    assert figures["stop_s"] < 40
    state = json.loads(run(["docker", "inspect", stopped], env).stdout)[0]["State"]
    assert state["ExitCode"] == 0 and state["Status"] == "exited"

    def budget_met():
        ts = trials(compose, env)
        return ts if sum(x["state"] in ("COMPLETE", "PRUNED") for x in ts) >= 4 else None
    ts = {x["number"]: x for x in wait_for("4 finished trials", budget_met, 420, poll=3)}
    # The other worker exits 0 once the budget is met, and stays down (restart: on-failure).
    wait_for("the other worker to exit", lambda: all(c["State"]["Status"] == "exited"
                                                     for c in containers(env, "worker")), 120)
    assert all(c["State"]["ExitCode"] == 0 for c in containers(env, "worker"))

    failed = ts[victim["number"]]
    assert failed["state"] == "FAIL" and "stopped by a signal" in failed["user_attrs"]["stop_reason"]
    copy = next(x for x in ts.values() if x["system_attrs"].get("retry_history") == [victim["number"]])
    assert copy["state"] == "COMPLETE"
    assert copy["user_attrs"]["resumed_from_trial"] == victim["number"]
    assert copy["user_attrs"]["resumed_from_epoch"] >= 1
    assert workers[copy["user_attrs"]["host"]]["Name"].lstrip("/") == other  # the other worker
    assert "re-queued" in run(["docker", "logs", stopped], env).stdout
    first_done = min(datetime.fromisoformat(x["complete"]) for x in ts.values() if x["state"] == "COMPLETE")
    figures["up_to_first_finished_trial_s"] = round((first_done - up_at).total_seconds(), 1)
    figures["requeue"] = {"trial": victim["number"], "stopped_after_epochs": failed["epochs"],
                          "stopped_container": stopped, "copy": copy["number"], "copy_container": other,
                          "resumed_from_epoch": copy["user_attrs"]["resumed_from_epoch"]}

    # The dashboard on this host's loopback only; the database on no port at all.
    with urllib.request.urlopen("http://127.0.0.1:8080/api/studies", timeout=30) as r:
        assert STUDY in {s["study_name"] for s in json.load(r)["study_summaries"]}
    dashboard = containers(env, "dashboard")[0]
    assert dashboard["NetworkSettings"]["Ports"]["8080/tcp"] == [{"HostIp": "127.0.0.1", "HostPort": "8080"}]
    assert not any(containers(env, "db")[0]["NetworkSettings"]["Ports"].values())
    # The study files and the shipped data are in the image, for the user 1000.
    r = run(compose + ["exec", "-T", "dashboard", "sh", "-c",
                       "id -u; ls /app/studies/cnn.toml /data/t10k-images-idx3-ubyte.gz"], env)
    assert r.stdout.split()[0] == "1000"

    print(f"\ncompose figures: {json.dumps(figures)}")
    if out := os.environ.get("HPSEARCH_COMPOSE_RESULTS"):
        Path(out).write_text(json.dumps(figures, indent=2) + "\n")

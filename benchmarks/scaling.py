"""Many workers on PostgreSQL: throughput with 1 and 2 workers, recovery after kill -9, and what a
PostgreSQL restart costs a search. Real workers, real MNIST, the real server on 127.0.0.1:5432.

    uv run python benchmarks/scaling.py --data-dir ../shared/data/mnist-t10k
    uv run python benchmarks/scaling.py --data-dir ... --trials 12 --workers 1 2 --parts throughput

Each run gets its own database (`hpsearch_bench_<random>`, dropped afterwards). Every worker uses
one CPU thread. Trials per minute are counted from the first trial's start to the last trial's end
(the search itself), and separately including process start-up (what a user waits for).
The PostgreSQL restart needs root and Debian's pg_ctlcluster; `--parts throughput kill` skips it.
"""

from __future__ import annotations

import argparse
import getpass
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import psycopg2
from optuna.trial import TrialState

from hpsearch.config import StorageConfig
from hpsearch.storage import open_storage

HOST, PORT = "127.0.0.1", 5432

STUDY = """\
[study]
name = "{name}"
[data]
dataset = "idx"
[search]
lr = {{ low = 2e-3, high = 1e-2, log = true }}
weight_decay = {{ low = 1e-6, high = 1e-4, log = true }}
optimizer = {{ choices = ["adam", "adamw"] }}
conv1_channels = {{ low = 8, high = 16 }}
conv2_channels = {{ low = 16, high = 32 }}
dropout = {{ low = 0.0, high = 0.3 }}
batch_size = 128
[training]
max_epochs = {epochs}
patience = 10
[sampler]
n_startup_trials = 4
seed = 1
[pruner]
type = "none"
[budget]
n_trials = {trials}
[storage]
heartbeat_interval = {heartbeat}
grace_period = {grace}
"""


def admin():
    for user in dict.fromkeys([getpass.getuser(), "postgres"]):
        try:
            con = psycopg2.connect(host=HOST, port=PORT, dbname="postgres", user=user, connect_timeout=5)
            con.autocommit = True
            return con, user
        except psycopg2.OperationalError:
            continue
    sys.exit(f"cannot connect to PostgreSQL on {HOST}:{PORT} as {getpass.getuser()} or postgres")


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="hpsearch-bench-"))
        con, user = admin()
        self.db = f"hpsearch_bench_{secrets.token_hex(4)}"
        con.cursor().execute(f'CREATE DATABASE "{self.db}"')
        con.close()
        self.url = f"postgresql+psycopg2://{user}@{HOST}:{PORT}/{self.db}"
        # Read through hpsearch's own storage, which waits out a restart (ours, or anyone's).
        self.storage = open_storage(self.url, StorageConfig())

    def close(self) -> None:
        self.storage.engine.dispose()
        con, _ = admin()
        con.cursor().execute(f'DROP DATABASE IF EXISTS "{self.db}" WITH (FORCE)')
        con.close()

    def study(self, name: str, heartbeat: int = 10, grace: int = 60) -> Path:
        path = self.tmp / f"{name}.toml"
        path.write_text(STUDY.format(name=name, trials=self.args.trials, epochs=self.args.epochs,
                                     heartbeat=heartbeat, grace=grace))
        return path

    def start(self, study: Path, i: int) -> subprocess.Popen:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HPSEARCH_")}
        env.update(PYTHONUNBUFFERED="1", HPSEARCH_STORAGE=self.url)
        log = open(self.tmp / f"{study.stem}-w{i}.log", "w")
        return subprocess.Popen(
            [sys.executable, "-m", "hpsearch.cli", "worker", "--study", str(study), "--data-dir",
             self.args.data_dir, "--artifacts", str(self.tmp / "artifacts"), "--threads", "1",
             "--worker-index", str(i)],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )

    def trials(self, name: str):
        try:
            return optuna.load_study(study_name=name, storage=self.storage).get_trials(deepcopy=False)
        except KeyError:
            return []

    def logs(self, name: str) -> str:
        return "".join(p.read_text() for p in sorted(self.tmp.glob(f"{name}-w*.log")))


def search_span(ts) -> tuple[float, int]:
    done = [t for t in ts if t.state == TrialState.COMPLETE]
    first = min(t.datetime_start for t in done)
    last = max(t.datetime_complete for t in done)
    return (last - first).total_seconds(), len(done)


def throughput(b: Bench, n: int, rep: int = 0) -> dict:
    name = f"tput-{n}-{rep}"
    study = b.study(name)
    t0 = time.monotonic()
    procs = [b.start(study, i) for i in range(n)]
    codes = [p.wait() for p in procs]
    wall = time.monotonic() - t0
    if any(codes):
        sys.exit(f"workers failed ({codes}):\n{b.logs(name)}")
    span, done = search_span(b.trials(name))
    return {"workers": n, "trials": done, "search_s": span, "wall_s": wall,
            "per_min": 60 * done / span, "per_min_wall": 60 * done / wall}


def kill_recovery(b: Bench, heartbeat: int, grace: int) -> dict:
    name = f"kill-{heartbeat}-{grace}"
    study = b.study(name, heartbeat, grace)
    procs = [b.start(study, i) for i in range(2)]
    while True:
        running = [t for t in b.trials(name) if t.state == TrialState.RUNNING
                   and t.user_attrs.get("epoch_checkpoint")]
        if running:
            break
        time.sleep(0.1)
    victim = running[0]
    pid = int(victim.user_attrs["worker"].rsplit(":", 1)[1])
    os.kill(pid, signal.SIGKILL)
    killed = time.time()
    for p in procs:
        p.wait()
    ts = {t.number: t for t in b.trials(name)}
    dead = ts[victim.number]
    copy = next(t for t in ts.values() if victim.number in t.system_attrs.get("retry_history", []))
    return {
        "heartbeat": heartbeat, "grace": grace,
        "requeued_after_s": dead.datetime_complete.timestamp() - killed,
        "copy_started_after_s": copy.datetime_start.timestamp() - killed,
        "resumed_from_epoch": copy.user_attrs.get("resumed_from_epoch"),
        "epochs_trained_by_copy": copy.user_attrs.get("epochs_trained"),
        "complete": sum(t.state == TrialState.COMPLETE for t in ts.values()),
    }


def restart_cost(b: Bench, baseline: dict) -> dict:
    version = sorted(os.listdir("/etc/postgresql"))[-1]
    name = "restart-2"
    study = b.study(name)
    t0 = time.monotonic()
    procs = [b.start(study, i) for i in range(2)]
    while not any(t.state == TrialState.COMPLETE for t in b.trials(name)):
        time.sleep(0.2)
    r0 = time.monotonic()
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart"],
                   check=True, capture_output=True)
    restart_s = time.monotonic() - r0
    codes = [p.wait() for p in procs]
    wall = time.monotonic() - t0
    span, done = search_span(b.trials(name))
    backs = [float(x) for x in re.findall(r"is back after ([0-9.]+) s", b.logs(name))]
    return {"codes": codes, "restart_s": restart_s, "search_s": span, "wall_s": wall, "trials": done,
            "extra_s_vs_baseline": span - baseline["search_s"], "waits_s": backs,
            "lost_trials": sum(t.state == TrialState.FAIL for t in b.trials(name))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeat", type=int, default=1, help="throughput runs per worker count")
    p.add_argument("--parts", nargs="+", choices=["throughput", "kill", "restart"],
                   default=["throughput", "kill", "restart"],
                   help="what to measure (restart needs throughput with 2 workers as its baseline)")
    args = p.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    b = Bench(args)
    try:
        print(f"# {args.trials} trials x {args.epochs} epochs, MNIST t10k (7,000 train images), "
              f"1 thread per worker, {os.cpu_count()} cores")
        rows = []
        if "throughput" in args.parts:
            print("workers  trials  search s  trials/min  (incl. start-up: wall s, trials/min)  load before")
            # Interleaved (1, 2, 1, 2, ...) so that other load on the machine hits both alike.
            for rep in range(args.repeat):
                for n in args.workers:
                    load = os.getloadavg()[0]
                    r = throughput(b, n, rep)
                    rows.append(r)
                    print(f"{r['workers']:>7}  {r['trials']:>6}  {r['search_s']:>8.1f}  {r['per_min']:>10.1f}"
                          f"  ({r['wall_s']:.1f}, {r['per_min_wall']:.1f})  {load:.2f}", flush=True)
        for hb, grace in ((1, 4), (10, 60)) if "kill" in args.parts else ():
            k = kill_recovery(b, hb, grace)
            print(f"kill -9 (heartbeat {hb} s, grace {grace} s): failed+re-queued after "
                  f"{k['requeued_after_s']:.1f} s, copy started after {k['copy_started_after_s']:.1f} s, "
                  f"resumed after epoch {k['resumed_from_epoch']}, trained {k['epochs_trained_by_copy']} "
                  f"more epoch(s); {k['complete']} complete")
        if "restart" in args.parts:
            base = next((r for r in reversed(rows) if r["workers"] == 2), None)
            if base is None:
                sys.exit("the restart's baseline is the 2-worker throughput run: add it to --parts")
            r = restart_cost(b, base)
            print(f"PostgreSQL restart ({r['restart_s']:.1f} s for pg_ctlcluster) during a 2-worker search: "
                  f"worker exit codes {r['codes']}, {r['trials']} trials complete, {r['lost_trials']} failed; "
                  f"workers waited {', '.join(f'{w:.1f}' for w in r['waits_s'])} s; search took "
                  f"{r['search_s']:.1f} s vs {base['search_s']:.1f} s without the restart "
                  f"({r['extra_s_vs_baseline']:+.1f} s)")
    finally:
        b.close()
    print(f"logs: {b.tmp}")


if __name__ == "__main__":
    main()

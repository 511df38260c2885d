"""Many workers on PostgreSQL: throughput with 1 and 2 workers, the storage + sampler overhead per
trial with 8 workers, recovery after kill -9, and what a PostgreSQL restart costs a search. Real
workers, real MNIST, the real server on 127.0.0.1:5432.

    uv run python benchmarks/scaling.py --data-dir ../shared/data/mnist-t10k --json scaling.json
    uv run python benchmarks/scaling.py --data-dir ... --parts throughput --trials 12 --workers 1 2
    uv run python benchmarks/scaling.py --data-dir ... --quick      # CI smoke: tiny runs, no timing

Throughput: every trial has the same fixed channel counts (so each costs the same and the split of
trials between workers does not decide the ratio); lr, weight decay, optimizer and dropout are
searched. Overhead: hpsearch's own worker loop (`hpsearch.worker.trial_loop`: stale-trial sweeps,
budget checks, heartbeats, ask/tell, the display's best-value query) with the default study's
sampler and pruner, around an objective that only does a real trial's storage traffic (suggest,
~20 user attributes, a report and a pruning check per epoch). The time between one trial's end and
the next's in each worker is the per-trial overhead; the first trial (which loads the existing
trials) is reported apart.

Each run gets its own database (`hpsearch_bench_<random>`, dropped afterwards). Every worker uses
one CPU thread. Trials per minute are counted from the first trial's start to the last trial's end
(the search itself), and separately including process start-up (what a user waits for).
The PostgreSQL restart needs root and Debian's pg_ctlcluster; `--parts throughput kill` skips it.
"""

from __future__ import annotations

import argparse
import getpass
import io
import json
import math
import multiprocessing
import os
import re
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import optuna
import psycopg2
import torch
from optuna.trial import TrialState
from rich.console import Console

from hpsearch.config import StorageConfig, load_config
from hpsearch.objective import suggest_hparams, work_ahead
from hpsearch.progress import Display
from hpsearch.pruning import MedianPruner
from hpsearch.signals import StopRequest
from hpsearch.storage import open_storage, set_user_attrs
from hpsearch.study import open_study
from hpsearch.worker import trial_loop

from machine import machine

REPO = Path(__file__).resolve().parents[1]

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
conv1_channels = 16
conv2_channels = 32
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
        self.storage.close()
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
    ts = b.trials(name)
    span, done = search_span(ts)
    return {"workers": n, "trials": done, "search_s": span, "wall_s": wall,
            "per_min": 60 * done / span, "per_min_wall": 60 * done / wall,
            "per_min_steady": steady_rate(ts)}


def steady_rate(ts) -> float:
    """Trials/min summed over workers, each over its own first start to last end: the rate once
    running, without the stagger of workers finishing start-up at different moments."""
    by_worker: dict[str, list] = {}
    for t in ts:
        if t.state == TrialState.COMPLETE:
            by_worker.setdefault(t.user_attrs.get("worker", "?"), []).append(t)
    return sum(60 * len(mine) / (max(t.datetime_complete for t in mine) - min(t.datetime_start for t in mine))
               .total_seconds() for mine in by_worker.values())


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


# --- storage + sampler overhead: the worker loop with a trivial objective ------------------------


class TrivialObjective:
    """A real trial's storage traffic without the training: the default search space suggested,
    the user attributes a real trial sets (11 at the start, one checkpoint reference per epoch, 7 at
    the end), a report and a pruning check per epoch, and a made-up loss that TPE can model."""

    taken_over = None  # what the worker loop asks of an objective (see hpsearch.objective)
    interrupted = None

    def __init__(self, cfg, epochs: int = 3, train_s: float = 0.0) -> None:
        self.cfg = cfg
        self.epochs = epochs
        self.train_s = train_s  # a trial's training, slept (no CPU) in equal parts before each report
        self.slept: list[float] = []  # per call: the training slept (less than train_s when pruned)

    def __call__(self, trial: optuna.Trial) -> float:
        hp = suggest_hparams(trial, self.cfg.search)
        set_user_attrs(trial, trivial_attrs(hp))  # as hpsearch.objective does: one transaction
        loss = made_up_loss(hp)
        self.slept.append(0.0)
        for epoch in range(1, self.epochs + 1):
            work_ahead(trial, epoch)  # as hpsearch.objective does when an epoch starts
            if self.train_s:
                time.sleep(self.train_s / self.epochs)
                self.slept[-1] += self.train_s / self.epochs
            trial.set_user_attr("epoch_checkpoint", {"artifact": "-", "trial": trial.number, "epoch": epoch})
            trial.report(loss * (1 + 1 / epoch), epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()
        ended = {"epochs": self.epochs, "epochs_trained": self.epochs, "samples_per_s": 0.0,
                 "stop_reason": f"reached max_epochs={self.epochs}", "val_accuracy": 0.9,
                 "best_epoch": self.epochs, "best_weights": "-"}
        set_user_attrs(trial, ended)
        return loss


def trivial_attrs(hp) -> dict:
    return {"hparams": hp.to_dict(), "seed": 1, "device": "cpu", "host": "bench", "worker": "bench:1",
            "worker_index": 0, "threads": 1, "split_fingerprint": "0" * 16, "code_version": "bench",
            "versions": {"torch": torch.__version__, "optuna": optuna.__version__}, "epoch_checkpoint": None}


def made_up_loss(hp) -> float:
    """Smooth in the searched values, with a best lr near 3e-3: something for TPE to model."""
    return (math.log10(hp.lr) + 2.5) ** 2 + hp.dropout / 5 + math.log10(hp.weight_decay + 1e-7) / 50 + 1


def overhead_config(name: str, n_trials: int):
    """The default study's search space, sampler, pruner and storage settings, on a new name."""
    cfg = load_config(REPO / "studies" / "cnn.toml")
    return cfg.model_copy(update={"study": cfg.study.model_copy(update={"name": name}),
                                  "budget": cfg.budget.model_copy(update={"n_trials": n_trials})})


PRUNERS = ("hpsearch", "optuna", "no-prefetch")


def use_pruner(study: optuna.Study, cfg, which: str) -> None:
    """The benchmarks' pruner contenders, with the study file's settings: "hpsearch" leaves the
    worker's own (src/hpsearch/pruning.py: Optuna's decisions from a tally, its read started as
    the epoch starts); "optuna" gives `study` Optuna's own MedianPruner; "no-prefetch" hpsearch's
    without the early read (each report reads the trial list when it is made)."""
    if which == "optuna":
        study.pruner = optuna.pruners.MedianPruner(cfg.pruner.n_startup_trials, cfg.pruner.n_warmup_steps)
    elif which == "no-prefetch":
        study.pruner = MedianPruner(cfg.pruner.n_startup_trials, cfg.pruner.n_warmup_steps, prefetch_max_age_s=0)
    elif which != "hpsearch":
        raise ValueError(f"unknown pruner contender {which!r}; one of {PRUNERS}")


def populate(url: str, name: str, n: int) -> float:
    """`n` finished trials of the default space (values, 3 intermediate values, the attributes a real
    trial has) written into the study before the workers start; returns the seconds it took."""
    cfg = overhead_config(name, n)
    study = open_study(cfg, open_storage(url, cfg.storage))
    scratch = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(n):
        t = scratch.ask()
        hp = suggest_hparams(t, cfg.search)
        set_user_attrs(t, trivial_attrs(hp))
        loss = made_up_loss(hp)
        for epoch in (1, 2, 3):
            t.report(loss * (1 + 1 / epoch), epoch)
        scratch.tell(t, loss)
    t0 = time.monotonic()
    study.add_trials(scratch.get_trials(deepcopy=False))
    return time.monotonic() - t0


def overhead_worker(url: str, name: str, budget: int, index: int, go, out: str) -> None:
    """One worker process: hpsearch's own trial loop (sweeps, budget checks, heartbeat, ask/tell)
    with the trivial objective; writes when each trial ended."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    cfg = overhead_config(name, budget)
    storage = open_storage(url, cfg.storage)
    study = open_study(cfg, storage, index)
    ended: list[float] = []

    class Stamps(Display):
        def trial_done(self, study, trial, budget_state) -> None:
            super().trial_done(study, trial, budget_state)
            ended.append(time.monotonic())

    go.wait()
    start = time.monotonic()
    trial_loop(study, storage, cfg, TrivialObjective(cfg), Stamps(Console(file=io.StringIO()), live=False),
               StopRequest(grace_period=cfg.storage.grace_period))
    Path(out).write_text(json.dumps({"start": start, "ended": ended}))


def overhead(b: Bench, existing: int, workers: int, trials: int) -> dict:
    """Per-trial time of `workers` processes sharing a study that already holds `existing` trials."""
    name = f"overhead-{existing}"
    populate_s = populate(b.url, name, existing) if existing else 0.0
    ctx = multiprocessing.get_context("spawn")
    go = ctx.Event()
    outs = [b.tmp / f"{name}-w{i}.json" for i in range(workers)]
    procs = [ctx.Process(target=overhead_worker, args=(b.url, name, existing + trials, i, go, str(o)))
             for i, o in enumerate(outs)]
    for p in procs:
        p.start()
    time.sleep(3)  # imports and connections, so the clock starts with every worker ready
    go.set()
    for p in procs:
        p.join()
    if any(p.exitcode for p in procs):
        sys.exit(f"overhead workers failed: {[p.exitcode for p in procs]}")
    per_trial, first, span_end, span_start = [], [], 0.0, math.inf
    for o in outs:
        d = json.loads(o.read_text())
        stamps = [d["start"], *d["ended"]]
        gaps = [b_ - a for a, b_ in zip(stamps, stamps[1:])]
        if gaps:
            first.append(gaps[0])  # includes loading the study's existing trials into the cache
            per_trial.extend(gaps[1:])
            span_start, span_end = min(span_start, d["start"]), max(span_end, d["ended"][-1])
    done = sum(t.state.is_finished() for t in b.trials(name)) - existing
    per_trial.sort()
    return {
        "existing": existing, "workers": workers, "trials": done, "populate_s": populate_s,
        "median_ms": 1000 * statistics.median(per_trial),
        "p90_ms": 1000 * per_trial[int(0.9 * (len(per_trial) - 1))],
        "mean_ms": 1000 * statistics.fmean(per_trial),
        "first_trial_ms": 1000 * statistics.median(first),
        "trials_per_s": done / (span_end - span_start),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--trials", type=int, default=16, help="trials per throughput run")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeat", type=int, default=2, help="throughput runs per worker count")
    p.add_argument("--overhead-workers", type=int, default=8)
    p.add_argument("--overhead-trials", type=int, default=240, help="new trials per overhead run")
    p.add_argument("--existing", type=int, nargs="+", default=[0, 2000],
                   help="trials already in the study for each overhead run")
    p.add_argument("--parts", nargs="+", choices=["throughput", "overhead", "kill", "restart"],
                   default=["throughput", "overhead", "kill", "restart"],
                   help="what to measure (restart needs throughput with 2 workers as its baseline)")
    p.add_argument("--quick", action="store_true",
                   help="tiny throughput and overhead runs: checks the script runs (no kill, no restart)")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args()
    if args.quick:
        args.trials, args.epochs, args.repeat = 2, 1, 1
        args.overhead_workers, args.overhead_trials, args.existing = 2, 6, [0, 20]
        args.parts = [x for x in args.parts if x in ("throughput", "overhead")]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out: dict = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
                 "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    b = Bench(args)
    try:
        print(f"# {machine()}; PostgreSQL on {HOST}:{PORT}")
        rows = []
        if "throughput" in args.parts:
            print(f"## {args.trials} trials x {args.epochs} epochs, MNIST t10k (7,000 train images), "
                  f"1 thread per worker")
            print("workers  trials  search s  trials/min  steady trials/min  (incl. start-up: wall s, trials/min)  load before")
            # Interleaved (1, 2, 1, 2, ...) so that other load on the machine hits both alike.
            for rep in range(args.repeat):
                for n in args.workers:
                    load = os.getloadavg()[0]
                    r = throughput(b, n, rep)
                    rows.append(r)
                    print(f"{r['workers']:>7}  {r['trials']:>6}  {r['search_s']:>8.1f}  {r['per_min']:>10.1f}"
                          f"  {r['per_min_steady']:>17.1f}  ({r['wall_s']:.1f}, {r['per_min_wall']:.1f})  {load:.2f}",
                          flush=True)
            med = {n: statistics.median(r["per_min"] for r in rows if r["workers"] == n) for n in args.workers}
            steady = {n: statistics.median(r["per_min_steady"] for r in rows if r["workers"] == n)
                      for n in args.workers}
            lo = min(args.workers)
            for n in args.workers:
                if n != lo:
                    print(f"{n} workers: {med[n] / med[lo]:.2f}x the trials/min of {lo}, "
                          f"{steady[n] / steady[lo]:.2f}x steady (medians)")
            out["throughput"] = {"runs": rows, "median_per_min": med, "median_per_min_steady": steady}
        if "overhead" in args.parts:
            print(f"## storage + sampler overhead: {args.overhead_workers} workers, trivial objective, "
                  f"{args.overhead_trials} new trials, default study (TPE multivariate + constant liar, median pruner)")
            print("existing  trials  per trial: median ms  p90 ms  mean ms  first trial ms  trials/s  (populate s)")
            out["overhead"] = []
            for existing in args.existing:
                r = overhead(b, existing, args.overhead_workers, args.overhead_trials)
                out["overhead"].append(r)
                print(f"{r['existing']:>8}  {r['trials']:>6}  {r['median_ms']:>20.1f}  {r['p90_ms']:>6.1f}  "
                      f"{r['mean_ms']:>7.1f}  {r['first_trial_ms']:>14.1f}  {r['trials_per_s']:>8.1f}  "
                      f"({r['populate_s']:.1f})", flush=True)
        out["kill"] = []
        for hb, grace in ((1, 4), (10, 60)) if "kill" in args.parts else ():
            k = kill_recovery(b, hb, grace)
            out["kill"].append(k)
            print(f"kill -9 (heartbeat {hb} s, grace {grace} s): failed+re-queued after "
                  f"{k['requeued_after_s']:.1f} s, copy started after {k['copy_started_after_s']:.1f} s, "
                  f"resumed after epoch {k['resumed_from_epoch']}, trained {k['epochs_trained_by_copy']} "
                  f"more epoch(s); {k['complete']} complete")
        if "restart" in args.parts:
            base = next((r for r in reversed(rows) if r["workers"] == 2), None)
            if base is None:
                sys.exit("the restart's baseline is the 2-worker throughput run: add it to --parts")
            r = restart_cost(b, base)
            out["restart"] = r
            print(f"PostgreSQL restart ({r['restart_s']:.1f} s for pg_ctlcluster) during a 2-worker search: "
                  f"worker exit codes {r['codes']}, {r['trials']} trials complete, {r['lost_trials']} failed; "
                  f"workers waited {', '.join(f'{w:.1f}' for w in r['waits_s'])} s; search took "
                  f"{r['search_s']:.1f} s vs {base['search_s']:.1f} s without the restart "
                  f"({r['extra_s_vs_baseline']:+.1f} s)")
    finally:
        b.close()
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    print(f"logs: {b.tmp}")


if __name__ == "__main__":
    main()

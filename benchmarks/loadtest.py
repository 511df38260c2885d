"""Load test of the storage path: W simulated workers against PostgreSQL, directly and through
`hpsearch proxy`, on studies that already hold 0, 2,000 and 10,000 finished trials.

Each simulated worker runs hpsearch's real worker loop (`hpsearch.worker.trial_loop`: sweeps,
budget checks, the slot claim, the lease thread, ask/tell) around an objective that makes a real
trial's storage traffic (the default space suggested, a real trial's user attributes, a report
and a pruning check per epoch) and trains nothing. Workers are threads, `--threads-per-process`
of them per process, sharing that process's storage object (a real worker process has its own):
direct database connections therefore grow with the number of processes, W / 8.

Reported per run: trials/s, ask and tell latency p50/p99 (ask: from `study.optimize` to the
objective, so it includes the sampler, the trial's creation, the slot claim and the first lease;
tell: from the objective's return until `optimize` returns), the most connections to the
database seen in `pg_stat_activity`, and the budget overshoot (trials counted beyond the budget:
must be 0) with the number of over-budget claims refused.

Paced runs (`--train-s S`): each trial also sleeps S seconds in all (its training, without CPU),
and the workers join one after another over S seconds, so the storage sees a real fleet's pace
instead of 64 workers asking at once on two cores; `overhead` is then a trial's time in the
worker loop minus the training it slept (S, or less for a pruned trial), what a worker loses per
trial to the search machinery.
`--refresh` runs the proxy with several `hpsearch proxy --refresh` values, one proxy each (0: every
read goes to the database, as Optuna's cached storage alone does).

    uv run python benchmarks/loadtest.py            # the full table (about 10 minutes on 2 cores)
    uv run python benchmarks/loadtest.py --quick    # 8 workers, 16 trials on 0 and 20: seconds of work
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing
import os
import queue
import secrets
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import optuna
from optuna.trial import TrialState
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from machine import machine  # noqa: E402
from scaling import PRUNERS, TrivialObjective, made_up_loss, overhead_config, use_pruner  # noqa: E402
from storages import HOST, PORT, Proxy, admin_connection, pg_connections, pg_database  # noqa: E402

from hpsearch.objective import suggest_hparams  # noqa: E402
from hpsearch.progress import Display  # noqa: E402
from hpsearch.recovery import OVER_BUDGET  # noqa: E402
from hpsearch.signals import StopRequest  # noqa: E402
from hpsearch.storage import open_storage, study_names  # noqa: E402
from hpsearch.study import open_study  # noqa: E402
from hpsearch.worker import open_worker_storage, trial_loop  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "loadtest.json"


class Timed:
    """The objective, with the moments it was entered and left (for ask and tell latency)."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.taken_over = None
        self.interrupted = None
        self.current: int | None = None  # as hpsearch's objective: the trial it entered last
        self.entered: list[float] = []
        self.left: list[float] = []
        self.slept: list[float] = []  # the training each call slept (all of train_s unless pruned)

    def __call__(self, trial: optuna.Trial) -> float:
        self.current = trial.number
        self.entered.append(time.perf_counter())
        before = len(self.inner.slept)
        try:
            return self.inner(trial)
        finally:
            self.left.append(time.perf_counter())
            self.slept.append(sum(self.inner.slept[before:]))


def populate(url: str, name: str, n: int) -> float:
    """`n` finished trials of the default space (params, value, 3 reported values and the
    `hparams` user attribute; not the other attributes of a real trial, which only make writing
    them slower), added through `study.add_trials` by `writers` processes at once."""
    storage = open_storage(url)
    open_study(overhead_config(name, n), storage)  # the study, made once before the writers join
    storage.close()
    writers = 4 if n >= 1000 else 1  # processes cost seconds to start: only worth it for many trials
    ctx = multiprocessing.get_context("spawn")
    share = [n // writers + (i < n % writers) for i in range(writers)]
    procs = [ctx.Process(target=populate_part, args=(url, name, k, i)) for i, k in enumerate(share)]
    t0 = time.monotonic()
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    if any(p.exitcode for p in procs):
        sys.exit(f"populating the study failed: {[p.exitcode for p in procs]}")
    return time.monotonic() - t0


def populate_part(url: str, name: str, n: int, seed: int) -> None:
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    cfg = overhead_config(name, n)
    storage = open_storage(url, cfg.storage)
    study = open_study(cfg, storage)
    scratch = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    trials = []
    for _ in range(n):
        t = scratch.ask()
        hp = suggest_hparams(t, cfg.search)
        loss = made_up_loss(hp)
        trials.append(optuna.trial.create_trial(
            params=t.params, distributions=t.distributions, value=loss, user_attrs={"hparams": hp.to_dict()},
            intermediate_values={e: loss * (1 + 1 / e) for e in (1, 2, 3)}))
    study.add_trials(trials)
    storage.close()


def process(url: str, name: str, budget: int, first_index: int, threads: int, ready, go, out: str,
            history: int, train_s: float = 0.0, stagger_s: float = 0.0, writes: str = "behind",
            pruner: str = "hpsearch", ahead: bool = True) -> None:
    """One process of `threads` simulated workers sharing one storage: the worker's own
    (`open_worker_storage`, trial writes and tells sent in the background), with
    `writes="tell-waited"` the same with each tell waiting for its trial's writes, or with
    `writes="sync"` one that waits for every write; with `pruner="optuna"`, Optuna's MedianPruner instead of hpsearch's
    tallied one (the same decisions); with `ahead=False`, TPE never samples ahead (each trial is
    sampled as it starts)."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    cfg = with_history(overhead_config(name, budget), history, ahead)
    storage = (open_storage(url, cfg.storage, pool_size=2, max_overflow=2) if writes == "sync"
               else open_worker_storage(url, cfg, tell_behind=writes == "behind", pool_size=2, max_overflow=2))
    rows: list[dict] = []
    odd: list[dict] = []  # pairings that cannot be (a trial outside its optimize call): a broken measure
    opened = threading.Barrier(threads + 1)

    def worker(i: int) -> None:
        try:
            study = open_study(cfg, storage, worker_index=i)
            use_pruner(study, cfg, pruner)
        except BaseException:
            opened.abort()  # the process fails instead of waiting for this thread
            raise
        objective = Timed(TrivialObjective(cfg, train_s=train_s))
        started: list[float] = []
        ended: list[float] = []
        optimize = study.optimize

        def timed_optimize(*a, **k):
            started.append(time.perf_counter())
            try:
                return optimize(*a, **k)
            finally:
                ended.append(time.perf_counter())

        study.optimize = timed_optimize  # instrumentation only: the loop is hpsearch's own
        opened.wait()
        go.wait()
        time.sleep(i * stagger_s)  # paced runs: workers join one after another, as a fleet's nodes do
        trial_loop(study, storage, cfg, objective, Display(Console(file=io.StringIO()), live=False),
                   StopRequest())
        # Trials refused as over budget never enter the objective: pair only the ones that did.
        for s, e in zip(started, ended):
            inside = [(a, b, z) for a, b, z in zip(objective.entered, objective.left, objective.slept) if s <= a <= e]
            if inside:
                a, b, slept = inside[0]
                # overhead: the trial's time in the worker loop that was not its (slept) training
                row = {"ask": a - s, "tell": e - b, "trial": e - s, "overhead": e - s - slept}
                if len(inside) > 1 or not s <= a <= b <= e or slept > b - a:
                    odd.append({**row, "optimize": [s, e], "objective": inside})
                rows.append(row)

    pool = [threading.Thread(target=worker, args=(first_index + i,)) for i in range(threads)]
    for t in pool:
        t.start()
    opened.wait()  # imported, connected, the studies loaded: the clock may start
    ready.put(first_index)
    go.wait()
    cpu0 = time.process_time()  # this process's CPU (all its threads) from the start signal on
    for t in pool:
        t.join()
    cpu = time.process_time() - cpu0
    storage.close()
    Path(out).write_text(json.dumps({"rows": rows, "cpu_s": cpu, "odd": odd}))


def cpu_seconds(pids: list[int]) -> float:
    """CPU time of these processes and of their children that have ended (utime + stime + cutime
    + cstime from /proc: a PostgreSQL backend's time goes to the postmaster's when it exits)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        total += sum(int(fields[i]) for i in (11, 12, 13, 14))  # fields 14-17 of proc(5)
    return total / os.sysconf("SC_CLK_TCK")


def postgres_pids() -> list[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if stat.read_text().split(" ", 2)[1] == "(postgres)":
                pids.append(int(stat.parent.name))
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
    return pids


def refused(pg_url: str, name: str) -> int:
    """Trials refused as over budget in the study so far (0 if it does not exist yet)."""
    storage = open_storage(pg_url)
    try:
        trials = optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    except KeyError:
        return 0
    finally:
        storage.close()
    return sum(OVER_BUDGET in t.system_attrs for t in trials)


@contextlib.contextmanager
def kept_database(name: str):
    """A database on the tests' server that outlives the run (for a 10,000-trial study)."""
    con, user = admin_connection()
    with con.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
        if cur.fetchone() is None:
            cur.execute(f'CREATE DATABASE "{name}"')
    con.close()
    yield f"postgresql+psycopg2://{user}@{HOST}:{PORT}/{name}"


def counted_so_far(pg_url: str, name: str) -> int | None:
    """Finished trials of study `name` (None when there is no such study yet)."""
    storage = open_storage(pg_url)
    try:
        if name not in study_names(storage):
            return None
        trials = optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
        return sum(t.state.is_finished() and OVER_BUDGET not in t.system_attrs for t in trials)
    finally:
        storage.close()


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


def with_history(cfg, history: int, ahead: bool = True):
    """`cfg` with TPE's window of `history` trials; `ahead=False`: it never samples ahead."""
    update = {"history": history} if ahead else {"history": history, "sample_ahead_from": 0}
    return cfg.model_copy(update={"sampler": cfg.sampler.model_copy(update=update)})


def run(url: str, pg_url: str, name: str, budget: int, workers: int, per_process: int, tmp: Path,
        history: int, proxy_pid: int | None, train_s: float = 0.0, solo: bool = False,
        solo_train_s: float | None = None, writes: str = "behind", pruner: str = "hpsearch",
        ahead: bool = True) -> dict:
    ctx = multiprocessing.get_context("spawn")
    ready, go = ctx.Queue(), ctx.Event()
    # `solo`: worker 0 alone in a process of its own, as a real worker is: its figures are a real
    # worker's in a fleet of this size (the others share a process, and its GIL, 8 at a time).
    sizes = [1] if solo else []
    rest = workers - len(sizes)
    n_proc = max(1, rest // per_process)
    sizes += [rest // n_proc + (i < rest % n_proc) for i in range(n_proc)]
    firsts = [sum(sizes[:i]) for i in range(len(sizes))]
    outs = [tmp / f"{name}-{workers}-{i}.json" for i in range(len(sizes))]
    paces = [train_s] * len(sizes)
    if solo and solo_train_s is not None:
        paces[0] = solo_train_s  # shorter trials: more of them measured, at the fleet's pace of the rest
    procs = [ctx.Process(target=process, args=(url, name, budget, first, size, ready, go, str(o),
                                               history, pace, train_s / workers, writes, pruner, ahead))
             for first, size, o, pace in zip(firsts, sizes, outs, paces)]
    refused_before = refused(pg_url, name)  # the study may have had runs before this one
    for p in procs:
        p.start()
    peak = [0]
    watching = threading.Event()

    def watch() -> None:
        while not watching.wait(0.25):
            peak[0] = max(peak[0], pg_connections(pg_url))

    started = 0  # the clock starts with every process ready, however long its imports take
    while started < len(procs):
        try:
            ready.get(timeout=1)
            started += 1
        except queue.Empty:
            if any(p.exitcode is not None for p in procs):
                sys.exit(f"load test processes failed to start: {[p.exitcode for p in procs]}")
    watcher = threading.Thread(target=watch)
    watcher.start()
    servers = {"proxy": [proxy_pid] if proxy_pid else [], "database": postgres_pids()}
    server_cpu0 = {k: cpu_seconds(v) for k, v in servers.items()}
    start = time.perf_counter()
    go.set()
    for p in procs:
        p.join()
    wall = time.perf_counter() - start
    server_cpu = {k: cpu_seconds(v) - server_cpu0[k] for k, v in servers.items()}
    watching.set()
    watcher.join()
    if any(p.exitcode for p in procs):
        sys.exit(f"load test processes failed: {[p.exitcode for p in procs]}")
    done = [json.loads(o.read_text()) for o in outs]
    rows = [r for d in done for r in d["rows"]]
    # Where the CPU went, per trial: the simulated workers' processes, the proxy, PostgreSQL. With
    # every worker on a node of its own, the workers' share is spread over W nodes and the proxy's
    # (one process) and the database's are what the fleet waits on.
    cpu = {"workers": sum(d["cpu_s"] for d in done), **server_cpu}
    per_trial = {k: round(1000 * v / max(len(rows), 1), 1) for k, v in cpu.items()}
    reader = open_storage(pg_url)
    trials = optuna.load_study(study_name=name, storage=reader).get_trials(deepcopy=False)
    reader.close()
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    counted = [t for t in trials if t.state.is_finished() and OVER_BUDGET not in t.system_attrs
               and t.number not in retried]
    ms = lambda xs, q: round(1000 * percentile(xs, q), 1)  # noqa: E731
    asks, tells = [r["ask"] for r in rows], [r["tell"] for r in rows]
    return {
        "workers": workers, "processes": len(sizes), "history": history, "trials": len(rows), "wall_s": round(wall, 2),
        "trials_per_s": round(len(rows) / wall, 2),
        "ask_p50_ms": ms(asks, 0.5), "ask_p99_ms": ms(asks, 0.99),
        "tell_p50_ms": ms(tells, 0.5), "tell_p99_ms": ms(tells, 0.99),
        "trial_p50_ms": ms([r["trial"] for r in rows], 0.5), "train_s": train_s,
        "overhead_p50_ms": ms([r["overhead"] for r in rows], 0.5),
        "overhead_p90_ms": ms([r["overhead"] for r in rows], 0.9),
        "overhead_p99_ms": ms([r["overhead"] for r in rows], 0.99),
        "db_connections_peak": peak[0],
        "cpu_ms_per_trial": per_trial,
        "overshoot": len(counted) - budget,
        "refused_over_budget": sum(OVER_BUDGET in t.system_attrs for t in trials) - refused_before,
        "unfinished": sum(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials),
        "odd_pairings": [o for d in done for o in d["odd"]],  # must be empty (see `process`)
        **(solo_figures(done[0]) if solo else {}),
    }


def solo_figures(out: dict) -> dict:
    """The worker alone in its process: its trials, their overhead, its own CPU per trial."""
    rows = out["rows"]
    ms = lambda xs, q: round(1000 * percentile(xs, q), 1)  # noqa: E731
    return {"solo_trials": len(rows),
            "solo_overhead_p50_ms": ms([r["overhead"] for r in rows], 0.5),
            "solo_overhead_max_ms": ms([r["overhead"] for r in rows], 1.0),
            "solo_ask_p50_ms": ms([r["ask"] for r in rows], 0.5),
            "solo_tell_p50_ms": ms([r["tell"] for r in rows], 0.5),
            "solo_cpu_ms_per_trial": round(1000 * out["cpu_s"] / max(len(rows), 1), 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="8 workers, 16 trials, on 0 and 20 trials, both paths")
    p.add_argument("--workers", type=int, nargs="+", default=[8, 32, 64])
    p.add_argument("--existing", type=int, nargs="+", default=None, help="finished trials already in the "
                   "study (default: 0 2000 10000; with --quick 0 20)")
    p.add_argument("--threads-per-process", type=int, default=8)
    p.add_argument("--history", type=int, nargs="+", default=[1000],
                   help="[sampler] history values to run (0: TPE on every trial); several alternate")
    p.add_argument("--paths", nargs="+", choices=["postgresql", "proxy"], default=["postgresql", "proxy"])
    p.add_argument("--refresh", type=float, nargs="+", default=[5.0],
                   help="`hpsearch proxy --refresh` values (0: every read goes to the database, as "
                   "Optuna's cached storage alone does); several alternate, one proxy each")
    p.add_argument("--train-s", type=float, default=0.0,
                   help="each trial sleeps this long in all (its training, without CPU): the fleet then asks "
                   "at a real fleet's pace, and `overhead` is a trial's time in the loop minus this")
    p.add_argument("--trials-per-worker", type=float, default=None,
                   help="new trials per run, per worker (default: W + 16 per run)")
    p.add_argument("--writes", nargs="+", choices=["behind", "tell-waited", "sync"], default=["behind"],
                   help="the workers' trial writes: sent in the background with the tell behind them as "
                   "`hpsearch worker` does (behind), the same with each tell waiting for them (tell-waited), "
                   "or each waited for (sync); several alternate")
    p.add_argument("--pruner", nargs="+", choices=PRUNERS, default=["hpsearch"],
                   help="the median pruner: hpsearch's tallied one (pruning.py, as `hpsearch worker` uses) "
                        "and/or Optuna's MedianPruner, which walks every complete trial at each report")
    p.add_argument("--ahead", nargs="+", choices=["on", "off"], default=["on"],
                   help="TPE samples each worker's next trial while its current one trains (on, as "
                        "`hpsearch worker` does from 1,000 finished trials) and/or as each trial starts (off)")
    p.add_argument("--repeats", type=int, default=1, help="repeats of every run; the order alternates")
    p.add_argument("--solo", action="store_true",
                   help="run worker 0 alone in its own process and report its figures apart (solo_*)")
    p.add_argument("--solo-train-s", type=float, default=None,
                   help="the solo worker's trials sleep this long instead of --train-s (more of them measured)")
    p.add_argument("--json", type=Path, default=RESULTS)
    p.add_argument("--database", help="keep the studies in this PostgreSQL database (created if missing, "
                   "not dropped) and reuse a study of the same size from an earlier run")
    p.add_argument("--data-dir", help=argparse.SUPPRESS)  # accepted like the other benchmarks'
    args = p.parse_args()
    if args.quick:
        args.workers, args.existing = [8], args.existing or [0, 20]
    args.existing = args.existing or [0, 2000, 10000]
    if args.trials_per_worker:
        new_trials = lambda w: int(round(args.trials_per_worker * w))  # noqa: E731
    else:
        # Every worker gets a trial; quick: two per worker, so the solo worker (its own process, a
        # slower start on a loaded machine) is not left without one by the others' second trials.
        new_trials = (lambda w: 2 * w) if args.quick else (lambda w: w + 16)
    tmp = Path(__import__("tempfile").mkdtemp(prefix="hpsearch-load-"))
    contenders = [(via, refresh, writes, pruner, ahead) for ahead in args.ahead for pruner in args.pruner
                  for writes in args.writes
                  for via, refresh in ([("postgresql", None)] if "postgresql" in args.paths else []) +
                  ([("proxy", r) for r in args.refresh] if "proxy" in args.paths else [])]
    results = []
    with (kept_database(args.database) if args.database else pg_database()) as pg_url:
        open_storage(pg_url).close()  # the tables, before the proxy opens the database too
        for existing in args.existing:
            name = f"load-{existing}" if args.database else f"load-{existing}-{secrets.token_hex(2)}"
            done = counted_so_far(pg_url, name)
            populate_s = populate(pg_url, name, existing) if existing and done is None else 0.0
            print(f"{existing} trials written in {populate_s:.1f} s", flush=True)
            done = counted_so_far(pg_url, name) or existing
            for repeat in range(args.repeats):
                for via, refresh, writes, pruner, ahead in (contenders if repeat % 2 == 0 else contenders[::-1]):
                    for w in args.workers:
                        for history in args.history:
                            budget = done + new_trials(w)
                            proxy = None if via == "postgresql" else Proxy(
                                pg_url, tmp / "proxy.log", args=("--refresh", str(refresh))).start()
                            try:
                                if proxy is not None:  # its first read of the whole study, not timed
                                    counted_so_far(proxy.url, name)
                                row = run(pg_url if proxy is None else proxy.url, pg_url, name, budget, w,
                                          args.threads_per_process, tmp, history,
                                          None if proxy is None else proxy.proc.pid, args.train_s, args.solo,
                                          args.solo_train_s, writes, pruner, ahead == "on")
                            finally:
                                if proxy is not None:
                                    proxy.stop()
                            done = budget
                            row.update(existing=existing, via=via, refresh=refresh, writes=writes, pruner=pruner,
                                       ahead=ahead, repeat=repeat,
                                       populate_s=round(populate_s, 1),
                                       load_average=[round(x, 2) for x in __import__("os").getloadavg()])
                            results.append(row)
                            print(json.dumps(row), flush=True)
                            save(args, results)  # row by row: a run cut short keeps what it measured
    print(table(results))


def save(args: argparse.Namespace, results: list[dict]) -> None:
    command = "uv run python benchmarks/loadtest.py" + (" --quick" if args.quick else "")
    if args.quick and args.existing != [0, 20]:
        command += f" --existing {' '.join(map(str, args.existing))}"
    if not args.quick and (args.workers != [8, 32, 64] or args.existing != [0, 2000, 10000]):
        command += f" --workers {' '.join(map(str, args.workers))} --existing {' '.join(map(str, args.existing))}"
    if args.history != [1000]:
        command += f" --history {' '.join(map(str, args.history))}"
    for flag, value, default in (("--paths", args.paths, ["postgresql", "proxy"]), ("--refresh", args.refresh, [5.0]), ("--writes", args.writes, ["behind"]),
                                 ("--pruner", args.pruner, ["hpsearch"]), ("--ahead", args.ahead, ["on"]),
                                 ("--train-s", args.train_s, 0.0), ("--trials-per-worker", args.trials_per_worker, None),
                                 ("--repeats", args.repeats, 1), ("--solo", args.solo, False),
                                 ("--solo-train-s", args.solo_train_s, None)):
        if value is True:
            command += f" {flag}"
        elif value != default:
            command += f" {flag} {' '.join(map(str, value)) if isinstance(value, list) else value}"
    if args.database:
        command += f" --database {args.database}"
    doc = {"machine": machine(), "load_average": list(__import__("os").getloadavg()),
           "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": command,
           "results": results}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=1) + "\n")


def table(rows: list[dict]) -> str:
    head = ("| existing | via | W | procs | TPE models | trials/s | ask p50 / p99 ms | tell p50 / p99 ms | "
            "trial p50 ms | overhead p50 / p90 ms | DB connections | overshoot | refused | "
            "CPU ms per trial: workers / proxy / DB |")
    lines = [head, "|" + " --- |" * 14]
    for r in rows:
        via = r["via"] if r.get("refresh") is None else f"proxy, refresh {r['refresh']:g} s"
        via += f", writes {r['writes']}" if "writes" in r else ""  # runs saved before it were sync
        via += {"optuna": ", Optuna's pruner", "no-prefetch": ", pruner without prefetch"}.get(
            r.get("pruner"), "")  # unlabelled: hpsearch's (or, saved before the option, Optuna's)
        via += ", no sample ahead" if r.get("ahead") == "off" else ""
        over = f"{r['overhead_p50_ms']} / {r['overhead_p90_ms']}" if "overhead_p50_ms" in r else "-"
        lines.append(f"| {r['existing']:,} | {via} | {r['workers']} | {r['processes']} | "
                     f"{'all' if not r.get('history', 0) else format(r['history'], ',')} | {r['trials_per_s']} | "
                     f"{r['ask_p50_ms']} / {r['ask_p99_ms']} | {r['tell_p50_ms']} / {r['tell_p99_ms']} | "
                     f"{r['trial_p50_ms']} | {over} | {r['db_connections_peak']} | {r['overshoot']} | "
                     f"{r['refused_over_budget']} | {_cpu(r)} |")
    return "\n".join(lines)


def _cpu(r: dict) -> str:
    c = r.get("cpu_ms_per_trial")  # not in the runs saved before it was measured
    return "-" if c is None else f"{c['workers']} / {c['proxy']} / {c['database']}"


if __name__ == "__main__":
    main()

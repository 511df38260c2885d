"""One worker alone, through `hpsearch proxy`, on a large study: what it loses per trial besides
training, and on which storage calls. Five contenders: hpsearch's worker ("behind": its trial
writes and its tell sent behind, `worker.open_worker_storage`, and its tallied median pruner,
`pruning.py`, whose read of the trial list starts as the epoch starts); the same with every call
waited for ("sync", `storage.open_storage`); the same as "behind" with Optuna's own
`MedianPruner` ("optuna-pruner"), which makes the same decisions on a read made at the report;
the same as "behind" with hpsearch's pruner reading at the report too ("no-prefetch"); the
same as "behind" with each tell waiting for its trial's last writes ("tell-waited"); and the
same as "behind" with TPE never sampling ahead, each trial sampled as it starts ("no-ahead").

The worker runs hpsearch's real loop (`worker.trial_loop`: sweeps, budget, slot claim, lease, TPE
on its window, the pruner) around the load test's objective (a real trial's storage traffic:
the default space, ~20 user attributes, 3 reports and pruning checks; its training slept,
`--train-s` per trial in 3 equal epochs) on a study that already holds N finished trials, through
a proxy with its default refresh; nothing else runs. Each repeat runs every contender in turn
(the order alternating), each on a fresh storage: one warm-up trial (the worker's first read of
the whole study) and then K trials. Per trial: the loop's wall time minus the training
("overhead"), the process's CPU time, and the storage calls the worker's own thread waited on,
by method (not the writes sent in the background).

    uv run python benchmarks/solo_worker.py                  # N = 10,000 (written first: ~6 min), 3 repeats of 15 trials
    uv run python benchmarks/solo_worker.py --database NAME  # reuse study load-N in a kept database
    uv run python benchmarks/solo_worker.py --quick          # N = 20, 1 repeat of 2 trials
    uv run python benchmarks/solo_worker.py --epochs 15 --train-s 3 --contenders behind no-prefetch
                                                             # the default study's 15 epochs, two contenders
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import optuna
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from loadtest import counted_so_far, kept_database, populate, with_history  # noqa: E402
from machine import machine  # noqa: E402
from scaling import TrivialObjective, overhead_config, use_pruner  # noqa: E402
from storages import Proxy, pg_database  # noqa: E402

from hpsearch.progress import Display  # noqa: E402
from hpsearch.signals import StopRequest  # noqa: E402
from hpsearch.storage import RetryingStorage, open_storage  # noqa: E402
from hpsearch.study import open_study  # noqa: E402
from hpsearch.worker import trial_loop, worker_storage  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "solo_worker.json"
# (label, trial writes, pruner): hpsearch's worker, the same waiting for every write, and the same
# with Optuna's own MedianPruner (which walks every complete trial at each report) instead of
# hpsearch's tallied one (src/hpsearch/pruning.py; the same decisions).
CONTENDERS = (("behind", "behind", "hpsearch"), ("sync", "sync", "hpsearch"),
              ("optuna-pruner", "behind", "optuna"), ("no-prefetch", "behind", "no-prefetch"),
              ("tell-waited", "tell-waited", "hpsearch"), ("no-ahead", "behind", "hpsearch"))


def waited_on(storage: RetryingStorage) -> dict[str, list[float]]:
    """Time every call the calling thread (the worker's own) makes through `storage`, by method:
    instrumentation of this one object only."""
    calls: dict[str, list[float]] = collections.defaultdict(list)
    call, me = storage._call, threading.current_thread()

    def timed(name, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return call(name, *args, **kwargs)
        finally:
            if threading.current_thread() is me:
                calls[name].append(time.perf_counter() - t0)

    storage._call = timed
    return calls


def one_run(url: str, name: str, writes: str, trials: int, train_s: float, pruner: str = "hpsearch",
            epochs: int = 3, ahead: bool = True) -> dict:
    budget = counted_so_far(url, name) + trials + 1
    cfg = with_history(overhead_config(name, budget), 1000, ahead)
    base = open_storage(url, cfg.storage)
    storage = base if writes == "sync" else worker_storage(base, url, tell_behind=writes == "behind")
    study = open_study(cfg, storage)
    use_pruner(study, cfg, pruner)
    display = Display(Console(file=io.StringIO()), live=False)
    objective = TrivialObjective(cfg, epochs=epochs, train_s=train_s)
    trial_loop(study, storage, cfg, objective, display, StopRequest(), n_trials=1)  # warm-up
    calls = waited_on(base)
    objective.slept.clear()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    trial_loop(study, storage, cfg, objective, display, StopRequest(), n_trials=trials)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    storage.close()
    return {"writes": writes, "pruner": pruner, "ahead": ahead, "trials": trials, "train_s": train_s, "epochs": epochs,
            # the loop's time besides the training slept (less than train_s for a pruned trial)
            "overhead_ms": round(1000 * (wall - sum(objective.slept)) / trials, 1),
            "cpu_ms": round(1000 * cpu / trials, 1),
            "calls": {m: {"per_trial": round(len(t) / trials, 2), "ms_per_trial": round(1000 * sum(t) / trials, 1)}
                      for m, t in sorted(calls.items(), key=lambda kv: -sum(kv[1]))}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--existing", type=int, default=10000, help="finished trials in the study first")
    p.add_argument("--trials", type=int, default=15, help="trials per contender per repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--train-s", type=float, default=1.5, help="each trial's training, slept")
    p.add_argument("--epochs", type=int, default=3, help="epochs per trial (a report and a pruning check each; "
                                                           "the default study's warm-up is 2)")
    p.add_argument("--contenders", nargs="+", choices=[c[0] for c in CONTENDERS], default=[c[0] for c in CONTENDERS])
    p.add_argument("--database", help="a kept PostgreSQL database holding study load-N (created if missing)")
    p.add_argument("--json", type=Path, default=RESULTS)
    p.add_argument("--data-dir", help=argparse.SUPPRESS)  # accepted like the other benchmarks'
    args = p.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    if args.quick:
        args.existing, args.trials, args.repeats, args.train_s = 20, 2, 1, 0.3
    name = f"load-{args.existing}"
    rows = []
    with (kept_database(args.database) if args.database else pg_database()) as pg_url:
        open_storage(pg_url).close()  # the tables, before the proxy opens the database too
        if counted_so_far(pg_url, name) is None:
            print(f"{args.existing} trials written in {populate(pg_url, name, args.existing):.1f} s", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            proxy = Proxy(pg_url, Path(tmp) / "proxy.log").start()
            try:
                counted_so_far(proxy.url, name)  # the proxy's first read of the whole study, not timed
                for r in range(args.repeats):
                    chosen = [c for c in CONTENDERS if c[0] in args.contenders]
                    for label, writes, pruner in (chosen if r % 2 == 0 else chosen[::-1]):
                        row = {"repeat": r, "contender": label,
                               **one_run(proxy.url, name, writes, args.trials, args.train_s, pruner, args.epochs,
                                                 ahead=label != "no-ahead")}
                        rows.append(row)
                        print(json.dumps(row), flush=True)
            finally:
                proxy.stop()
    labels = [c[0] for c in CONTENDERS if c[0] in args.contenders]
    summary = {w: statistics.median(r["overhead_ms"] for r in rows if r["contender"] == w) for w in labels}
    print("| contender | overhead per trial ms (median of repeats) | repeats | CPU ms per trial |")
    print("| --- | --- | --- | --- |")
    for w in labels:
        mine = [r for r in rows if r["contender"] == w]
        print(f"| {w} | {summary[w]} | {' / '.join(str(r['overhead_ms']) for r in mine)} | "
              f"{' / '.join(str(r['cpu_ms']) for r in mine)} |")
    command = "uv run python benchmarks/solo_worker.py" + (" --quick" if args.quick else
                                                          f" --existing {args.existing} --trials {args.trials} "
                                                          f"--repeats {args.repeats} --train-s {args.train_s:g}"
                                                          + (f" --epochs {args.epochs}" if args.epochs != 3 else "")
                                                          + (f" --contenders {' '.join(args.contenders)}"
                                                             if len(labels) < len(CONTENDERS) else ""))
    doc = {"machine": machine(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "command": command + (f" --database {args.database}" if args.database else ""),
           "existing": args.existing, "median_overhead_ms": summary, "results": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()

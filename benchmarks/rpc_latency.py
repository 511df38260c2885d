"""What one storage call costs a worker, with nothing else running: the floor under a trial's
storage time, which makes some 45 of them (BENCHMARKS.md, section 5).

One client, on a fresh PostgreSQL database holding a study with one running trial, times a write
(`set_trial_user_attr`, the most frequent call of a trial) and a read of the trial list
(`get_all_trials`) on each path: PostgreSQL directly (Optuna's cached storage in the worker's
process), and through `hpsearch proxy` with `--refresh 5` (reads from its memory, the default)
and `--refresh 0` (every read goes to the database, as Optuna's cached storage alone does).
Each repeat times every path in turn, the order alternating; the medians of the repeats' medians.

    uv run python benchmarks/rpc_latency.py            # 5 repeats of 100 writes and 30 reads per path
    uv run python benchmarks/rpc_latency.py --quick    # 1 repeat of 10 writes and 5 reads
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import optuna

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from machine import machine  # noqa: E402
from storages import Proxy, pg_database  # noqa: E402

from hpsearch.storage import open_storage  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "rpc_latency.json"


def timed(storage, study_name: str, writes: int, reads: int) -> tuple[float, float]:
    """Median seconds of one write and one read through `storage`."""
    study = optuna.load_study(study_name=study_name, storage=storage)
    sid = storage.get_study_id_from_name(study_name)
    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))[0]
    tid = storage.get_trial_id_from_study_id_trial_number(sid, running.number)
    w, r = [], []
    for i in range(writes):
        t0 = time.perf_counter()
        storage.set_trial_user_attr(tid, f"k{i % 5}", i)
        w.append(time.perf_counter() - t0)
    for _ in range(reads):
        t0 = time.perf_counter()
        storage.get_all_trials(sid, deepcopy=False)
        r.append(time.perf_counter() - t0)
    return statistics.median(w), statistics.median(r)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", type=Path, default=RESULTS)
    p.add_argument("--data-dir", help=argparse.SUPPRESS)  # accepted like the other benchmarks'
    args = p.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    repeats, writes, reads = (1, 10, 5) if args.quick else (args.repeats, 100, 30)
    tmp = Path(tempfile.mkdtemp(prefix="hpsearch-rpc-"))
    with pg_database() as pg:
        setup = open_storage(pg)
        optuna.create_study(study_name="rpc", storage=setup).ask()  # the one running trial
        setup.close()
        proxies = {f"proxy, refresh {r:g} s": Proxy(pg, tmp / f"proxy-{r:g}.log", args=("--refresh", str(r))).start()
                   for r in (5.0, 0.0)}
        try:
            urls = {"postgresql": pg, **{k: v.url for k, v in proxies.items()}}
            storages = {k: open_storage(u) for k, u in urls.items()}
            for s in storages.values():
                timed(s, "rpc", 3, 3)  # warm: connections, the proxies' first full read
            per = {k: {"write": [], "read": []} for k in urls}
            for rep in range(repeats):
                for k in (list(urls) if rep % 2 == 0 else list(urls)[::-1]):
                    w, r = timed(storages[k], "rpc", writes, reads)
                    per[k]["write"].append(w)
                    per[k]["read"].append(r)
            for s in storages.values():
                s.close()
        finally:
            for proxy in proxies.values():
                proxy.stop()
    rows = [{"path": k, "write_ms": round(1000 * statistics.median(v["write"]), 2),
             "read_ms": round(1000 * statistics.median(v["read"]), 2),
             "repeat_write_ms": [round(1000 * x, 2) for x in v["write"]],
             "repeat_read_ms": [round(1000 * x, 2) for x in v["read"]]} for k, v in per.items()]
    print("| path | write (set_trial_user_attr) ms | read (get_all_trials) ms |")
    print("| --- | --- | --- |")
    for row in rows:
        print(f"| {row['path']} | {row['write_ms']} | {row['read_ms']} |")
    doc = {"machine": machine(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "command": "uv run python benchmarks/rpc_latency.py" + (" --quick" if args.quick else
                                                                     f" --repeats {repeats}"),
           "writes_per_repeat": writes, "reads_per_repeat": reads, "results": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()

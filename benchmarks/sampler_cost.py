"""The sampler's own cost per ask on large studies, without any database: the default study's
sampler (TPE, multivariate, grouped, constant liar) asked for one trial of the default space in
an in-memory study that already holds N finished trials.

    uv run python benchmarks/sampler_cost.py                 # N = 0, 2,000, 10,000
    uv run python benchmarks/sampler_cost.py --quick         # N = 0, 200
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import optuna

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import machine  # noqa: E402
from scaling import made_up_loss, overhead_config  # noqa: E402

from hpsearch.objective import suggest_hparams  # noqa: E402
from hpsearch.study import make_sampler  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "sampler_cost.json"


def cost(n: int, asks: int) -> dict:
    cfg = overhead_config(f"sampler-{n}", n)
    scratch = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(n):
        t = scratch.ask()
        scratch.tell(t, made_up_loss(suggest_hparams(t, cfg.search)))
    study = optuna.create_study(sampler=make_sampler(cfg.sampler))
    study.add_trials(scratch.get_trials(deepcopy=False))
    times = []
    for _ in range(asks):
        t0 = time.perf_counter()
        trial = study.ask()
        hp = suggest_hparams(trial, cfg.search)
        times.append(time.perf_counter() - t0)
        study.tell(trial, made_up_loss(hp))
    return {"existing": n, "asks": asks, "median_ms": round(1000 * statistics.median(times), 1),
            "max_ms": round(1000 * max(times), 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--asks", type=int, default=10)
    p.add_argument("--json", type=Path, default=RESULTS)
    p.add_argument("--data-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sizes = [0, 200] if args.quick else [0, 2000, 10000]
    rows = []
    for n in sizes:
        rows.append(cost(n, 3 if args.quick else args.asks))
        print(json.dumps(rows[-1]), flush=True)
    doc = {"machine": machine(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "command": "uv run python benchmarks/sampler_cost.py" + (" --quick" if args.quick else f" --asks {args.asks}"),
           "results": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()

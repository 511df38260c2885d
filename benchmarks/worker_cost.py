"""A worker's own cost per trial on large studies, without any database: what each of hundreds of
workers spends, on its own CPU, per trial that is not training.

One worker runs hpsearch's real loop (`hpsearch.worker.trial_loop`: sweeps, the budget count, the
slot claim, the lease thread, ask with the default sampler (TPE on its history window of 1,000),
the objective's storage traffic without training (`scaling.TrivialObjective`: the default space,
a real trial's user attributes, a report and a pruning check per epoch), tell, the display) for K
trials, on an in-memory storage that already holds N finished trials. Per trial: the run's wall
time / K. Contenders:

- **tally**: the worker as it is (`study.BudgetTally`: the run of finished trials from trial 0 is
  counted once; each budget count and slot claim looks only at the trials after it);
- **walk**: the same loop whose budget count, slot claim and best value walk every trial of the
  study each time (a fresh tally per question), as the worker did before the tally;
- **optuna-pruner**: the worker as it is, with Optuna's own `MedianPruner` instead of hpsearch's
  (`pruning.py`: the same decisions, the complete trials' reports tallied once instead of walked
  at every report, and no read at the warm-up epochs).

Each repeat gives each a fresh copy of the same N trials and the same seed; the order alternates;
a warm-up run before each N is not counted.

    uv run python benchmarks/worker_cost.py              # N = 0, 2,000, 10,000; 3 repeats of 30 trials
    uv run python benchmarks/worker_cost.py --quick      # N = 0 and 300, 3 trials: seconds
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import optuna
from optuna.storages import InMemoryStorage
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import machine  # noqa: E402
from scaling import TrivialObjective, made_up_loss, overhead_config, use_pruner  # noqa: E402

import hpsearch.worker  # noqa: E402
from hpsearch.objective import suggest_hparams  # noqa: E402
from hpsearch.progress import Display  # noqa: E402
from hpsearch.signals import StopRequest  # noqa: E402
from hpsearch.storage import RetryingStorage  # noqa: E402
from hpsearch.study import BudgetTally, open_study  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "worker_cost.json"


class Walk(BudgetTally):
    """Every question answered by a walk over every trial (a fresh tally each time)."""

    def state(self, trials, budget):
        return BudgetTally().state(trials, budget)

    def holds_slot(self, trials, number, budget):
        return BudgetTally().holds_slot(trials, number, budget)


CONTENDERS = {"tally": BudgetTally, "walk": Walk, "optuna-pruner": BudgetTally}


def finished_trials(cfg, n: int) -> list[optuna.trial.FrozenTrial]:
    """`n` finished trials of the default space, as a real study holds them (3 reports each)."""
    scratch = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(n):
        t = scratch.ask()
        hp = suggest_hparams(t, cfg.search)
        loss = made_up_loss(hp)
        t.set_user_attr("hparams", hp.to_dict())
        for epoch in (1, 2, 3):
            t.report(loss * (1 + 1 / epoch), epoch)
        scratch.tell(t, loss)
    return scratch.get_trials(deepcopy=False)


def one_run(contender: str, n: int, trials, k: int, seed: int) -> float:
    """Seconds per trial of one worker running `k` trials on a fresh copy of the study."""
    cfg = overhead_config(f"worker-cost-{n}", n + 10 * k)
    cfg = cfg.model_copy(update={"sampler": cfg.sampler.model_copy(update={"seed": seed})})
    storage = RetryingStorage(InMemoryStorage(), "in-memory")
    study = open_study(cfg, storage)
    study.add_trials(trials)
    use_pruner(study, cfg, "optuna" if contender == "optuna-pruner" else "hpsearch")
    hpsearch.worker.BudgetTally = CONTENDERS[contender]  # with the pruner, the one thing that differs
    try:
        t0 = time.perf_counter()
        hpsearch.worker.trial_loop(study, storage, cfg, TrivialObjective(cfg),
                                   Display(Console(file=io.StringIO()), live=False), StopRequest(), n_trials=k)
        return (time.perf_counter() - t0) / k
    finally:
        hpsearch.worker.BudgetTally = BudgetTally


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--trials", type=int, default=30, help="trials per contender per repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--existing", type=int, nargs="+", default=[0, 2000, 10000])
    p.add_argument("--json", type=Path, default=RESULTS)
    p.add_argument("--data-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    sizes, k, repeats = ([0, 300], 3, 1) if args.quick else (args.existing, args.trials, args.repeats)
    rows = []
    for n in sizes:
        trials = finished_trials(overhead_config("scratch", n), n)
        per = {c: [] for c in CONTENDERS}
        one_run("tally", n, trials, min(k, 3), seed=-1)  # warm-up, not counted: first imports, caches
        for r in range(repeats):
            order = list(CONTENDERS) if r % 2 == 0 else list(CONTENDERS)[::-1]
            for c in order:
                per[c].append(one_run(c, n, trials, k, seed=r))
        for c in CONTENDERS:
            rows.append({"existing": n, "contender": c, "trials": k * repeats,
                         "median_ms": round(1000 * statistics.median(per[c]), 1),
                         "repeat_ms": [round(1000 * s, 1) for s in per[c]]})
        print(json.dumps(rows[-len(CONTENDERS):]), flush=True)
    print("| finished trials | contender | ms per trial (median) | repeats |")
    print("| --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['existing']:,} | {row['contender']} | {row['median_ms']} | "
              f"{' / '.join(map(str, row['repeat_ms']))} |")
    doc = {"machine": machine(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "command": "uv run python benchmarks/worker_cost.py" + (" --quick" if args.quick else
                                                                    f" --trials {k} --repeats {repeats}"),
           "results": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()

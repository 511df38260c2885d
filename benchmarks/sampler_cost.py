"""The sampler's own cost per ask on large studies, without any database, and what the history
window (`[sampler] history`, src/hpsearch/window.py) saves and costs.

The default study's sampler (TPE, multivariate, grouped, constant liar) is asked for trials of the
default space in in-memory studies that already hold N finished trials (the same N trials for
every contender: the default space sampled at random, scored by a made-up loss with a known best
region, `scaling.made_up_loss`). Contenders: TPE on the whole study (history = 0) and TPE on
windows of 1,000 and 500 trials, each trial sampled as it starts; and TPE on the window of 1,000
sampling ahead (`[sampler] sample_ahead_from`, here from any study size, so `--quick` takes that
path too): each trial's sample made while the trial before it "trained" (here: between its ask
and its tell), so the time is what is left between two trials and the sample lacks the last
trial's result. Each repeat gives every contender a fresh copy of the study and the same seed;
their asks are interleaved one by one, so machine noise hits them alike. Reported per contender: the median ask (+ suggest) time, and the quality of what TPE proposes: the median
and best made-up loss of the proposed points (lower is better; TPE on the whole study is the
reference).

    uv run python benchmarks/sampler_cost.py                 # N = 0, 2,000, 10,000; 3 repeats of 40 asks
    uv run python benchmarks/sampler_cost.py --quick         # N = 0, 300 and a window of 250: seconds
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import optuna
from optuna.storages import InMemoryStorage

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import machine  # noqa: E402
from scaling import made_up_loss, overhead_config  # noqa: E402

from hpsearch.objective import suggest_hparams, work_ahead  # noqa: E402
from hpsearch.study import make_sampler  # noqa: E402
from hpsearch.window import AHEAD_THREAD  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "sampler_cost.json"


def history_trials(cfg, n: int) -> list[optuna.trial.FrozenTrial]:
    scratch = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(n):
        t = scratch.ask()
        scratch.tell(t, made_up_loss(suggest_hparams(t, cfg.search)))
    return scratch.get_trials(deepcopy=False)


# (history, ahead): the window TPE is asked on (0: the whole study) and whether it samples ahead
Contender = tuple[int, bool]


def fresh_study(cfg, contender: Contender, seed: int, trials) -> optuna.Study:
    history, ahead = contender
    sampler_cfg = cfg.sampler.model_copy(update={"history": history, "seed": seed,
                                                 "sample_ahead_from": 1 if ahead else 0})
    storage = InMemoryStorage()
    study = optuna.create_study(storage=storage, sampler=make_sampler(sampler_cfg, 0, storage))
    study.add_trials(trials)
    return study


def one_ask(study: optuna.Study, cfg, ahead: bool = False) -> tuple[float, float]:
    t0 = time.perf_counter()
    trial = study.ask()
    hp = suggest_hparams(trial, cfg.search)
    took = time.perf_counter() - t0
    if ahead:  # the trial's first epoch starts: the next trial is sampled meanwhile
        work_ahead(trial, 1)
        for thread in threading.enumerate():  # the "training" outlasts it, as a real epoch does
            if thread.name == AHEAD_THREAD:
                thread.join()
    loss = made_up_loss(hp)
    study.tell(trial, loss)
    return took, loss


def compare(n: int, histories: list[Contender], asks: int, repeats: int) -> list[dict]:
    cfg = overhead_config(f"sampler-{n}", n)
    trials = history_trials(cfg, n)
    runs = {h: {"ms": [], "loss": [], "repeat_ms": []} for h in histories}
    for r in range(repeats):
        order = histories if r % 2 == 0 else histories[::-1]  # alternate who asks first
        studies = {h: fresh_study(cfg, h, seed=r, trials=trials) for h in order}
        times = {h: [] for h in order}
        for _ in range(asks):
            for h in order:
                took, loss = one_ask(studies[h], cfg, ahead=h[1])
                times[h].append(took)
                runs[h]["loss"].append(loss)
        for h in order:
            runs[h]["ms"] += times[h]
            runs[h]["repeat_ms"].append(round(1000 * statistics.median(times[h]), 1))
    return [{"existing": n, "history": h[0], "ahead": h[1], "asks": len(runs[h]["ms"]),
             "median_ms": round(1000 * statistics.median(runs[h]["ms"]), 1),
             "repeat_median_ms": runs[h]["repeat_ms"],
             "max_ms": round(1000 * max(runs[h]["ms"]), 1),
             "proposed_loss_median": round(statistics.median(runs[h]["loss"]), 4),
             "proposed_loss_best": round(min(runs[h]["loss"]), 4)} for h in histories]


def table(rows: list[dict]) -> str:
    lines = ["| finished trials | TPE models | ask median ms | repeats' medians | max ms | proposed loss median / best |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        models = "all" if r["history"] == 0 else f"window of {r['history']:,}"
        models += ", sampled ahead" if r.get("ahead") else ""
        lines.append(f"| {r['existing']:,} | {models} | {r['median_ms']} | "
                     f"{' / '.join(map(str, r['repeat_median_ms']))} | {r['max_ms']} | "
                     f"{r['proposed_loss_median']} / {r['proposed_loss_best']} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--asks", type=int, default=40, help="asks per contender per repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path, default=RESULTS)
    p.add_argument("--data-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if args.quick:
        plan, asks, repeats = [(0, [(0, False), (250, False)]), (300, [(0, False), (250, False), (250, True)])], 3, 1
    else:
        plan = [(0, [(0, False), (1000, False)]),
                (2000, [(0, False), (1000, False), (500, False), (1000, True)]),
                (10000, [(0, False), (1000, False), (500, False), (1000, True)])]
        asks, repeats = args.asks, args.repeats
    rows = []
    for n, histories in plan:
        rows += compare(n, histories, asks, repeats)
        print(json.dumps(rows[-len(histories):]), flush=True)
    print(table(rows))
    doc = {"machine": machine(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "command": "uv run python benchmarks/sampler_cost.py" + (" --quick" if args.quick else
                                                                     f" --asks {asks} --repeats {repeats}"),
           "results": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""hpsearch side by side with what a user would use instead, on the same 2 cores:

- **hpsearch**: `hpsearch worker` with the default study (`studies/mnist-idx.toml`), one worker
  using every core, a fresh SQLite storage (as `search_efficiency.py` runs it);
- **ray tune**: Ray Tune with the ASHA scheduler and its OptunaSearch (TPE) as Ray's documentation
  recommends (`ray.init(num_cpus=2)`, one CPU per trial so two trials run at once, one torch
  thread each; ASHA with grace period 1 and reduction factor 2 as in Ray's PyTorch tutorial), the
  data passed with `tune.with_parameters`; every trial the tutorial loop (`seedstyle.py`);
- **optuna script**: the hand-written Optuna script in the optuna-examples style: TPE, the
  MedianPruner on per-epoch validation accuracy, `study.optimize(timeout=...)`, one process using
  every core, every trial the tutorial loop.

All three search the space of the same study file (`suggest_hparams`: Ray's OptunaSearch takes it
as a define-by-run function), on the same split, with the same CNN and the same `max_epochs`, and
the samplers are seeded alike (TPE's first draws are then the same configurations). The clock
starts before loading the data (for Ray: before `ray.init`). The contenders alternate in every
repeat; each run records the 1-minute load average before and after it, so noise from other work
on the machine shows. The study's trial budget is lifted: the wall-clock budget is the only bound.
`--contenders hpsearch processes2 startup4 no-early-stop batch128 hyperband none` runs hpsearch
with one default changed in each (the "levers", `LEVERS`).

    uv run python benchmarks/peers.py --data-dir ../shared/data/mnist-t10k --budget 300 --repeats 3 \\
        --json benchmarks/results/peers.json
    uv run python benchmarks/peers.py --data-dir ../shared/data/mnist-t10k --quick   # CI smoke
    uv run python benchmarks/peers.py --report benchmarks/results/peers.json

`--quick` is bounded by work: two trials of one epoch per contender.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import optuna

# Ray's trial processes run this interpreter, with the benchmarks folder on their path as on the
# driver's. Under `uv run` Ray would otherwise copy the project into a package of its own and
# start every worker with `uv run` there (its uv hook), where `search_efficiency` is not
# importable and a fresh environment is built first; the switch is Ray's documented one.
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

import ray  # noqa: E402
import torch  # noqa: E402
from ray import tune  # noqa: E402
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from hpsearch.config import SearchSpace, StudyConfig, TrainingConfig, load_config
from hpsearch.data import SearchData, load_search_data
from hpsearch.objective import suggest_hparams
from hpsearch.recovery import OVER_BUDGET
from hpsearch.study import sampler_seed

from machine import machine
from search_efficiency import REPO, Run, _fmt_s, hpsearch_run, reprinted, report, seed_style_trial

CONTENDERS = ("hpsearch", "ray tune", "optuna script")


def _with(cfg: StudyConfig, section: str, **values: Any) -> StudyConfig:
    """`cfg` with `values` set in one of its sections."""
    return cfg.model_copy(update={section: getattr(cfg, section).model_copy(update=values)})


# The levers: hpsearch with one default changed, each a row of its own (`--contenders hpsearch
# processes2 startup4 ...`). A lever names the change and how to make it on the study's config.
LEVERS: dict[str, tuple[str, Any]] = {
    "hyperband": ("hpsearch, hyperband pruner", lambda c: _with(c, "pruner", type="hyperband")),
    "none": ("hpsearch, no pruner", lambda c: _with(c, "pruner", type="none")),
    # Two worker processes of one thread each on one study, as `hpsearch worker --processes 2`
    # runs them on a 2-core node, against the default: one worker with both cores.
    "processes2": ("hpsearch, 2 processes x 1 thread", lambda c: c),
    "startup4": ("hpsearch, 4 startup trials", lambda c: _with(c, "sampler", n_startup_trials=4)),
    # Early stopping off: patience as long as the trial.
    "no-early-stop": ("hpsearch, no early stopping", lambda c: _with(c, "training", patience=c.training.max_epochs)),
    # The smallest batch out of the space: its fixed cost per step is paid twice as often.
    "batch128": ("hpsearch, batch 128/256 only",
                 lambda c: _with(c, "search", batch_size=c.search.batch_size.model_copy(update={"choices": (128, 256)}))),
}


def study_seed(cfg: StudyConfig, seed: int) -> int:
    """The seed hpsearch's TPE gets for repeat `seed`: the peers' TPE gets the same one, so their
    first (random) draws are hpsearch's first configurations."""
    return sampler_seed(cfg.sampler.model_copy(update={"seed": seed}))


def optuna_script_run(cfg: StudyConfig, data_dir: str, seed: int, budget: float, n_trials: int | None) -> Run:
    """optuna-examples style: maximize the last epoch's validation accuracy, report it every epoch,
    MedianPruner, TPE; one process with torch's default threads (every core)."""
    run = Run("optuna script", seed, budget)
    start = time.perf_counter()
    data = load_search_data(cfg.data, data_dir, torch.device("cpu"))

    def objective(trial: optuna.Trial) -> float:
        hp = suggest_hparams(trial, cfg.search)
        run.params.append(dict(trial.params))
        run.trials += 1
        acc = 0.0
        epochs = seed_style_trial(data, hp, cfg.training, seed * 1_000_003 + trial.number, start + budget)
        for epoch, (_, acc) in enumerate(epochs):
            run.timeline.append((time.perf_counter() - start, acc, trial.number))
            run.epochs += 1
            trial.report(acc, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return acc

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=study_seed(cfg, seed)),
                                pruner=optuna.pruners.MedianPruner())
    study.optimize(objective, n_trials=n_trials, timeout=budget)
    return run


def define_by_run(trial: optuna.Trial, space: SearchSpace) -> None:
    """OptunaSearch's space: the study file's, as hpsearch suggests it (Ray pickles it, so it is
    a module-level function)."""
    suggest_hparams(trial, space)


def ray_trainable(config: dict[str, Any], data: SearchData, space: StudyConfig, training: TrainingConfig,
                  seed: int, threads: int) -> None:
    """One Ray Tune trial: the tutorial loop, `tune.report` after every epoch (ASHA decides there)."""
    torch.set_num_threads(threads)
    # The same mapping from the sampled values to hyperparameters as hpsearch's, by replaying them.
    hp = suggest_hparams(optuna.trial.FixedTrial(config), space.search)
    trial_seed = seed * 1_000_003 + zlib.crc32(tune.get_context().get_trial_id().encode()) % 1_000_003
    for val_loss, val_acc in seed_style_trial(data, hp, training, trial_seed, math.inf):
        # Wall-clock time: the driver's clock is another process's.
        tune.report({"val_loss": val_loss, "val_accuracy": val_acc, "wall": time.time()})


class Timeline(tune.Callback):
    """The driver's record of every reported epoch. Trials are numbered in the order the searcher
    made them (`trials` is in that order), which is not always the order they start in."""

    def __init__(self, run: Run, start_wall: float) -> None:
        self.run, self.start_wall, self.configs = run, start_wall, {}

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.configs[trials.index(trial)] = dict(trial.config)
        self.run.params = [self.configs[n] for n in sorted(self.configs)]
        self.run.trials += 1

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self.run.timeline.append((result["wall"] - self.start_wall, result["val_accuracy"], trials.index(trial)))
        self.run.epochs += 1


def ray_tune_run(cfg: StudyConfig, data_dir: str, seed: int, budget: float, workdir: Path,
                 n_trials: int | None, cpus: int) -> Run:
    run = Run("ray tune", seed, budget)
    start_wall = time.time()
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    try:
        data = load_search_data(cfg.data, data_dir, torch.device("cpu"))

        trainable = tune.with_resources(
            tune.with_parameters(ray_trainable, data=data, space=cfg, training=cfg.training, seed=seed, threads=1),
            {"cpu": 1})
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                # The metric goes to each (OptunaSearch refuses a define-by-run space without it,
                # and Ray 2.60 does not pass TuneConfig's through to it under max_concurrent_trials).
                search_alg=OptunaSearch(space=functools.partial(define_by_run, space=cfg.search), metric="val_loss", mode="min", seed=study_seed(cfg, seed)),
                scheduler=ASHAScheduler(metric="val_loss", mode="min", max_t=cfg.training.max_epochs,
                                        grace_period=1, reduction_factor=2),
                num_samples=-1 if n_trials is None else n_trials, max_concurrent_trials=cpus,
                # Ray counts its budget from `fit`; the clock here started before `ray.init`.
                time_budget_s=max(budget - (time.time() - start_wall), 1.0),
            ),
            run_config=tune.RunConfig(storage_path=str(workdir / "ray"), name=f"peers-{seed}", verbose=0,
                                      callbacks=[Timeline(run, start_wall)]),
        )
        tuner.fit()
    finally:
        ray.shutdown()
    run.timeline.sort()
    return run


def hpsearch_processes_run(cfg: StudyConfig, data_dir: str, seed: int, budget: float, workdir: Path,
                           processes: int) -> Run:
    """`processes` hpsearch workers of `cores // processes` threads each on one fresh SQLite study,
    each a process of its own (`worker_child.py`: what `hpsearch worker --processes K` starts),
    stopped with SIGTERM at the end of the budget. Worker 0's sampler is seeded as the single
    worker's; the others' apart, as on a node."""
    run = Run("hpsearch", seed, budget)
    start_wall = time.time()
    cfg = _with(cfg, "sampler", seed=seed)
    url = f"sqlite:///{workdir / f'hpsearch-{seed}.db'}"
    threads = max(1, (os.cpu_count() or 1) // processes)
    children = []
    for i in range(processes):
        spec, out = workdir / f"spec-{seed}-{i}.json", workdir / f"timeline-{seed}-{i}.json"
        spec.write_text(json.dumps(dict(cfg=cfg.model_dump(mode="json"), storage_url=url, data_dir=data_dir,
                                        worker_index=i, threads=threads, start_wall=start_wall,
                                        budget=budget, out=str(out))))
        children.append((subprocess.Popen([sys.executable, str(Path(__file__).with_name("worker_child.py")),
                                           str(spec)]), out))
    for child, _ in children:
        try:
            child.wait(timeout=max(start_wall + budget - time.time(), 0.1))
        except subprocess.TimeoutExpired:
            child.send_signal(signal.SIGTERM)  # the worker's own stop: the trial is re-queued
    for child, out in children:
        if child.wait() != 0:
            raise RuntimeError(f"worker_child.py exited with {child.returncode}")
        record = json.loads(out.read_text())
        run.timeline += [tuple(row) for row in record["timeline"]]
        run.trials += record["trials"]
    run.timeline.sort()
    run.epochs = len(run.timeline)
    study = optuna.load_study(study_name=cfg.study.name, storage=url)
    # Not the trials refused at the start for lack of a budget slot (two workers raced for it).
    run.params = [t.params for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
                  if OVER_BUDGET not in t.system_attrs]
    return run


def measured(fn, *args) -> Run:
    """`fn(*args)`, with the 1-minute load average before and after (other work on the machine)."""
    before = os.getloadavg()[0]
    run = fn(*args)
    run.load_1min = [round(before, 2), round(os.getloadavg()[0], 2)]
    return run


def one_run(who: str, cfg: StudyConfig, args: argparse.Namespace, rep: int, tmp: Path) -> Run:
    if who == "hpsearch":
        return measured(hpsearch_run, cfg, args.data_dir, rep, args.budget, tmp)
    lever = next((k for k, (label, _) in LEVERS.items() if label == who), None)
    if lever is not None:
        variant = LEVERS[lever][1](cfg)
        (tmp / lever).mkdir(exist_ok=True)
        if lever == "processes2":
            run = measured(hpsearch_processes_run, variant, args.data_dir, rep, args.budget, tmp / lever, 2)
        else:
            run = measured(hpsearch_run, variant, args.data_dir, rep, args.budget, tmp / lever)
        run.contender = who
        return run
    if who == "ray tune":
        return measured(ray_tune_run, cfg, args.data_dir, rep, args.budget, tmp, args.trials, args.cpus)
    return measured(optuna_script_run, cfg, args.data_dir, rep, args.budget, args.trials)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", help="folder of IDX files (e.g. the MNIST test set)")
    ap.add_argument("--study", type=Path, default=REPO / "studies" / "mnist-idx.toml",
                    help="the study file hpsearch runs and whose search space every contender uses")
    ap.add_argument("--targets", type=float, nargs="+", default=[0.992, 0.99],
                    help="validation accuracies to time; the first is the headline")
    ap.add_argument("--budget", type=float, default=300.0, help="seconds per run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--contenders", nargs="+", default=list(CONTENDERS),
                    choices=list(CONTENDERS) + list(LEVERS), help="who runs, in this order (levers: hpsearch "
                    "with one default changed)")
    ap.add_argument("--cpus", type=int, default=os.cpu_count(), help="Ray's num_cpus (one trial per CPU)")
    ap.add_argument("--quick", action="store_true", help="two one-epoch trials each: checks the script runs")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--report", type=Path, help="print the tables of a saved --json file again (no runs)")
    args = ap.parse_args()
    if reprinted(ap, args):
        return
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    cfg = load_config(args.study)
    # The wall-clock budget bounds every contender alike, not the study file's trial count.
    cfg = cfg.model_copy(update={"budget": cfg.budget.model_copy(update={"n_trials": 1_000_000})})
    args.trials = None
    if args.quick:  # bounded by work, with a budget far above what it needs
        args.budget, args.repeats, args.trials = 600.0, 1, 2
        cfg = cfg.model_copy(update={"budget": cfg.budget.model_copy(update={"n_trials": 2}),
                                     "training": cfg.training.model_copy(update={"max_epochs": 1})})
    names = [LEVERS[c][0] if c in LEVERS else c for c in args.contenders]

    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="hpsearch-peers-") as tmp:
        for rep in range(args.repeats):
            order = names if rep % 2 == 0 else names[::-1]
            for who in order:
                run = one_run(who, cfg, args, rep, Path(tmp))
                runs.append(run)
                t = run.time_to(args.targets[0])
                print(f"repeat {rep} {run.contender:<26} to {args.targets[0]:.1%}: {_fmt_s(t, args.budget):>7} s   "
                      f"best {run.best_in_budget():.2%}   {run.trials} trials, {run.epochs} epochs   "
                      f"load {run.load_1min[0]:.2f} -> {run.load_1min[1]:.2f}", flush=True)
    # The first contender is the one compared with the others.
    runs.sort(key=lambda r: names.index(r.contender))
    results = report(runs, args.targets, args.budget)
    if args.json:
        args.json.write_text(json.dumps(dict(
            date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            machine=machine(), cpus=args.cpus, versions=dict(ray=ray.__version__, optuna=optuna.__version__,
                                                             torch=torch.__version__),
            study=str(args.study), budget_s=args.budget, repeats=args.repeats, quick=args.quick,
            target=args.targets[0], speedup=results[0]["speedup"], summary=results[0]["summary"],
            by_target=results, runs=[asdict(r) for r in runs]), indent=2))


if __name__ == "__main__":
    main()

"""Search efficiency: wall-clock time until the best validation accuracy reaches a target, and the
best accuracy reached within a fixed budget, for

- **hpsearch**: `hpsearch worker` with the default study (`studies/mnist-idx.toml`: the cnn search
  space, TPE, median pruning, early stopping), one worker, a fresh SQLite storage;
- **random search, seed-style**: what a user would otherwise write: the same search space sampled
  at random (Optuna's RandomSampler over the same `suggest_hparams`), every trial trained for
  `max_epochs` with the tutorial loop (`benchmarks/seedstyle.py`: PIL transforms in a DataLoader,
  plain optimizers, ReduceLROnPlateau as in the seed document), no pruning, no early stopping.

Both use the same split of the same files, the same number of CPU threads, and start their clock
before loading the data. The contenders alternate in every repeat so machine noise hits them alike.

    uv run python benchmarks/search_efficiency.py --data-dir ../shared/data/mnist-t10k
    uv run python benchmarks/search_efficiency.py --data-dir ../shared/data/mnist-t10k --quick  # CI smoke
    uv run python benchmarks/search_efficiency.py --report benchmarks/results/search_efficiency.json

Prints a table and writes JSON (--json) with every run's timeline (seconds, val accuracy, trial).
A run that misses the target within the budget counts as "> budget" (a lower bound).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import optuna
import torch
from rich.console import Console

from hpsearch.config import StudyConfig, TrainingConfig, load_config
from hpsearch.data import SearchData, crop_size, load_search_data
from hpsearch.model import ModelSpec
from hpsearch.objective import Progress, suggest_hparams
from hpsearch.progress import Display
from hpsearch.study import make_sampler
from hpsearch.train import HParams
from hpsearch.worker import WorkerOptions, run_worker

import seedstyle  # benchmarks/seedstyle.py: the tutorial-style baseline
from machine import machine

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Run:
    contender: str
    repeat: int
    budget_s: float
    timeline: list[tuple[float, float, int]] = field(default_factory=list)  # (s, val acc, trial)
    trials: int = 0
    epochs: int = 0
    params: list[dict] = field(default_factory=list)  # of each trial, in order
    load_1min: list[float] = field(default_factory=list)  # the machine's 1-min load average before, after

    def time_to(self, target: float) -> float | None:
        return next((t for t, acc, _ in self.timeline if acc >= target and t <= self.budget_s), None)

    def best_in_budget(self) -> float:
        return self.best_within(self.budget_s)

    def best_within(self, seconds: float) -> float:
        return max((acc for t, acc, _ in self.timeline if t <= min(seconds, self.budget_s)), default=0.0)


def hpsearch_run(cfg: StudyConfig, data_dir: str, seed: int, budget: float, workdir: Path) -> Run:
    run = Run("hpsearch", seed, budget)
    start = time.perf_counter()

    class Timeline(Display):
        """The worker's own display, quiet, noting every epoch's validation accuracy."""

        def progress(self, p: Progress) -> None:
            run.timeline.append((time.perf_counter() - start, p.val_accuracy, p.trial))
            run.epochs += 1
            super().progress(p)

    cfg = cfg.model_copy(update={"sampler": cfg.sampler.model_copy(update={"seed": seed})})
    url = f"sqlite:///{workdir / f'hpsearch-{seed}.db'}"
    # `timeout` is checked between trials, so the last trial may overrun: epochs after the budget
    # are not counted (Run.time_to / best_in_budget), as for the seed-style loop.
    summary = run_worker(WorkerOptions(cfg=cfg, storage_url=url, data_dir=data_dir, device="cpu", timeout=budget),
                         Timeline(Console(file=io.StringIO()), live=False))
    run.trials = summary.trials_run
    study = optuna.load_study(study_name=cfg.study.name, storage=url)
    run.params = [t.params for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)]
    return run


def seed_style_trial(data: SearchData, hp: HParams, training: TrainingConfig, seed: int,
                     deadline: float) -> Iterator[tuple[float, float]]:
    """One trial of the tutorial loop (`seedstyle.py`), ReduceLROnPlateau as in the seed document,
    no early stopping: yields (val loss, val accuracy) after every epoch, up to `max_epochs` or
    until `time.perf_counter()` passes `deadline` (the run's budget is spent)."""
    device = torch.device("cpu")
    crop = crop_size(data.image_shape, training.crop_margin)
    torch.manual_seed(seed)
    spec = ModelSpec(data.image_shape[0], data.num_classes, crop, hp.conv1_channels, hp.conv2_channels, hp.dropout)
    model = seedstyle.tutorial_cnn(spec).to(device)
    optimizer = seedstyle.tutorial_optimizer(hp, model.parameters())
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=training.plateau_factor, patience=training.plateau_patience)
    train_loader, val_loader = seedstyle.loaders(data.train, data.val, data.normalizer, crop, hp.batch_size)
    for _ in range(training.max_epochs):
        seedstyle.train_epoch(model, optimizer, train_loader, device)
        val_loss, val_acc = seedstyle.evaluate(model, val_loader, device)
        scheduler.step(val_loss)
        yield val_loss, val_acc
        if time.perf_counter() >= deadline:
            return


def random_seed_style_run(cfg: StudyConfig, data_dir: str, seed: int, budget: float) -> Run:
    run = Run("random, seed-style", seed, budget)
    start = time.perf_counter()
    data = load_search_data(cfg.data, data_dir, torch.device("cpu"))
    # An in-memory study only to draw from the same space. `make_sampler` derives the seed as it
    # does for hpsearch's TPE, whose first `n_startup_trials` draws come from a RandomSampler with
    # that seed: both contenders try the same first configurations (a paired comparison), and
    # then hpsearch models while this one keeps drawing at random.
    sampler = make_sampler(cfg.sampler.model_copy(update={"type": "random", "seed": seed}))
    sampler_study = optuna.create_study(sampler=sampler)
    while time.perf_counter() - start < budget:
        trial = sampler_study.ask()
        hp = suggest_hparams(trial, cfg.search)
        run.params.append(dict(trial.params))
        run.trials += 1
        best = math.inf
        for val_loss, val_acc in seed_style_trial(data, hp, cfg.training, seed * 1_000_003 + trial.number,
                                                  start + budget):
            run.timeline.append((time.perf_counter() - start, val_acc, trial.number))
            run.epochs += 1
            best = min(best, val_loss) if math.isfinite(val_loss) else best
        sampler_study.tell(trial, best if math.isfinite(best) else None,
                           state=None if math.isfinite(best) else optuna.trial.TrialState.FAIL)
    return run


def summarize(runs: list[Run], contender: str, target: float, budget: float) -> dict:
    mine = [r for r in runs if r.contender == contender]
    times = [r.time_to(target) for r in mine]
    # A miss is "> budget": as a lower bound it still orders correctly in the median.
    censored = [t if t is not None else math.inf for t in times]
    med = statistics.median(censored)
    return dict(
        contender=contender,
        time_to_target_s=times,
        median_time_to_target_s=None if math.isinf(med) else med,
        reached=sum(t is not None for t in times),
        best_in_budget=[r.best_in_budget() for r in mine],
        median_best_in_budget=statistics.median(r.best_in_budget() for r in mine),
        trials=[r.trials for r in mine],
        epochs=[r.epochs for r in mine],
        budget_s=budget,
    )


def _fmt_s(t: float | None, budget: float) -> str:
    return f"> {budget:.0f}" if t is None else f"{t:.1f}"


def report(runs: list[Run], targets: list[float], budget: float) -> list[dict]:
    """Print the table for each target; the first is the headline. Returns the same as data.
    The first contender (hpsearch) is compared with the fastest of the others."""
    contenders = list(dict.fromkeys(r.contender for r in runs))
    repeats = len([r for r in runs if r.contender == contenders[0]])
    out = []
    for target in targets:
        rows = [summarize(runs, c, target, budget) for c in contenders]
        width = max(22, *(len(c) + 2 for c in contenders))
        print()
        print(f"{'contender':<{width}}{'to ' + format(target, '.1%') + ' (median s)':>24}{'reached':>9}"
              f"{'best in ' + format(budget, '.0f') + ' s':>16}{'trials':>14}")
        for row in rows:
            print(f"{row['contender']:<{width}}{_fmt_s(row['median_time_to_target_s'], budget):>24}"
                  f"{row['reached']:>6}/{repeats}{row['median_best_in_budget']:>16.2%}"
                  f"{'/'.join(map(str, row['trials'])):>14}")
        # A peer that missed counts as the budget: the ratio is then a lower bound.
        hp_t = rows[0]["median_time_to_target_s"]
        peer_t = min((r["median_time_to_target_s"] for r in rows[1:]), key=lambda t: math.inf if t is None else t)
        ratio = None
        if hp_t is not None:
            ratio = (peer_t if peer_t is not None else budget) / hp_t
            print(f"{contenders[0]} is {'> ' if peer_t is None else ''}{ratio:.1f}x faster to {target:.1%} "
                  f"than the fastest other (medians)")
        else:
            print(f"{contenders[0]} did not reach {target:.1%} within {budget:.0f} s in most repeats")
        out.append(dict(target=target, speedup=ratio, speedup_is_lower_bound=peer_t is None and ratio is not None,
                        summary=rows))
    return out


def reprinted(ap: argparse.ArgumentParser, args: argparse.Namespace) -> bool:
    """`--report FILE`: the tables of a saved run printed again (True: nothing to run). Otherwise
    the runs need `--data-dir`."""
    if args.report is not None:
        saved = json.loads(args.report.read_text())
        report([Run(**r) for r in saved["runs"]], args.targets, saved["budget_s"])
        return True
    if args.data_dir is None:
        ap.error("--data-dir is required (unless --report)")
    return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", help="folder of IDX files (e.g. the MNIST test set)")
    ap.add_argument("--study", type=Path, default=REPO / "studies" / "mnist-idx.toml",
                    help="the study file hpsearch runs and whose search space both contenders use")
    ap.add_argument("--targets", type=float, nargs="+", default=[0.985, 0.99, 0.992],
                    help="validation accuracies to time; the first is the headline")
    ap.add_argument("--budget", type=float, default=180.0, help="seconds per run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="one short repeat: checks the script runs")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--report", type=Path, help="print the tables of a saved --json file again (no runs)")
    args = ap.parse_args()
    if reprinted(ap, args):
        return
    if args.quick:
        args.budget, args.repeats = 10.0, 1
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    cfg = load_config(args.study)
    target = args.targets[0]
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="hpsearch-bench-") as tmp:
        for rep in range(args.repeats):
            order = ["hpsearch", "random"] if rep % 2 == 0 else ["random", "hpsearch"]
            for who in order:
                if who == "hpsearch":
                    run = hpsearch_run(cfg, args.data_dir, rep, args.budget, Path(tmp))
                else:
                    run = random_seed_style_run(cfg, args.data_dir, rep, args.budget)
                runs.append(run)
                t = run.time_to(target)
                print(f"repeat {rep} {run.contender:<20} to {target:.1%}: {_fmt_s(t, args.budget):>7} s   "
                      f"best {run.best_in_budget():.2%}   {run.trials} trials, {run.epochs} epochs", flush=True)

    results = report(runs, args.targets, args.budget)
    if args.json:
        args.json.write_text(json.dumps(dict(
            date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            machine=machine(), threads=torch.get_num_threads(),
            study=str(args.study), budget_s=args.budget, repeats=args.repeats,
            target=target, speedup=results[0]["speedup"], summary=results[0]["summary"],
            by_target=results, runs=[asdict(r) for r in runs]), indent=2))


if __name__ == "__main__":
    main()

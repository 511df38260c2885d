"""The worker loop: join the study, take trials until the budget (or this worker's limit) is met.

Any number of workers, on any number of machines, run this against one storage. A trial is
started only while `finished + running < budget` (re-queued trials first), so the study's total
is honoured whoever runs the trials.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
import torch

from hpsearch.config import StudyConfig
from hpsearch.dashboard import save_study_note
from hpsearch.data import load_search_data
from hpsearch.errors import HpsearchError
from hpsearch.objective import Objective, TrialFailed
from hpsearch.progress import Display
from hpsearch.storage import artifact_store, open_storage, redact
from hpsearch.study import budget_state, check_split, open_study, study_deadline

ENV_DATA_DIR = "HPSEARCH_DATA_DIR"


@dataclass(frozen=True)
class WorkerOptions:
    cfg: StudyConfig
    storage_url: str
    artifacts: str | None = None
    data_dir: str | None = None
    device: str = "auto"
    n_trials: int | None = None  # this worker's own limit
    timeout: float | None = None  # this worker's own limit, seconds
    threads: int | None = None
    worker_index: int = 0


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise HpsearchError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise HpsearchError(f"--device {name}: CUDA is not available here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise HpsearchError(
                f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible"
            )
    elif device.type not in {"cpu", "mps"}:
        raise HpsearchError(f"unsupported device {name!r}; use auto, cpu, cuda or cuda:N")
    return device


def resolve_data_dir(cli_value: str | None, cfg: StudyConfig) -> Path:
    return Path(cli_value or os.environ.get(ENV_DATA_DIR) or cfg.data.root).expanduser()


@dataclass(frozen=True)
class WorkerSummary:
    trials_run: int
    stop_reason: str


def run_worker(opts: WorkerOptions, display: Display | None = None) -> WorkerSummary:
    cfg = opts.cfg
    if opts.threads is not None:
        torch.set_num_threads(opts.threads)
    device = resolve_device(opts.device)
    data_dir = resolve_data_dir(opts.data_dir, cfg)
    display = display or Display.for_terminal()

    # Data first: a missing dataset is reported before anything is written to the storage.
    display.note(f"loading {cfg.data.dataset} from {data_dir} onto {device}")
    data = load_search_data(cfg.data, data_dir, device)
    display.note(
        f"split: {len(data.train)} train / {len(data.val)} validation images "
        f"(test part held out), {data.num_classes} classes, shape {tuple(data.image_shape)}"
    )

    storage = open_storage(opts.storage_url, cfg.storage)
    study = open_study(cfg, storage, opts.worker_index, on_create=lambda s: save_study_note(s, cfg, data))
    check_split(study, data.fingerprint)
    store = artifact_store(opts.storage_url, opts.artifacts)
    display.note(f"study {study.study_name!r} on {redact(opts.storage_url)}; budget {cfg.budget.n_trials} trials")

    objective = Objective(cfg, data, device, store, on_progress=display.progress)
    deadline = study_deadline(study, cfg.budget.timeout_minutes)
    started = time.monotonic()
    mine = 0
    while True:
        budget = budget_state(study, cfg.budget.n_trials)
        if not budget.may_start:
            reason = f"study budget reached ({budget.finished} finished, {budget.running} running)"
            break
        if opts.n_trials is not None and mine >= opts.n_trials:
            reason = f"this worker's --n-trials {opts.n_trials} reached"
            break
        if opts.timeout is not None and time.monotonic() - started >= opts.timeout:
            reason = f"this worker's --timeout {opts.timeout:g}s reached"
            break
        if deadline is not None and time.time() >= deadline:
            reason = f"study timeout of {cfg.budget.timeout_minutes:g} minutes reached"
            break
        study.optimize(
            objective,
            n_trials=1,
            catch=(TrialFailed,),
            callbacks=[lambda s, t: display.trial_done(s, t, budget_state(s, cfg.budget.n_trials))],
            gc_after_trial=False,
        )
        mine += 1
    display.note(f"worker done: {mine} trial(s) run here; {reason}")
    return WorkerSummary(mine, reason)


def quiet_optuna() -> None:
    """Our display reports trials; Optuna keeps its warnings (heartbeat, storage) only."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)

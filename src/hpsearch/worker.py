"""The worker loop: join the study, take trials until the budget (or this worker's limit) is met.

Any number of workers, on any number of machines, run this against one storage. A trial is
asked for only while `finished + running < budget` (re-queued trials first), and a new trial then
claims its slot (`BudgetTally.holds_slot`) before it trains, so the study ends with exactly its budget
whoever runs the trials. When the budget
is taken but other workers' trials still run, a worker waits instead of leaving: if one of those
workers dies, its trial is re-queued and someone must be there to finish it.

A running trial holds a lease (recovery.py); stale trials (a dead worker's) are swept when the
worker starts, before every trial and while it waits. SIGTERM / Ctrl-C stop the running trial and
re-queue it (`signals.py`).
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from hpsearch.config import StudyConfig
from hpsearch.dashboard import save_study_note
from hpsearch.data import SearchData, crop_size, load_search_data
from hpsearch.errors import HpsearchError, StorageError
from hpsearch.objective import Objective, TakenOver, TrialFailed
from hpsearch.progress import Display
from hpsearch.readmemo import ReadMemo
from hpsearch.recovery import OVER_BUDGET, Lease, Sweeper, requeue
from hpsearch.signals import StopRequest
from hpsearch.storage import (RetryingStorage, StorageStopped, artifact_store, backend_name, open_storage,
                              redact)
from hpsearch.study import BudgetState, BudgetTally, check_split, open_study, study_deadline
from hpsearch.train import Interrupted
from hpsearch.writebehind import WriteBehind, flush, lost

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
    worker_index: int = 0  # distinct per worker process on a node: seeds the sampler
    finish_trial_on_signal: bool = False


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
    elif device.type == "cpu":
        if device.index not in (None, 0):
            # torch accepts "cpu:5" and runs on the one CPU device: say so instead of pretending.
            raise HpsearchError(f"--device {name}: the CPU is one device; use --device cpu (and --threads N)")
    else:
        raise HpsearchError(f"unsupported device {name!r} (hpsearch trains on CUDA or the CPU); "
                            f"use auto, cpu, cuda or cuda:N")
    return device


def resolve_data_dir(cli_value: str | None, cfg: StudyConfig) -> Path:
    return Path(cli_value or os.environ.get(ENV_DATA_DIR) or cfg.data.root).expanduser()


@dataclass(frozen=True)
class WorkerSummary:
    trials_run: int
    stop_reason: str
    signal: str | None = None  # the signal that stopped the worker, if one did


def run_worker(
    opts: WorkerOptions, display: Display | None = None, stop: StopRequest | None = None
) -> WorkerSummary:
    """Run trials until the study's budget or this worker's limits; SIGTERM/Ctrl-C stop it."""
    display = display or Display.for_terminal()
    stop = stop or StopRequest(opts.finish_trial_on_signal, opts.cfg.storage.grace_period, display.prefix)
    stop.install()
    try:
        return _run(opts, display, stop)
    finally:
        stop.restore()


def _run(opts: WorkerOptions, display: Display, stop: StopRequest) -> WorkerSummary:
    cfg = opts.cfg
    if opts.threads is not None:
        torch.set_num_threads(opts.threads)
    device = resolve_device(opts.device)
    data_dir = resolve_data_dir(opts.data_dir, cfg)

    # Data first: a missing dataset is reported before anything is written to the storage.
    display.note(f"loading {cfg.data.dataset} from {data_dir} onto {device}")
    data = load_search_data(cfg.data, data_dir, device)
    crop = crop_size(data.image_shape, cfg.training.crop_margin)  # data the CNN cannot take: refused here
    display.note(
        f"split: {len(data.train)} train / {len(data.val)} validation images "
        f"(test part held out), {data.num_classes} classes, shape {tuple(data.image_shape)}, "
        f"network input {crop[0]}x{crop[1]}"
    )
    for warning in data.class_counts.warnings:
        display.note(f"warning: {warning}")

    storage = open_worker_storage(opts.storage_url, cfg, stop)
    study = open_study(cfg, storage, opts.worker_index, on_create=lambda s: _on_create(s, cfg, data))
    check_split(study, data.fingerprint, storage)
    store = artifact_store(opts.storage_url, opts.artifacts)
    display.note(
        f"study {study.study_name!r} on {redact(opts.storage_url)}; budget {cfg.budget.n_trials} trials; "
        f"worker {opts.worker_index} on {device}, {torch.get_num_threads()} thread(s)"
    )
    objective = Objective(cfg, data, device, store, on_progress=display.progress,
                          should_stop=stop.stop_training, note=display.note, worker_index=opts.worker_index)
    try:
        summary = trial_loop(study, storage, cfg, objective, display, stop, n_trials=opts.n_trials,
                             timeout=opts.timeout)
    except BaseException:
        storage.close(flush=False)  # leaving on an error: what is queued would wait out the same error
        raise
    storage.close()  # every write sent, the connections given back
    return summary


def open_worker_storage(url: str, cfg: StudyConfig, stop: StopRequest | None = None, tell_behind: bool = True,
                        **pool: int) -> WriteBehind:
    """The storage a worker runs trials on: outages waited out (`RetryingStorage`), a read of the
    trial list repeated within a moment answered once (`ReadMemo`), a trial's writes and its tell
    sent in the background while the worker goes on (`WriteBehind`)."""
    return worker_storage(open_storage(url, cfg.storage, stop=stop, **pool), url, tell_behind)


def worker_storage(storage: RetryingStorage, url: str, tell_behind: bool = True) -> WriteBehind:
    """`storage` (opened at `url`) as a worker uses it: see `open_worker_storage`. `tell_behind`
    False (the benchmarks' baseline) has each tell wait for its trial's writes."""
    # Two writes in flight: nothing waits on them (the tell included), fewer at once leave the proxy
    # or the database to the worker's own calls, and on a database, with the worker's own thread
    # and its lease, they keep within its pool of 2 + 2 connections (`open_rdb`). (With the tell
    # waiting for a trial's last writes, 8 at once through a proxy sent them in one round trip.)
    senders = 8 if backend_name(url) == "grpc" and not tell_behind else 2
    return WriteBehind(ReadMemo(storage), senders=senders, tell_behind=tell_behind)


DATA_ATTR = "hpsearch_data"  # study user attribute: classes, their original labels, counts per part


def _on_create(study: optuna.Study, cfg: StudyConfig, data: SearchData) -> None:
    study.set_user_attr(DATA_ATTR, data.class_counts.to_dict())
    save_study_note(study, cfg, data)


def trial_loop(
    study: optuna.Study,
    storage: RetryingStorage,
    cfg: StudyConfig,
    objective: Objective,
    display: Display,
    stop: StopRequest,
    *,
    n_trials: int | None = None,
    timeout: float | None = None,
) -> WorkerSummary:
    """Trial after trial until the study's budget, its timeout, this worker's own limits
    (`n_trials`, `timeout` in seconds) or a signal: sweep stale trials, check the budget, run one
    trial, re-queue it if a signal interrupted it. Everything a worker does apart from the data and
    the model; the storage benchmark drives it with a trivial objective (benchmarks/scaling.py)."""
    sweeper = Sweeper(study, storage, cfg.storage.grace_period, min_interval=cfg.storage.heartbeat_interval,
                      max_retry=cfg.storage.max_retry)
    tally = BudgetTally()  # the budget count and the slot check without walking every trial each time
    slot = _Slot(objective, storage, study, cfg, tally)
    sweeper.sweep()  # a search whose only worker died recovers as soon as any worker comes back
    deadline = study_deadline(study, cfg.budget.timeout_minutes)
    poll_s = min(cfg.storage.heartbeat_interval, 5)
    started = time.monotonic()
    mine = 0
    outside = 0  # errors in a row before any trial's objective ran (a broken sampler, say)
    waiting = False
    looked_done = False
    after_last: BudgetState | None = None
    try:
        while True:
            if stop.requested:
                reason = f"stopped by {stop.signal_name}"
                break
            if n_trials is not None and mine >= n_trials:
                reason = f"this worker's --n-trials {n_trials} reached"
                break
            if timeout is not None and time.monotonic() - started >= timeout:
                reason = f"this worker's --timeout {timeout:g}s reached"
                break
            if deadline is not None and time.time() >= deadline:
                reason = f"study timeout of {cfg.budget.timeout_minutes:g} minutes reached"
                break
            swept = sweeper.sweep()
            swept = _refused_tells(storage, tally, display) or swept
            # The count taken just after this worker's last trial (for the display) is as current as
            # a new one, unless a sweep has failed trials since: one query less per trial.
            budget = (after_last if after_last is not None and not swept
                      else tally.state(study.get_trials(deepcopy=False), cfg.budget.n_trials))
            after_last = None
            if not budget.may_start:
                if budget.running == 0 and looked_done:
                    reason = f"study budget reached ({budget.finished} finished)"
                    break
                if budget.running == 0:
                    # Look once more after a pause: a sweep fails a dead trial and queues its copy in
                    # two writes, and between them the study looks finished.
                    looked_done = True
                    stop.wait(poll_s)
                    continue
                if not waiting:
                    display.note(
                        f"budget taken: {budget.finished} finished + {budget.running} running elsewhere; "
                        f"waiting in case one of those fails and is re-queued"
                    )
                    waiting = True
                stop.wait(poll_s)
                continue
            waiting = looked_done = False
            ended: list[FrozenTrial] = []
            objective.current = None
            try:
                study.optimize(
                    slot, n_trials=1, catch=(TrialFailed, Interrupted, OverBudget),
                    callbacks=[lambda s, t: ended.append(t)], gc_after_trial=False,
                )
            except Exception as e:
                # Optuna refusing to `tell` a trial another worker has failed meanwhile (ValueError,
                # UpdateFinishedTrialError), or anything else raised around a trial rather than in
                # it: that trial is settled, and the worker goes on. The storage gone for longer
                # than reconnect_timeout, or a stop while waiting for it, is the worker's own.
                if isinstance(e, StorageError) or _stopped_waiting(e):
                    raise
                if objective.taken_over is not None:
                    display.note(
                        f"trial {objective.taken_over} was failed by another worker while it ran here (its "
                        f"lease was late); dropped here, its re-queued copy resumes from its checkpoint"
                    )
                    objective.taken_over = None
                    continue
                if objective.current is None:
                    outside += 1
                    if outside >= MAX_ERRORS_OUTSIDE_TRIALS:
                        raise HpsearchError(
                            f"Optuna failed {outside} times in a row before a trial could start, lately "
                            f"with {_one_line(e)}; this worker stops (run with --debug for the traceback)"
                        ) from e
                    display.note(f"no trial started: {_one_line(e)}; trying again")
                    continue
                display.note(settle(study, storage, objective.current, e))
                outside = 0
                mine += 1
                continue
            outside = 0
            trial = ended[-1]
            if OVER_BUDGET in trial.system_attrs:
                continue  # another worker took the last slot first: this trial never ran
            mine += 1
            if trial.state == TrialState.FAIL and objective.interrupted == trial.number:
                requeue(study, trial)
                display.note(f"trial {trial.number} {trial.user_attrs.get('stop_reason', 'stopped')}; re-queued")
            after_last = tally.state(study.get_trials(deepcopy=False), cfg.budget.n_trials)
            display.trial_done(study, trial, after_last)
    except Exception as e:
        # A stop during a storage outage: the wait ended at once; the running trial, if any, is
        # left RUNNING and re-queued by another worker once its lease expires. (Optuna may wrap
        # the StorageStopped in an error of its own while it tries to record the failed trial.)
        if not _stopped_waiting(e):
            raise
        reason = f"stopped by {stop.signal_name} while waiting for the storage"
    flush(storage)  # the last trial's writes and its tell land before the worker leaves
    _refused_tells(storage, tally, display)
    display.note(f"worker done: {mine} trial(s) run here; {reason}")
    return WorkerSummary(mine, reason, stop.signal_name if stop.requested else None)


def _refused_tells(storage: RetryingStorage, tally: BudgetTally, display: Display) -> bool:
    """Note the tells sent behind (writebehind.py) that the storage refused since the last look:
    the trial was finished elsewhere meanwhile, and this worker's budget count, which took it as
    told, starts afresh. The storage gone for good is the worker's end, as anywhere else; a tell
    cut short by a stop while the storage was away leaves its trial to the sweep, as a stop does
    with a running trial then."""
    refused = lost(storage)
    for x in refused:
        if _stopped_waiting(x.error):
            continue  # a stop while the storage was away: the trial stays RUNNING, re-queued once its lease lapses
        if isinstance(x.error, StorageError):
            raise x.error
        display.note(f"trial {x.number} was finished elsewhere before its {x.state.name.lower()} result "
                     f"was recorded here ({_one_line(x.error)}); it counts as stored there")
    if refused:
        tally.reset()
    return bool(refused)


def _stopped_waiting(e: BaseException) -> bool:
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, StorageStopped):
            return True
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return False


class OverBudget(Exception):
    """The trial just created is past the study's budget: another worker took the last slot."""


class _Slot:
    """The objective as the worker runs it: hold a lease on the trial while it runs, and first
    claim its slot of the budget (`BudgetTally.holds_slot`); a trial past the budget is marked and
    failed at once, before any training, and does not count."""

    def __init__(self, objective: Objective, storage: RetryingStorage, study: optuna.Study,
                 cfg: StudyConfig, tally: BudgetTally) -> None:
        self.objective = objective
        self.tally = tally
        self.storage = storage
        self.study = study
        self.cfg = cfg
        self.study_id = storage.get_study_id_from_name(study.study_name)

    def __call__(self, trial: optuna.Trial) -> float:
        tid = self.storage.get_trial_id_from_study_id_trial_number(self.study_id, trial.number)
        lease = Lease(self.storage, tid, self.cfg.storage.heartbeat_interval).start()
        try:
            trials = self.storage.get_all_trials(self.study_id, deepcopy=False)
            if not self.tally.holds_slot(trials, trial.number, self.cfg.budget.n_trials):
                self.storage.set_trial_system_attr(tid, OVER_BUDGET, True)
                raise OverBudget(f"trial {trial.number} is past the budget of {self.cfg.budget.n_trials}")
            return self.objective(trial)
        finally:
            lease.stop()


MAX_ERRORS_OUTSIDE_TRIALS = 3


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())[:300]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def settle(study: optuna.Study, storage: RetryingStorage, number: int, e: BaseException) -> str:
    """After an error Optuna raised around trial `number` (while recording it, say): fail the trial
    with the reason if it is still RUNNING, so it neither waits for a heartbeat sweep nor counts
    as running. Returns the line for the display."""
    study_id = storage.get_study_id_from_name(study.study_name)
    trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, number)
    trial = storage.get_trial(trial_id)  # this trial as stored now (a read of the list may be a memo)
    if trial.state.is_finished():
        return (f"trial {number} was recorded {trial.state.name.lower()}; Optuna then raised "
                f"{_one_line(e)}; going on")
    reason = f"failed: {_one_line(e)}"
    try:
        storage.set_trial_user_attr(trial_id, "stop_reason", reason)
        study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
    except optuna.exceptions.UpdateFinishedTrialError:  # another worker's sweep got there first
        return f"trial {number} was finished elsewhere after Optuna raised {_one_line(e)}; going on"
    return f"trial {number} {reason}; going on with the next trial"


class _OwnFailures(logging.Filter):
    """Optuna logs every failed trial with a traceback; for the failures hpsearch expects and
    reports itself (a signal, out of memory, a trial taken over) that is noise."""

    OURS = tuple(f"{cls.__name__}(" for cls in (Interrupted, TrialFailed, TakenOver, OverBudget, StorageStopped))
    NUMBER = re.compile(r"^Trial (\d+) failed with (parameters|value)")

    def __init__(self) -> None:
        super().__init__()
        self._dropped: set[str] = set()  # Optuna follows the message with "failed with value"

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        m = self.NUMBER.match(message)
        if m is None:
            return True
        if m.group(2) == "parameters" and any(tag in message for tag in self.OURS):
            self._dropped.add(m.group(1))
            return False
        if m.group(2) == "value" and m.group(1) in self._dropped:
            self._dropped.discard(m.group(1))
            return False
        return True


def quiet_optuna() -> None:
    """Our display reports trials; Optuna keeps its warnings (heartbeat, storage) only."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    optimize_log = logging.getLogger("optuna.study._optimize")
    if not any(isinstance(f, _OwnFailures) for f in optimize_log.filters):
        optimize_log.addFilter(_OwnFailures())

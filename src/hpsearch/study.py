"""The Optuna study: created once from a study file, joined by every worker, and its budget."""

from __future__ import annotations

import socket
import time
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

import optuna
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState

from hpsearch import __version__, claims
from hpsearch.config import PrunerConfig, SamplerConfig, StudyConfig
from hpsearch.errors import StorageError
from hpsearch.pruning import MedianPruner
from hpsearch.recovery import OVER_BUDGET
from hpsearch.storage import study_names
from hpsearch.window import HistoryWindowSampler

OBJECTIVE_NAME = "validation loss"
ATTR = "hpsearch"  # the study user attribute that records how the study was made


def sampler_seed(cfg: SamplerConfig, worker_index: int = 0) -> int | None:
    """The seed this worker's sampler gets from the study file's `[sampler] seed`."""
    if cfg.seed is None:
        return None
    # Workers must not share a seed, or they would propose the same points. Mixing in the host
    # keeps one machine's run reproducible while different nodes still differ.
    return (cfg.seed + zlib.crc32(socket.gethostname().encode()) + 7919 * worker_index) % 2**32


def make_sampler(cfg: SamplerConfig, worker_index: int = 0,
                 storage: BaseStorage | None = None) -> optuna.samplers.BaseSampler:
    """The study's sampler; with `storage` (the study's) TPE is asked on a window of at most
    `cfg.history` finished trials and samples ahead from `cfg.sample_ahead_from` (window.py), on
    the whole study and never ahead without it."""
    seed = sampler_seed(cfg, worker_index)
    if cfg.type == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    tpe = _tpe(cfg, seed)
    if storage is None or (cfg.history == 0 and cfg.sample_ahead_from == 0):
        return tpe
    # The sampler ahead runs in its own thread while `tpe` may sample: an instance of its own,
    # with a seed of its own (a seeded study stays reproducible, and differs from `tpe`'s draws).
    ahead = _tpe(cfg, None if seed is None else (seed + 1) % 2**32) if cfg.sample_ahead_from else None
    return HistoryWindowSampler(tpe, cfg.history, storage, ahead=ahead, ahead_from=cfg.sample_ahead_from)


def _tpe(cfg: SamplerConfig, seed: int | None) -> optuna.samplers.TPESampler:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            seed=seed,
            n_startup_trials=cfg.n_startup_trials,
            multivariate=cfg.multivariate,
            group=cfg.multivariate,  # momentum exists only for SGD: a conditional space
            constant_liar=cfg.constant_liar,
        )


def make_pruner(cfg: PrunerConfig, max_epochs: int) -> optuna.pruners.BasePruner:
    if cfg.type == "median":
        # Optuna's MedianPruner decisions, without walking the whole study at every report.
        return MedianPruner(n_startup_trials=cfg.n_startup_trials, n_warmup_steps=cfg.n_warmup_steps)
    if cfg.type == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=cfg.min_resource, max_resource=max_epochs, reduction_factor=cfg.reduction_factor
        )
    return optuna.pruners.NopPruner()


def open_study(
    cfg: StudyConfig,
    storage: BaseStorage,
    worker_index: int = 0,
    *,
    on_create: Callable[[optuna.Study], None] | None = None,
) -> optuna.Study:
    """Create the study if missing (safe when several workers start at once), else join it.

    A study made from a different search (data, space or training changed) is refused: its
    trials would not be comparable. The budget may change freely. `on_create` runs once the new
    study is recorded (the worker writes the dashboard note there).
    """
    study = optuna.create_study(
        study_name=cfg.study.name,
        storage=storage,
        sampler=make_sampler(cfg.sampler, worker_index, storage),
        pruner=make_pruner(cfg.pruner, cfg.training.max_epochs),
        direction="minimize",
        load_if_exists=True,
    )
    fingerprint = cfg.fingerprint()
    meta = study.user_attrs.get(ATTR)
    if meta is None:
        # Workers with different study files may start together on a new study: the claim lets
        # exactly one fingerprint in (claims.py); everyone else compares against that one.
        key = claims.StudyKey.of(storage, study.study_name)
        won = claims.claim(storage, key, claims.FINGERPRINT, 1,
                           {"fingerprint": fingerprint, "source": cfg.source})
        if not won:
            first = claims.claims(storage, key, claims.FINGERPRINT)[0].data
            _refuse_other_file(cfg, first.get("fingerprint"), first.get("source"))
        meta = {
            "fingerprint": fingerprint,
            "config": cfg.model_dump(mode="json"),
            "source": cfg.source,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "created_by": socket.gethostname(),
            "version": __version__,
        }
        # A loser with the same file writes the same record (the winner may not have yet); only
        # the winner writes the dashboard note.
        study.set_user_attr(ATTR, meta)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([OBJECTIVE_NAME])
        if won and on_create is not None:
            on_create(study)
    else:
        _refuse_other_file(cfg, meta.get("fingerprint"), meta.get("source"))
    return study


def _refuse_other_file(cfg: StudyConfig, fingerprint: str | None, source: str | None) -> None:
    if fingerprint != cfg.fingerprint():
        raise StorageError(
            f"study {cfg.study.name!r} in this storage was made from a different study file "
            f"(fingerprint {fingerprint} from {source!r}, this file gives "
            f"{cfg.fingerprint()}); give the study a new [study] name, or use another --storage"
        )


def load_study(name: str, storage: BaseStorage) -> optuna.Study:
    """An existing study by name; the error lists the studies that exist."""
    names = study_names(storage)
    if name not in names:
        have = ", ".join(names) if names else "none yet"
        raise StorageError(f"no study named {name!r} in this storage (studies: {have})")
    return optuna.load_study(study_name=name, storage=storage)


def check_split(study: optuna.Study, fingerprint: str, storage: BaseStorage | None = None) -> None:
    """Every worker must train on the same split; the first one to arrive records it. With the
    `storage`, "the first" is a claim (claims.py): of workers with different data starting
    together, exactly one split gets in."""
    key = "split_fingerprint"
    stored = study.user_attrs.get(key)
    if stored is None and storage is not None:
        study_key = claims.StudyKey.of(storage, study.study_name)
        if not claims.claim(storage, study_key, claims.SPLIT, 1, {"fingerprint": fingerprint}):
            stored = claims.claims(storage, study_key, claims.SPLIT)[0].data.get("fingerprint")
    if stored is not None and stored != fingerprint:
        raise StorageError(
            f"this worker's data split (fingerprint {fingerprint}) differs from the study's "
            f"({stored}): point --data-dir at the same files the other workers use"
        )
    if key not in study.user_attrs:
        study.set_user_attr(key, fingerprint)


@dataclass(frozen=True)
class BudgetState:
    budget: int
    complete: int
    pruned: int
    failed: int  # failed and not re-queued: they used up their slot
    running: int
    waiting: int  # re-queued trials: they run before any new one, within the budget
    best: float | None = None  # the lowest value of a complete trial (the study minimizes)

    @property
    def finished(self) -> int:
        return self.complete + self.pruned + self.failed

    @property
    def may_start(self) -> bool:
        """Start a trial if a re-queued one waits, or if finished + running leave room."""
        return self.waiting > 0 or self.finished + self.running < self.budget


def is_retry(t: FrozenTrial) -> bool:
    """A re-queued copy: it re-runs its source's slot instead of taking a new one."""
    return "retry_history" in t.system_attrs


def counts(t: FrozenTrial) -> bool:
    """Whether a trial can hold a slot of the budget (over-budget trials never do)."""
    return OVER_BUDGET not in t.system_attrs


class BudgetTally:
    """The budget count and the slot check of one study, kept up to date trial by trial.

    Both are questions about every trial of the study, asked two or three times per trial by every
    worker: walked in full, they cost 23-25 ms each at 10,000 trials. But a finished trial never
    changes again (Optuna refuses to update it) and trials are numbered 0, 1, 2, ... as the storage
    creates them, so the run of finished trials from trial 0 (the prefix) is tallied once, and each
    question walks only the trials after it: the running ones and those that finished after the
    oldest running one started. Pass the study's trials in number order
    (`get_trials(deepcopy=False)`, as every Optuna storage returns them); a list with gaps in its
    numbers is tallied afresh each time.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget the tally: the next question walks every trial (after a trial this worker had
        read as told turned out to be finished elsewhere; see writebehind.lost)."""
        self._n = 0  # trials 0 .. _n-1: finished, tallied below
        self._states = {s: 0 for s in TrialState}  # the prefix's trials that count, by state
        self._failed: set[int] = set()  # the prefix's failed trials that count, unless re-queued
        self._retried: set[int] = set()  # trial numbers the prefix's copies re-run
        self._new_before = [0]  # [k]: new trials (not copies) that count among trials 0 .. k-1
        self._best: float | None = None  # the prefix's lowest complete value

    def _advance(self, trials: list[FrozenTrial]) -> None:
        if (trials and trials[-1].number != len(trials) - 1) or len(trials) < self._n:
            self.reset()  # not numbered 0..N-1 (no prefix), or not this study's trials
            return
        while self._n < len(trials) and trials[self._n].state.is_finished():
            t = trials[self._n]
            self._retried.update(t.system_attrs.get("retry_history", ()))
            if counts(t):
                self._states[t.state] += 1
                if t.state == TrialState.FAIL:
                    self._failed.add(t.number)
            self._new_before.append(self._new_before[-1] + (counts(t) and not is_retry(t)))
            self._best = _lower(self._best, t)
            self._n += 1

    def state(self, trials: list[FrozenTrial], budget: int) -> BudgetState:
        """The budget's state: finished trials that count (complete, pruned, failed and not
        re-queued), running and waiting ones."""
        self._advance(trials)
        tail = trials[self._n:]  # all of them when the list has gaps (_advance kept no prefix)
        retried = self._retried | {n for t in tail for n in t.system_attrs.get("retry_history", ())}
        count = dict(self._states)
        count[TrialState.FAIL] -= len(self._failed & retried)
        best = self._best
        for t in tail:
            best = _lower(best, t)
            if counts(t) and not (t.state == TrialState.FAIL and t.number in retried):
                count[t.state] += 1
        return BudgetState(budget=budget, complete=count[TrialState.COMPLETE], pruned=count[TrialState.PRUNED],
                           failed=count[TrialState.FAIL], running=count[TrialState.RUNNING],
                           waiting=count[TrialState.WAITING], best=best)

    def holds_slot(self, trials: list[FrozenTrial], number: int, budget: int) -> bool:
        """Whether trial `number` holds one of the study's `budget` slots.

        The storage numbers trials in the order it creates them, one at a time (RDBStorage locks
        the study row to do so, and the gRPC proxy writes through it), so numbers are a total order
        that every worker sees alike. A new trial (not a re-queued copy) holds a slot if fewer than
        `budget` new trials came before it; later ones are over the budget, whoever checks first. A
        copy re-runs the slot of the trial its retry chain started from, if that one held one.
        """
        self._advance(trials)
        tail = trials[self._n:]
        by_number = {t.number: t for t in tail}
        me = trials[number] if self._n > number else by_number.get(number)
        if me is not None and is_retry(me):
            number = me.system_attrs["retry_history"][0]
            me = trials[number] if self._n > number else by_number.get(number)
        if me is None or not counts(me):
            return False
        if number <= self._n:
            before = self._new_before[number]
        else:
            before = self._new_before[self._n] + sum(
                1 for t in tail if t.number < number and not is_retry(t) and counts(t))
        return before < budget


def _lower(best: float | None, t: FrozenTrial) -> float | None:
    if t.state != TrialState.COMPLETE or t.value is None:
        return best
    return t.value if best is None or t.value < best else best


def budget_state(study: optuna.Study, budget: int) -> BudgetState:
    """`BudgetTally.state` for one question (a fresh tally): `hpsearch status`, the report."""
    return BudgetTally().state(study.get_trials(deepcopy=False), budget)


def study_deadline(study: optuna.Study, timeout_minutes: float | None) -> float | None:
    """Epoch seconds after which no new trial starts, counted from the study's creation."""
    if timeout_minutes is None:
        return None
    created = study.user_attrs.get(ATTR, {}).get("created_at")
    start = datetime.fromisoformat(created).timestamp() if created else time.time()
    return start + 60 * timeout_minutes

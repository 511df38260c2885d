"""Quick unit tests of the worker's bookkeeping, on real storages and real (tiny) training: the
budget, the study's deadline, the storage retry, and the resume fall-backs. Part of the fast tier
(`uv run pytest -m fast`)."""

from __future__ import annotations

import dataclasses
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import optuna
import pytest
import torch
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from conftest import write_study
from hpsearch.checkpoint import EPOCH_CHECKPOINT
from hpsearch.checkpoint import _write as write_payload
from hpsearch.config import load_config
from hpsearch.data import DeviceSplit, load_search_data
from hpsearch.model import CNN, ModelSpec
from hpsearch.objective import Objective
from hpsearch.pruning import MedianPruner
from hpsearch.recovery import requeue
from hpsearch.storage import artifact_store, open_storage
from hpsearch.study import ATTR, budget_state, open_study, study_deadline
from hpsearch.train import HParams, Precision, TrainState, fit

pytestmark = [pytest.mark.fast, pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning"),
              pytest.mark.filterwarnings("ignore:Fixed parameter"),
              pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed")]


@pytest.fixture
def study_and_storage(tmp_path: Path):
    cfg = load_config(write_study(tmp_path / "u.toml", "units", n_trials=6, max_epochs=1))
    url = f"sqlite:///{tmp_path / 'hpsearch.db'}"
    storage = open_storage(url, cfg.storage)
    return cfg, url, storage, open_study(cfg, storage)


def _finished(study: optuna.Study, state: TrialState) -> None:
    value = 0.5 if state == TrialState.COMPLETE else None
    study.add_trial(create_trial(state=state, value=value, params={"x": 0.1},
                                 distributions={"x": FloatDistribution(0, 1)},
                                 intermediate_values={1: 0.6} if state == TrialState.PRUNED else None))


def test_the_budget_counts_finished_and_running_trials_not_failed_ones_that_were_requeued(study_and_storage):
    _, _, _, study = study_and_storage
    for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL):
        _finished(study, state)
    running = study.ask()
    stopped = study.ask()
    study.tell(stopped, state=TrialState.FAIL)
    requeue(study, study.get_trials(deepcopy=False)[stopped.number])  # its copy waits
    b = budget_state(study, budget=6)
    assert (b.complete, b.pruned, b.failed, b.running, b.waiting) == (1, 1, 1, 1, 1)
    assert b.finished == 3 and b.may_start  # 3 finished + 1 running < 6
    no_room = budget_state(study, budget=4)  # 3 finished + 1 running: no room for a new trial,
    assert no_room.waiting == 1 and no_room.may_start  # but a re-queued copy runs within the budget
    study.tell(running, 0.4)
    study.tell(study.ask(), 0.3)  # the waiting copy runs and completes
    full = budget_state(study, budget=5)
    assert (full.finished, full.running, full.waiting, full.may_start) == (5, 0, 0, False)


def test_the_deadline_counts_from_the_studys_creation(study_and_storage):
    _, _, _, study = study_and_storage
    created = datetime.fromisoformat(study.user_attrs[ATTR]["created_at"]).timestamp()
    assert study_deadline(study, None) is None
    assert study_deadline(study, 2.5) == pytest.approx(created + 150)
    earlier = {**study.user_attrs[ATTR],
               "created_at": (datetime.now(timezone.utc) - timedelta(hours=1)).isoformat(timespec="seconds")}
    study.set_user_attr(ATTR, earlier)
    assert study_deadline(study, 30) < time.time()  # a worker joining late starts nothing


# --- resume fall-backs: a re-queued trial whose checkpoint cannot be used starts from epoch 1 ----


@pytest.fixture(scope="module")
def small_data(mnist_dir: Path):
    from hpsearch.config import DataConfig

    data = load_search_data(DataConfig(dataset="idx"), mnist_dir, torch.device("cpu"))
    return dataclasses.replace(data, train=DeviceSplit(data.train.images[:600], data.train.labels[:600]),
                               val=DeviceSplit(data.val.images[:300], data.val.labels[:300]))


FIXED = dict(lr=3e-3, weight_decay=1e-5, optimizer="adam", conv1_channels=4, conv2_channels=8, dropout=0.1)


@pytest.mark.parametrize("damage", ["missing", "truncated", "other hyperparameters"])
def test_an_unusable_checkpoint_is_skipped_with_the_reason(study_and_storage, small_data, damage):
    cfg, url, storage, study = study_and_storage
    store = artifact_store(url)
    study.enqueue_trial(FIXED)
    first = study.ask()
    artifact = "resume-trial0-epoch1-test.pt"
    if damage != "missing":
        # A real epoch checkpoint, of a run with another learning rate.
        hp = HParams(**{**FIXED, "lr": 1e-2, "momentum": 0.0, "batch_size": 128})
        states: list[TrainState] = []
        spec = ModelSpec(1, 10, (24, 24), hp.conv1_channels, hp.conv2_channels, hp.dropout)
        fit(CNN(spec), hp, small_data.train, small_data.val, small_data.normalizer, (24, 24), max_epochs=2,
            patience=5, plateau_factor=0.5, plateau_patience=1, eval_batch_size=512,
            precision=Precision(False, False), seed=1, on_checkpoint=states.append)
        write_payload(store, artifact, {"format": 1, "kind": "resume", "hparams": hp.to_dict(), "seed": 1,
                                        "state": states[0].to_dict()})
        if damage == "truncated":
            path = Path(url.removeprefix("sqlite:///")).with_name("hpsearch-artifacts") / artifact
            path.write_bytes(path.read_bytes()[:100])
    first.set_user_attr(EPOCH_CHECKPOINT, {"artifact_id": artifact, "epoch": 1, "trial": first.number})
    study.tell(first, state=TrialState.FAIL)
    requeue(study, study.get_trials(deepcopy=False)[first.number])

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        objective = Objective(cfg, small_data, torch.device("cpu"), store)
        study.optimize(objective, n_trials=1)  # takes the re-queued copy
    finally:
        torch.set_num_threads(threads)
    copy = study.get_trials(deepcopy=False)[-1]
    assert copy.state == TrialState.COMPLETE, copy.user_attrs.get("stop_reason")
    skipped = copy.user_attrs["resume_skipped"]
    assert ("other hyperparameters" in skipped) if damage == "other hyperparameters" else ("unusable" in skipped)
    assert copy.user_attrs["epochs_trained"] == copy.user_attrs["epochs"] == 1  # from epoch 1
    assert "resumed_from_trial" not in copy.user_attrs


class PrefetchSpy(MedianPruner):
    """hpsearch's median pruner, noting the epochs the objective asked it to read ahead for."""

    def __init__(self) -> None:
        super().__init__(n_startup_trials=1, n_warmup_steps=0)
        self.steps: list[int] = []

    def prefetch(self, study: optuna.Study, step: int) -> None:
        self.steps.append(step)
        super().prefetch(study, step)


def test_the_objective_starts_the_pruners_read_as_each_epoch_starts(tmp_path, small_data):
    cfg = load_config(write_study(tmp_path / "p.toml", "prefetch", n_trials=2, max_epochs=3))
    url = f"sqlite:///{tmp_path / 'hpsearch.db'}"
    study = open_study(cfg, open_storage(url, cfg.storage))
    study.pruner = spy = PrefetchSpy()
    study.enqueue_trial(FIXED)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        study.optimize(Objective(cfg, small_data, torch.device("cpu"), artifact_store(url)), n_trials=1)
    finally:
        torch.set_num_threads(threads)
    trial = study.get_trials(deepcopy=False)[-1]
    assert trial.state == TrialState.COMPLETE, trial.user_attrs.get("stop_reason")
    assert spy.steps == sorted(trial.intermediate_values) == [1, 2, 3]

"""A trial that fails, for any reason, fails alone with its reason stored; the worker goes on.

Real failures, not simulated ones: a network too big to fit (rejected by the memory estimate
before anything is allocated), the CPU allocator running out (the worker runs under an address
space limit), an error torch raises for an impossible value, a learning rate that diverges, and
Optuna refusing to record a trial another process has failed meanwhile.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import resource
import subprocess
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState
from rich.console import Console

from conftest import hpsearch_cmd, write_study
from hpsearch.config import load_config
from hpsearch.data import DeviceSplit, load_search_data
from hpsearch.objective import Objective, failure_reason, is_out_of_memory
from hpsearch.progress import Display
from hpsearch.signals import StopRequest
from hpsearch.storage import artifact_store, open_storage
from hpsearch.study import open_study
from hpsearch.train import divergence
from hpsearch.worker import trial_loop, worker_storage

GOOD = dict(lr=3e-3, weight_decay=1e-5, optimizer="adam", conv1_channels=8, conv2_channels=16, dropout=0.1)


def _study_file(tmp_path: Path, n_trials: int, max_epochs: int = 2) -> Path:
    path = write_study(tmp_path / "fail.toml", "fail", n_trials=n_trials, max_epochs=max_epochs)
    path.write_text(path.read_text().replace("patience = 2", "patience = 2\neval_batch_size = 512"))
    return path


def _limit_address_space() -> None:
    # Enough for Python, torch and the data (~3.5 GB of address space here), not for a network
    # of 4,000 channels: its first batch asks the CPU allocator for 400 MB more than there is.
    limit = 4_500_000_000
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


@pytest.mark.slow
def test_a_worker_outlives_every_kind_of_trial_failure(tmp_path: Path, mnist_dir: Path) -> None:
    study_file = _study_file(tmp_path, n_trials=5)
    url = f"sqlite:///{tmp_path / 'hpsearch.db'}"
    cfg = load_config(study_file)
    study = open_study(cfg, open_storage(url, cfg.storage))
    for change in (
        dict(conv1_channels=10**11),  # the channel count: refused by the memory estimate
        dict(conv1_channels=4000),  # fits the machine, not the address-space limit: CPU out of memory
        dict(dropout=1.5),  # torch raises ValueError when the layer is built
        dict(lr=1e6),  # diverges
        {},  # and the worker still trains the next one
    ):
        study.enqueue_trial({**GOOD, **change})

    env = {k: v for k, v in os.environ.items() if not k.startswith("HPSEARCH_")}
    env.update(MALLOC_ARENA_MAX="2", PYTHONUNBUFFERED="1")
    r = subprocess.run(
        hpsearch_cmd("worker", "--study", str(study_file), "--storage", url, "--data-dir", str(mnist_dir),
                     "--device", "cpu", "--threads", "1"),
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, preexec_fn=_limit_address_space,
    )
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "Traceback" not in out and "study budget reached (5 finished)" in out, out

    trials = optuna.load_study(study_name="fail", storage=url).trials
    states = [t.state for t in trials]
    assert states == [TrialState.FAIL, TrialState.FAIL, TrialState.FAIL, TrialState.PRUNED, TrialState.COMPLETE]
    reasons = [t.user_attrs.get("stop_reason", "") for t in trials]
    assert reasons[0].startswith("does not fit in memory: needs about") and "available on cpu" in reasons[0]
    assert reasons[1].startswith("out of memory on cpu (batch_size=128)") and "can't allocate memory" in reasons[1]
    assert reasons[2] == "failed: ValueError: dropout probability has to be between 0 and 1, but got 1.5"
    assert reasons[3].startswith("diverged: validation loss") and "uniform guess" in reasons[3]
    assert "dropout probability" in trials[2].user_attrs["error"]  # the traceback's end, for the dashboard
    # Nothing was left behind: no RUNNING trial, no epoch checkpoint of a failed one.
    assert all(t.user_attrs.get("epoch_checkpoint") is None for t in trials)
    assert not list((tmp_path / "hpsearch-artifacts").glob("resume-*"))


@pytest.mark.fast
@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
@pytest.mark.parametrize("writes", ["waited", "behind"])
def test_a_trial_that_optuna_cannot_record_does_not_stop_the_worker(tmp_path: Path, mnist_dir: Path,
                                                                     writes: str) -> None:
    """Another worker fails the trial between the objective's return and Optuna's `tell`: Optuna
    raises while recording it, or, with the worker's own storage (writes and tell sent behind),
    the storage refuses the tell once it is sent. The worker notes it and takes the next trial."""
    cfg = load_config(_study_file(tmp_path, n_trials=2, max_epochs=1))
    url = f"sqlite:///{tmp_path / 'hpsearch.db'}"
    storage = open_storage(url, cfg.storage)
    if writes == "behind":
        storage = worker_storage(storage, url)
    study = open_study(cfg, storage)
    for _ in range(2):
        study.enqueue_trial(GOOD)
    data = load_search_data(cfg.data, mnist_dir, torch.device("cpu"))
    # A slice of the real images: the test is about the loop, not about how well it learns.
    data = dataclasses.replace(data, train=DeviceSplit(data.train.images[:1000], data.train.labels[:1000]),
                               val=DeviceSplit(data.val.images[:500], data.val.labels[:500]))
    elsewhere = optuna.load_study(study_name="fail", storage=url)  # another process's connection

    class FailedElsewhere(Objective):
        def __call__(self, trial: optuna.Trial) -> float:
            value = super().__call__(trial)
            elsewhere.tell(trial.number, state=TrialState.FAIL)
            return value

    log = io.StringIO()
    display = Display(Console(file=log, width=400), live=False)
    objective = FailedElsewhere(cfg, data, torch.device("cpu"), artifact_store(url))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = trial_loop(study, storage, cfg, objective, display,
                             StopRequest(False, cfg.storage.grace_period), n_trials=2)
    finally:
        torch.set_num_threads(threads)
    assert summary.trials_run == 2, log.getvalue()
    # Behind, the refusal comes at the tell if a write of the trial was refused first, else later.
    noted = log.getvalue().count("was recorded fail; Optuna then raised")
    noted += log.getvalue().count("was finished elsewhere before its complete result was recorded here")
    assert noted == 2, log.getvalue()
    assert [t.state for t in elsewhere.get_trials()] == [TrialState.FAIL, TrialState.FAIL]  # as stored


@pytest.mark.fast
def test_divergence_is_a_loss_far_above_a_uniform_guess_or_the_first_epoch() -> None:
    ln10 = math.log(10)
    assert divergence(float("nan"), 1, None, 10).startswith("validation loss is nan")
    assert divergence(float("inf"), 3, 0.4, 10) is not None
    assert divergence(91_696.0, 1, None, 10) is not None  # the lr = 1e6 run
    assert divergence(10 * ln10 + 0.01, 1, None, 10) is not None
    assert divergence(10 * ln10 - 0.01, 1, None, 10) is None  # bad, but a run can recover from it
    assert divergence(2.5, 4, 0.2, 10) is not None  # learned, then blew up past a uniform guess
    assert divergence(2.0, 4, 0.1, 10) is None  # 20x worse, but still better than a uniform guess
    assert divergence(3.0, 2, 2.9, 10) is None  # never learned: the pruner's business, not divergence
    assert divergence(0.7, 1, None, 2) is None and divergence(7.0, 1, None, 2) is not None  # ln 2 = 0.69


@pytest.mark.fast
def test_the_cpu_allocators_failure_is_out_of_memory() -> None:
    with pytest.raises(RuntimeError) as caught:
        torch.empty(2**45, dtype=torch.uint8)  # 32 TiB: the real allocator refuses
    assert is_out_of_memory(caught.value)
    reason = failure_reason(caught.value, torch.device("cpu"), 64)
    assert reason.startswith("out of memory on cpu (batch_size=64): ") and "\n" not in reason
    assert not is_out_of_memory(ValueError("dropout probability has to be between 0 and 1"))
    assert failure_reason(KeyError("lr"), torch.device("cpu"), None) == "failed: KeyError: 'lr'"

"""Two worker processes on one SQLite file share one search and finish one budget together."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from conftest import hpsearch_cmd, write_study
from hpsearch.config import load_config
from hpsearch.recovery import LEASE, OVER_BUDGET, Sweeper, trial_id
from hpsearch.storage import open_storage
from hpsearch.study import open_study

pytestmark = pytest.mark.slow


def test_two_workers_finish_one_budget_on_one_sqlite_file(tmp_path: Path, mnist_dir: Path) -> None:
    budget = 8
    study_file = write_study(tmp_path / "pair.toml", name="pair", n_trials=budget, max_epochs=2)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HPSEARCH_")}
    env.update(HPSEARCH_DATA_DIR=str(mnist_dir), PYTHONUNBUFFERED="1")
    cmd = hpsearch_cmd("worker", "--study", str(study_file), "--threads", "1", "--device", "cpu")
    procs = [subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert "Traceback" not in err and "error" not in err.lower(), err
        assert "study budget reached" in out, out

    study = optuna.load_study(study_name="pair", storage=f"sqlite:///{tmp_path / 'hpsearch.db'}")
    trials = study.trials
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    # Exactly the budget; a trial that lost the race for the last slot is refused before training.
    assert len(finished) == budget, [t.state for t in trials]
    over = [t for t in trials if OVER_BUDGET in t.system_attrs]
    assert all(t.state == TrialState.FAIL and not t.params for t in over)
    trials = [t for t in trials if t not in over]
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.FAIL)]
    assert len({t.number for t in trials}) == len(trials)
    assert len({t.user_attrs["worker"] for t in trials}) == 2  # both took part
    # Both saw the same split.
    assert len({t.user_attrs["split_fingerprint"] for t in trials}) == 1
    # Checkpoints of both workers live in the one artifact store beside the database.
    assert (tmp_path / "hpsearch-artifacts").is_dir()


def _open(path: str) -> None:
    from hpsearch.config import StorageConfig
    from hpsearch.storage import open_storage

    open_storage(f"sqlite:///{path}", StorageConfig())


def test_workers_racing_to_create_a_new_sqlite_file_all_succeed(tmp_path: Path) -> None:
    """Optuna creates its tables on first open; without the lock, racing openers failed with
    'table ... already exists' (seen in 1-2 of 4 processes per round)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    for round_ in range(3):
        path = str(tmp_path / f"race{round_}.db")
        procs = [ctx.Process(target=_open, args=(path,)) for _ in range(4)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(120)
        assert [p.exitcode for p in procs] == [0, 0, 0, 0]


@pytest.mark.fast  # in the quick tier too: a few seconds, no training
def test_a_sweep_fails_stale_trials_and_runs_at_most_once_per_interval(tmp_path: Path) -> None:
    cfg = load_config(write_study(tmp_path / "sweep.toml", "sweep", heartbeat_interval=1, grace_period=2))
    storage = open_storage(f"sqlite:///{tmp_path / 'hpsearch.db'}", cfg.storage)
    study = open_study(cfg, storage)

    def stale_trial() -> int:
        trial = study.ask()
        # One renewal of its lease, then silence: a dead worker.
        storage.set_trial_system_attr(trial_id(storage, study, trial.number), LEASE, time.time())
        return trial.number

    def state(number: int) -> TrialState:
        return study.get_trials(deepcopy=False)[number].state

    first = stale_trial()
    time.sleep(3)  # past the grace period
    sweeper = Sweeper(study, storage, cfg.storage.grace_period, min_interval=60)
    assert sweeper.sweep() is True  # the first sweep always looks
    assert state(first) == TrialState.FAIL
    assert any(t.state == TrialState.WAITING for t in study.get_trials(deepcopy=False))  # its copy

    second = stale_trial()
    time.sleep(3)
    assert sweeper.sweep() is False  # within min_interval of the last one: it does not look
    assert state(second) == TrialState.RUNNING
    sweeper.min_interval = 0
    assert sweeper.sweep() is True
    assert state(second) == TrialState.FAIL

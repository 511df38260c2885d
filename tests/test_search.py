"""A real search on the real MNIST test set: pruning, >= 97% accuracy, reloadable checkpoints."""

from __future__ import annotations

import logging
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from conftest import run_cli, write_study
from hpsearch.checkpoint import BEST_WEIGHTS, load_checkpoint
from hpsearch.config import load_config
from hpsearch.data import load_search_data
from hpsearch.progress import Display
from hpsearch.storage import artifact_store
from hpsearch.train import evaluate
from hpsearch.worker import WorkerOptions, run_worker

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory, mnist_dir: Path):
    tmp = tmp_path_factory.mktemp("search")
    cfg = load_config(write_study(tmp / "quick.toml", n_trials=8, max_epochs=4))
    url = f"sqlite:///{tmp / 'hpsearch.db'}"
    from rich.console import Console

    display = Display(Console(file=open(tmp / "log.txt", "w")), live=False)
    summary = run_worker(WorkerOptions(cfg=cfg, storage_url=url, data_dir=str(mnist_dir), device="cpu"), display)
    study = optuna.load_study(study_name=cfg.study.name, storage=url)
    return cfg, url, study, summary, tmp


def test_search_prunes_and_completes(searched) -> None:
    cfg, _, study, summary, _ = searched
    states = [t.state for t in study.trials]
    assert summary.trials_run == 8 == len(states)
    assert TrialState.COMPLETE in states and TrialState.PRUNED in states, states
    assert "budget reached" in summary.stop_reason
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED]
    assert all(t.user_attrs["epochs"] < cfg.training.max_epochs for t in pruned)
    assert all(len(t.intermediate_values) == t.user_attrs["epochs"] for t in pruned)


def test_best_trial_reaches_97_percent_and_records_its_run(searched) -> None:
    _, _, study, _, _ = searched
    best = study.best_trial
    a = best.user_attrs
    assert a["val_accuracy"] >= 0.97, a
    assert best.value == min(best.intermediate_values.values())  # the value is the best val loss
    assert a["device"] == "cpu" and a["samples_per_s"] > 0 and a["epochs"] >= a["best_epoch"] >= 1
    assert isinstance(a["seed"], int) and a["hparams"]["lr"] == best.params["lr"]


def test_checkpoint_loads_and_reproduces_the_accuracy(searched, mnist_dir: Path) -> None:
    cfg, url, study, _, _ = searched
    best = study.best_trial
    ckpt = load_checkpoint(artifact_store(url), best.user_attrs[BEST_WEIGHTS])
    data = load_search_data(cfg.data, mnist_dir, torch.device("cpu"))
    model = ckpt.build_model(torch.device("cpu"))
    ev = evaluate(model, data.val, ckpt.normalizer, 512, ckpt.crop, ckpt.precision)
    assert ev.accuracy == pytest.approx(best.user_attrs["val_accuracy"], abs=1e-9)
    assert ev.loss == pytest.approx(best.value, rel=1e-4)
    assert ckpt.epoch == best.user_attrs["best_epoch"]


def test_status_shows_states_and_the_best(searched) -> None:
    cfg, url, study, _, tmp = searched
    r = run_cli("status", "--study", str(tmp / "quick.toml"), "--storage", url, cwd=tmp)
    assert r.returncode == 0, r.stderr
    assert f"trial {study.best_trial.number}, validation loss {study.best_value:.4f}" in r.stdout
    assert "complete" in r.stdout and "pruned" in r.stdout and "budget 8/8" in r.stdout


def test_a_worker_on_a_spent_budget_runs_nothing(searched, mnist_dir: Path) -> None:
    _, url, study, _, tmp = searched
    r = run_cli("worker", "--study", str(tmp / "quick.toml"), "--storage", url,
                "--data-dir", str(mnist_dir), cwd=tmp)
    assert r.returncode == 0, r.stderr
    assert "0 trial(s) run here; study budget reached" in r.stdout
    assert len(optuna.load_study(study_name=study.study_name, storage=url).trials) == 8


def test_a_changed_search_space_is_refused(searched, mnist_dir: Path) -> None:
    _, url, _, _, tmp = searched
    changed = tmp / "changed.toml"
    changed.write_text((tmp / "quick.toml").read_text().replace("max_epochs = 4", "max_epochs = 5"))
    r = run_cli("worker", "--study", str(changed), "--storage", url, "--data-dir", str(mnist_dir), cwd=tmp)
    assert r.returncode == 2 and "different study file" in r.stderr and len(r.stderr.splitlines()) == 1


def test_diverging_trials_are_pruned_with_the_reason(tmp_path: Path, mnist_dir: Path) -> None:
    study_file = write_study(tmp_path / "div.toml", name="div", n_trials=1, max_epochs=2)
    # SGD at lr=10 with weight_decay=1 (the largest a study file allows) scales the weights by
    # about -9 per step: they overflow within the first epoch.
    study_file.write_text(
        study_file.read_text()
        .replace('optimizer = { choices = ["adam", "adamw"] }', 'optimizer = "sgd"')
        .replace("lr = { low = 1e-3, high = 1e-2, log = true }", "lr = 10.0")
        .replace("weight_decay = { low = 1e-6, high = 1e-4, log = true }", "weight_decay = 1.0")
    )
    url = f"sqlite:///{tmp_path / 'd.db'}"
    r = run_cli("worker", "--study", str(study_file), "--storage", url, "--data-dir", str(mnist_dir),
                "--device", "cpu", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    (t,) = optuna.load_study(study_name="div", storage=url).trials
    assert t.state == TrialState.PRUNED and t.user_attrs["stop_reason"].startswith("diverged:"), t.user_attrs


def test_missing_data_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    study_file = write_study(tmp_path / "q.toml")
    r = run_cli("worker", "--study", str(study_file), "--data-dir", str(tmp_path / "nowhere"), cwd=tmp_path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "does not exist" in r.stderr
    assert not (tmp_path / "hpsearch.db").exists()


@pytest.mark.parametrize("url,words", [
    ("mysql://u@h/db", "unsupported database"),
    ("not a url", "is not a URL"),
    ("postgresql+psycopg2://hpsearch:s3cret@127.0.0.1:1/nope", "cannot open storage"),
])
def test_bad_storage_is_one_line_without_the_password(tmp_path: Path, mnist_dir: Path, url, words) -> None:
    study_file = write_study(tmp_path / "q.toml")
    r = run_cli("worker", "--study", str(study_file), "--storage", url, "--data-dir", str(mnist_dir), cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "s3cret" not in r.stderr + r.stdout


def test_status_on_a_missing_storage_creates_nothing(tmp_path: Path) -> None:
    r = run_cli("status", "--study", "cnn", cwd=tmp_path)
    assert r.returncode == 2 and "no study storage" in r.stderr
    assert not (tmp_path / "hpsearch.db").exists()


def test_a_real_worker_samples_its_next_trial_while_one_trains(tmp_path: Path, mnist_dir: Path, caplog) -> None:
    """The real objective starts the sample ahead as an epoch starts (window.py): from 3 finished
    trials on, each trial after the one that began it takes it, and the search ends as usual."""
    from rich.console import Console

    cfg = load_config(write_study(tmp_path / "ahead.toml", name="ahead", n_trials=6, max_epochs=1))
    cfg = cfg.model_copy(update={"sampler": cfg.sampler.model_copy(update={"sample_ahead_from": 3})})
    url = f"sqlite:///{tmp_path / 'hpsearch.db'}"
    display = Display(Console(file=open(tmp_path / "log.txt", "w")), live=False)
    with caplog.at_level(logging.DEBUG, logger="hpsearch.window"):
        summary = run_worker(WorkerOptions(cfg=cfg, storage_url=url, data_dir=str(mnist_dir), device="cpu"), display)
    messages = [r.getMessage() for r in caplog.records]
    # trial 3 (3 finished when it was sampled) samples trial 4 while it trains, and trial 4 trial 5
    assert [m for m in messages if "sample" in m] == ["trial 4 takes the sample made ahead",
                                                       "trial 5 takes the sample made ahead"]
    study = optuna.load_study(study_name="ahead", storage=url)
    assert summary.trials_run == 6 and all(t.state.is_finished() and t.state != TrialState.FAIL for t in study.trials)
    assert all("tpe:relative_params:0" in t.system_attrs for t in study.trials[4:])

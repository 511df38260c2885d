"""The history window TPE is asked on (src/hpsearch/window.py): what it keeps, that it is kept up to
date incrementally exactly as if recomputed, that small studies sample exactly as plain TPE does,
and that beyond the window TPE sees only the window; and sampling ahead: below its threshold
nothing changes, from it each trial takes the sample made while the one before trained, with
TPE's note of it, a sample not used is dropped, and a failed one leaves the trial sampled as usual."""

from __future__ import annotations

import json
import logging
import math
import random

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.storages import InMemoryStorage
from optuna.study import StudyDirection
from optuna.trial import TrialState, create_trial

from hpsearch.config import MIN_HISTORY, load_config
from hpsearch.errors import ConfigError
from hpsearch.objective import work_ahead
from hpsearch.study import make_sampler
from hpsearch.window import KEEP_BEST, History, HistoryWindowSampler

from conftest import REPO

pytestmark = pytest.mark.fast
DIST = {"x": FloatDistribution(-5, 5)}


def trials_of(states_and_values):
    """Frozen trials numbered 0..n-1, as a storage lists them."""
    out = []
    for n, (state, value) in enumerate(states_and_values):
        t = create_trial(state=state, value=value if state == TrialState.COMPLETE else None,
                         params={"x": 0.0}, distributions=DIST)
        t.number = n  # create_trial leaves numbering to the storage; these stand for listed trials
        out.append(t)
    return out


def from_scratch(trials, size, direction):
    return [t.number for t in History(size, direction).window(trials)]


def test_a_study_within_the_window_is_shown_whole():
    trials = trials_of([(TrialState.COMPLETE, float(i)) for i in range(300)]
                       + [(TrialState.RUNNING, None)] * 3)
    assert from_scratch(trials, 300, StudyDirection.MINIMIZE) == list(range(303))


@pytest.mark.parametrize("direction", [StudyDirection.MINIMIZE, StudyDirection.MAXIMIZE])
def test_beyond_the_window_the_best_the_most_recent_and_every_unfinished_trial(direction):
    rng = random.Random(0)
    values = [rng.random() for _ in range(2000)]
    spec = [(TrialState.COMPLETE, v) if i % 3 else (TrialState.PRUNED, None) for i, v in enumerate(values)]
    spec[10] = (TrialState.RUNNING, None)  # an old trial still running
    spec[20] = (TrialState.FAIL, None)
    trials = trials_of(spec)
    shown = from_scratch(trials, 500, direction)

    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = sorted(complete, key=lambda t: t.value, reverse=direction == StudyDirection.MAXIMIZE)[:KEEP_BEST]
    assert {t.number for t in best} <= set(shown)
    assert 10 in shown and 20 not in shown
    finished_shown = [n for n in shown if trials[n].state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished_shown) == 500
    best_numbers = {t.number for t in best}
    recent = [n for n in finished_shown if n not in best_numbers]
    finished_numbers = [t.number for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    # the rest is the most recent finished trials, none skipped
    assert recent == [n for n in finished_numbers if n >= min(recent) and n not in best_numbers]
    assert shown == sorted(shown)


def test_kept_up_to_date_incrementally_exactly_as_if_recomputed():
    """Trials start, finish out of order, fail; after every step the incremental window equals
    the one computed from scratch."""
    rng = random.Random(1)
    trials: list[optuna.trial.FrozenTrial] = []
    live = History(MIN_HISTORY, StudyDirection.MINIMIZE)
    for step in range(1500):
        running = [t for t in trials if t.state == TrialState.RUNNING]
        if running and rng.random() < 0.55:
            t = rng.choice(running)  # finishes, as a storage would then list it
            t.state = rng.choice([TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL])
            if t.state == TrialState.COMPLETE:
                t.value = rng.random()
        else:
            trials += trials_of([(TrialState.RUNNING, None)])
            trials[-1].number = len(trials) - 1
        if step % 25 == 0 or step > 1450:
            assert [t.number for t in live.window(trials)] == from_scratch(trials, MIN_HISTORY,
                                                                            StudyDirection.MINIMIZE)


def cnn_space(trial: optuna.Trial) -> float:
    lr = trial.suggest_float("lr", 1e-4, 1e-1, log=True)
    opt = trial.suggest_categorical("optimizer", ["adam", "sgd"])
    mom = trial.suggest_float("momentum", 0.8, 0.99) if opt == "sgd" else 0.9
    return (math.log10(lr) + 2.5) ** 2 + (mom - 0.9) ** 2


def tpe(seed: int) -> optuna.samplers.TPESampler:
    cfg = load_config(REPO / "studies" / "cnn.toml").sampler.model_copy(update={"seed": seed, "history": 0})
    return make_sampler(cfg)


def test_within_the_window_it_samples_exactly_as_plain_tpe():
    plain = optuna.create_study(sampler=tpe(3))
    storage = InMemoryStorage()
    windowed = optuna.create_study(storage=storage, sampler=HistoryWindowSampler(tpe(3), MIN_HISTORY, storage))
    plain.optimize(cnn_space, n_trials=40)
    windowed.optimize(cnn_space, n_trials=40)
    assert [t.params for t in windowed.trials] == [t.params for t in plain.trials]


class Seen(optuna.samplers.TPESampler):
    """TPE noting how many finished trials each relative sample was made on, and what it sampled."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.finished_seen: list[int] = []
        self.sampled: list[dict] = []

    def sample_relative(self, study, trial, search_space):
        self.finished_seen.append(len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))))
        params = super().sample_relative(study, trial, search_space)
        self.sampled.append(params)
        return params


def test_beyond_the_window_tpe_models_only_the_window_and_still_finds_the_best_region():
    storage = InMemoryStorage()
    inner = Seen(seed=0, n_startup_trials=8, multivariate=True, group=True)
    study = optuna.create_study(storage=storage, sampler=HistoryWindowSampler(inner, MIN_HISTORY, storage))
    study.optimize(cnn_space, n_trials=MIN_HISTORY + 30)
    assert max(inner.finished_seen) == MIN_HISTORY
    assert inner.finished_seen[-1] == MIN_HISTORY
    assert study.best_value < 0.01  # lr within ~25% of the best 10^-2.5


def test_the_history_knob_is_checked():
    cfg = load_config(REPO / "studies" / "cnn.toml")
    assert cfg.sampler.history == 1000
    with pytest.raises(ValueError, match="history"):
        cfg.sampler.model_validate({**cfg.sampler.model_dump(), "history": MIN_HISTORY - 1})
    with pytest.raises(ValueError, match="250"):
        HistoryWindowSampler(tpe(0), 100, InMemoryStorage())


def test_a_study_file_with_too_small_a_history_is_one_error(tmp_path):
    text = (REPO / "studies" / "cnn.toml").read_text().replace("history = 1000", "history = 100")
    path = tmp_path / "small.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="history"):
        load_config(path)


# --- sampling ahead ---------------------------------------------------------------------------------


def working_ahead(trial: optuna.Trial) -> float:
    """`cnn_space`, then two epochs start (the worker's objective lets the sampler sample ahead
    there: once a trial)."""
    value = cnn_space(trial)
    work_ahead(trial, 1)
    work_ahead(trial, 2)
    return value


def seen_tpe(seed: int) -> Seen:
    return Seen(seed=seed, n_startup_trials=8, multivariate=True, group=True, constant_liar=True)


def test_below_sample_ahead_from_it_samples_exactly_as_plain_tpe():
    plain = optuna.create_study(sampler=tpe(3))
    storage = InMemoryStorage()
    cfg = load_config(REPO / "studies" / "cnn.toml").sampler.model_copy(
        update={"seed": 3, "history": MIN_HISTORY, "sample_ahead_from": 41})
    ahead = optuna.create_study(storage=storage, sampler=make_sampler(cfg, 0, storage))
    plain.optimize(cnn_space, n_trials=40)
    ahead.optimize(working_ahead, n_trials=40)
    assert [t.params for t in ahead.trials] == [t.params for t in plain.trials]


def test_from_sample_ahead_from_each_trial_takes_the_sample_made_while_the_last_trained(caplog):
    storage = InMemoryStorage()
    inner, ahead = seen_tpe(0), seen_tpe(1)
    sampler = HistoryWindowSampler(inner, MIN_HISTORY, storage, ahead=ahead, ahead_from=20)
    study = optuna.create_study(storage=storage, sampler=sampler)
    with caplog.at_level(logging.DEBUG, logger="hpsearch.window"):
        study.optimize(working_ahead, n_trials=40)
    # Trial k samples ahead once k trials have finished (k >= 20); trial k + 1 takes that sample.
    assert inner.finished_seen == list(range(21))
    assert ahead.finished_seen == list(range(20, 40))  # the sample for trial k + 1 lacks trial k's result
    taken = [r.getMessage() for r in caplog.records if "takes the sample made ahead" in r.getMessage()]
    assert taken == [f"trial {k} takes the sample made ahead" for k in range(21, 40)]
    for k in range(21, 40):
        trial, sample = study.trials[k], ahead.sampled[k - 21]
        assert trial.params.items() <= sample.items()
        # TPE's note of the sampled point (the constant liar's) is the trial's, as if sampled there
        assert json.loads(trial.system_attrs["tpe:relative_params:0"]) == sample
    assert study.best_value < 0.01


def test_a_sample_ahead_that_its_trial_does_not_use_is_dropped():
    storage = InMemoryStorage()
    inner, ahead = seen_tpe(0), seen_tpe(1)
    study = optuna.create_study(storage=storage, sampler=HistoryWindowSampler(
        inner, MIN_HISTORY, storage, ahead=ahead, ahead_from=20))
    study.optimize(working_ahead, n_trials=25)
    study.enqueue_trial({"lr": 0.01, "optimizer": "adam"})  # trial 25: its parameters fixed
    study.optimize(working_ahead, n_trials=2)
    assert study.trials[25].params == {"lr": 0.01, "optimizer": "adam"}
    # made during trials 20, 21, ...: trial 25 was offered the one made during trial 24 and did
    # not use it; trial 26 takes the one made during trial 25, not that one
    offered, made_during_25 = ahead.sampled[4], ahead.sampled[5]
    note = json.loads(study.trials[26].system_attrs["tpe:relative_params:0"])
    assert note == made_during_25 != offered
    assert len(inner.sampled) == 21  # no trial after 20 was sampled the usual way


class Broken(optuna.samplers.TPESampler):
    def sample_relative(self, study, trial, search_space):
        raise RuntimeError("broken on purpose")


def test_a_sample_ahead_that_failed_leaves_the_trial_sampled_as_usual():
    storage = InMemoryStorage()
    inner = seen_tpe(0)
    study = optuna.create_study(storage=storage, sampler=HistoryWindowSampler(
        inner, MIN_HISTORY, storage, ahead=Broken(seed=1, multivariate=True, group=True), ahead_from=10))
    study.optimize(working_ahead, n_trials=30)
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    assert len(inner.sampled) == 30


def test_the_sample_ahead_knob_is_checked():
    cfg = load_config(REPO / "studies" / "cnn.toml")
    assert cfg.sampler.sample_ahead_from == 1000
    with pytest.raises(ValueError, match="sample_ahead_from"):
        cfg.sampler.model_validate({**cfg.sampler.model_dump(), "sample_ahead_from": -1})
    with pytest.raises(ValueError, match="ahead_from"):
        HistoryWindowSampler(tpe(0), 0, InMemoryStorage(), ahead=tpe(1), ahead_from=-1)
    inner = tpe(0)
    with pytest.raises(ValueError, match="own instance"):
        HistoryWindowSampler(inner, 0, InMemoryStorage(), ahead=inner, ahead_from=10)

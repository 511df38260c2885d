"""`hpsearch status` on studies built through Optuna's API: by name or file, all studies, --json."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stderr, redirect_stdout
from datetime import datetime, timedelta

import optuna
import pytest
from optuna.trial import FrozenTrial, TrialState

from hpsearch import cli, status
from test_report import synthetic_study


def run(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = cli.main(["status", *args])
    return rc, out.getvalue(), err.getvalue()


def _failed(number: int, reason: str, start: datetime, state=TrialState.FAIL, attr: str = "user") -> FrozenTrial:
    return FrozenTrial(
        number=number, state=state, value=None, datetime_start=start,
        datetime_complete=start + timedelta(seconds=30), params={}, distributions={},
        user_attrs={"stop_reason": reason} if attr == "user" else {},
        system_attrs={"fail_reason": reason} if attr == "system" else {}, intermediate_values={},
        trial_id=number,
    )


@pytest.fixture
def storage(tmp_path):
    s = synthetic_study(tmp_path, n_complete=6, n_pruned=3, n_failed=0, name="alpha")
    study = s.study
    t0 = datetime(2026, 11, 25, 9, 10)
    # A study whose every trial failed: status must say why, not only "no completed trial".
    broken = optuna.create_study(study_name="broken", storage=s.url)
    for n, why in enumerate(["out of memory on cuda:0 (batch_size=512): CUDA out of memory",
                             "out of memory on cuda:0 (batch_size=256): CUDA out of memory",
                             "ValueError: bad input"]):
        broken.add_trial(_failed(n, why, t0 + timedelta(minutes=n), attr="user" if n < 2 else "system"))
    study.set_user_attr(status.RESULT_ATTR, {**s.result, "finished_at": "2026-11-25T10:01:00+00:00"})
    return s


def test_attribute_names_match_finalize():
    from hpsearch import finalize

    assert (status.RESULT_ATTR, status.USES_ATTR) == (finalize.RESULT_ATTR, finalize.USES_ATTR)


def test_status_by_name_shows_budget_rate_reasons_best_and_finalize(storage):
    rc, out, err = run("--study", "alpha", "--storage", storage.url)
    assert rc == 0, err
    assert "study alpha on sqlite" in out
    assert "trials: 9 (6 complete, 3 pruned)" in out and "budget 9/9 finished" in out
    # 9 trials, from 09:00:00 (trial 0 starts) to 09:04:40 (trial 8 ends): 1.93 per minute.
    s = status.summarize_study(storage.study)
    assert s["wall_time_s"] == 280 and s["trials_per_minute"] == pytest.approx(9 / (280 / 60))
    assert f"{s['trials_per_minute']:.2f} trials/min; budget reached" in out
    assert "pruned: 3 × pruned after epoch N" in out
    assert "finalized 2026-11-25T10:01:00+00:00: trial 3, test accuracy" in out
    assert "best: trial 3, validation loss 0.0200" in out


def test_status_of_an_all_failed_study_gives_the_reasons(storage):
    rc, out, err = run("--study", "broken", "--storage", storage.url)
    assert rc == 0, err
    assert "failed: 2 × out of memory on cuda:0; 1 × ValueError" in out
    assert "best: no completed trial yet" in out and "budget unknown" in out
    assert "finalize: not yet" in out


def test_status_from_the_study_file_uses_its_budget(storage, tmp_path):
    rc, out, err = run("--study", str(tmp_path / "alpha.toml"), "--storage", storage.url)
    assert rc == 0, err
    assert "budget 9/9 finished" in out


def test_status_lists_every_study_and_prints_json(storage):
    rc, out, err = run("--storage", storage.url)
    assert rc == 0, err
    assert "2 studies on" in out and "alpha" in out and "broken" in out and "test acc" in out
    rc, out, err = run("--storage", storage.url, "--json")
    assert rc == 0, err
    data = json.loads(out)
    assert [s["study"] for s in data["studies"]] == ["alpha", "broken"]
    assert data["studies"][1]["failed_reasons"] == {"out of memory on cuda:0": 2, "ValueError": 1}
    rc, out, err = run("--study", "alpha", "--storage", storage.url, "--json", "--top", "2")
    one = json.loads(out)
    assert one["study"] == "alpha" and len(one["best"]) == 2 and one["finalize"]["trial"] == 3
    assert one["states"] == {"complete": 6, "pruned": 3} and one["budget"]["left"] == 0


def test_status_eta_while_running(tmp_path):
    s = synthetic_study(tmp_path, n_complete=4, name="slow")
    # 4 trials in the first 2 minutes of a 10-minute wall time: 0.4/min; the file's budget is 4.
    now = datetime(2026, 11, 25, 9, 10)
    s.study.add_trial(FrozenTrial(number=4, state=TrialState.RUNNING, value=None,
                                  datetime_start=datetime(2026, 11, 25, 9, 9), datetime_complete=None, params={},
                                  distributions={}, user_attrs={}, system_attrs={}, intermediate_values={},
                                  trial_id=4))
    summary = status.summarize_study(s.study, budget=12, now=now)
    assert summary["running"] and summary["wall_time_s"] == 600
    assert summary["trials_per_minute"] == pytest.approx(0.4)
    assert summary["eta_s"] == pytest.approx(8 / 0.4 * 60)


def test_unknown_study_is_one_line_listing_the_studies(storage):
    rc, out, err = run("--study", "nope", "--storage", storage.url)
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "'nope'" in err and "alpha" in err and "broken" in err

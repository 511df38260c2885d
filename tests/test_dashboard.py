"""`hpsearch dashboard` without a browser: what a search leaves for the dashboard, and bad input.

The page itself is checked in a real browser in test_dashboard_browser.py.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState
from optuna_dashboard import get_note, save_note

from conftest import FinishedSearch, free_port, hpsearch_cmd, run_cli
from hpsearch.config import load_config
from hpsearch.data import load_search_data


def one_error_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hpsearch: error: "), r.stderr
    assert "Traceback" not in r.stderr
    return lines[0]


def made_study(folder: Path) -> str:
    """A storage holding one (empty) Optuna study: enough for the errors that come after it."""
    url = f"sqlite:///{folder / 'made.db'}"
    optuna.create_study(study_name="made", storage=url)
    return url


# --- what the dashboard shows, written by a real search --------------------------------------------


def test_study_note_and_user_attrs_after_a_search(finished_search: FinishedSearch, mnist_dir: Path) -> None:
    study = optuna.load_study(study_name=finished_search.name, storage=finished_search.storage_url)
    assert study.metric_names == ["validation loss"]

    note = get_note(study)
    cfg = load_config(finished_search.study_file)
    data = load_search_data(cfg.data, mnist_dir, torch.device("cpu"))
    assert note.startswith("## quick\n")
    assert f"Study file `{finished_search.study_file}` (fingerprint `{cfg.fingerprint()}`)" in note
    for line in [
        "| lr | 0.001 – 0.01, log scale |",
        "| optimizer | one of adam, adamw |",
        "| conv2_channels | 16 – 64, log scale |",
        "| momentum | 0.9 (fixed; SGD only) |",
        "| batch_size | 128 (fixed) |",
        f"| train | {len(data.train):,} | 70% |",
        f"| validation | {len(data.val):,} | 15% |",
        "| test | held out | 15% |",
        "- 4 finished trials (complete, pruned or failed) across all workers",
        "- at most 2 epochs per trial; early stop after 2 epochs without a lower validation loss",
    ]:
        assert line in note.splitlines(), f"{line!r} not in the note:\n{note}"
    assert f"fingerprint `{data.fingerprint}`" in note

    trials = study.get_trials(deepcopy=False)
    assert len(trials) == 4
    assert {t.state for t in trials} <= {TrialState.COMPLETE, TrialState.PRUNED}
    for t in trials:
        a = t.user_attrs
        assert 0.5 < a["val_accuracy"] <= 1.0, (t.number, a)
        assert 1 <= a["epochs"] <= 2 and a["samples_per_s"] > 0, (t.number, a)
        assert a["host"] == socket.gethostname() and a["device"] == "cpu", (t.number, a)
        # The learning curve the dashboard plots, pruned trials included.
        assert sorted(t.intermediate_values) == list(range(1, a["epochs"] + 1)), (t.number, t.intermediate_values)


def test_a_joining_worker_keeps_the_note(finished_search: FinishedSearch, mnist_dir: Path, tmp_path: Path) -> None:
    # People edit the note in the dashboard: only the worker that creates the study writes it.
    url = f"sqlite:///{tmp_path / 'copy.db'}"
    optuna.copy_study(from_study_name=finished_search.name, from_storage=finished_search.storage_url,
                      to_storage=url)
    study = optuna.load_study(study_name=finished_search.name, storage=url)
    save_note(study, "edited by a person")
    r = run_cli("worker", "--study", str(finished_search.study_file), "--storage", url,
                "--data-dir", str(mnist_dir), "--device", "cpu", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "study budget reached" in r.stdout
    assert get_note(study) == "edited by a person"


# --- bad input: one line, exit code 2 ----------------------------------------------------------------


def test_missing_storage_is_one_line_and_creates_nothing(tmp_path: Path) -> None:
    line = one_error_line(run_cli("dashboard", "--storage", f"sqlite:///{tmp_path / 'nope.db'}", cwd=tmp_path))
    assert "no study storage at" in line and "hpsearch worker" in line
    assert list(tmp_path.iterdir()) == []


def test_default_storage_is_hpsearch_db_in_the_current_folder(tmp_path: Path) -> None:
    line = one_error_line(run_cli("dashboard", cwd=tmp_path))
    assert "no study storage at hpsearch.db" in line


def test_empty_storage_is_one_line(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    optuna.storages.RDBStorage(url)  # the tables, no study
    line = one_error_line(run_cli("dashboard", cwd=tmp_path, env={"HPSEARCH_STORAGE": url}))
    assert "holds no study yet" in line and "hpsearch worker --study" in line


def test_unreachable_postgres_is_one_line_without_the_password(tmp_path: Path) -> None:
    # Nothing listens on port 1: the connection is refused at once.
    url = "postgresql+psycopg2://root:s3cret-pw@127.0.0.1:1/test"
    line = one_error_line(run_cli("dashboard", "--storage", url, cwd=tmp_path))
    assert "cannot open storage" in line and "127.0.0.1:1" in line
    assert "s3cret-pw" not in line and "***" in line


def test_port_taken_is_one_line(tmp_path: Path) -> None:
    url = made_study(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = one_error_line(run_cli("dashboard", "--storage", url, "--port", str(port), cwd=tmp_path))
    assert f"port {port} on 127.0.0.1 is already in use" in line and "--port" in line


@pytest.mark.parametrize("port", ["0", "70000", "http"])
def test_bad_port_is_a_usage_error(tmp_path: Path, port: str) -> None:
    r = run_cli("dashboard", "--port", port, cwd=tmp_path)
    assert r.returncode == 2 and "--port" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_non_loopback_host_warns_then_serves_until_sigterm(tmp_path: Path) -> None:
    url = made_study(tmp_path)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HPSEARCH_")}
    proc = subprocess.Popen(
        hpsearch_cmd("dashboard", "--storage", url, "--host", "0.0.0.0", "--port", str(port)),
        cwd=tmp_path, env={**env, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        lines = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line.rstrip("\n"))
            if line.startswith("hpsearch: dashboard on"):
                break
        assert lines and lines[-1].startswith(f"hpsearch: dashboard on http://0.0.0.0:{port}/"), lines
        assert lines[0].startswith(f"hpsearch: warning: the dashboard on 0.0.0.0:{port} is reachable from other machines"), lines
        assert "no authentication" in lines[0] and "delete studies" in lines[0]
        # Listening for real: an HTTP request answers.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
            c.sendall(b"GET /api/meta HTTP/1.0\r\n\r\n")
            assert c.recv(64).startswith(b"HTTP/1.0 200")
        proc.terminate()
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert "hpsearch: dashboard stopped" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


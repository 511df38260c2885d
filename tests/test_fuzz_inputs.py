"""Bad input never traces back and a rejection never writes: a sample of tests/fuzz_inputs.py.

The whole count (every mutation of both shipped study files) takes minutes and is run by hand
(see that script's docstring); here every bad command line, environment, data folder and
read-only case runs, with a sample of the study-file mutations.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

import fuzz_inputs
from conftest import REPO, run_cli


def run_fuzz(tmp_path: Path, mnist_dir: Path, *args: str) -> list[dict]:
    out = tmp_path / "fuzz.json"
    r = subprocess.run(
        [sys.executable, str(REPO / "tests" / "fuzz_inputs.py"), "--data-dir", str(mnist_dir), "--json", str(out),
         *args],
        capture_output=True, text=True, timeout=900,
    )
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-3000:]
    assert "0 tracebacks, 0 exit codes other than 0 and 2, 0 rejections that wrote" in r.stdout, r.stdout
    return json.loads(out.read_text())


@pytest.mark.slow  # accepted cases train an epoch
def test_bad_command_lines_environments_and_data_folders(tmp_path: Path, mnist_dir: Path) -> None:
    outcomes = run_fuzz(tmp_path, mnist_dir, "--kinds", "cli", "data", "read-only")
    verdicts = {o["name"]: o["verdict"] for o in outcomes}
    assert len(outcomes) > 90 and set(verdicts.values()) <= {"rejected", "accepted"}
    # The cases of the issue are among them, and rejected.
    for name in ("--device mps", "--device cpu:5", "--storage postgresql+asyncpg://u@h/db", "--storage mysql://u@h/db",
                 "HPSEARCH_ARTIFACTS=a-file", "HPSEARCH_STORAGE=postgresql+asyncpg://u@h/db",
                 "HPSEARCH_DATA_DIR=no-such-dir", "data: truncated-gz", "data: tiny-images", "read-only: status --study s.toml"):
        assert verdicts[name] == "rejected", name


@pytest.mark.slow  # accepted cases train an epoch
def test_a_sample_of_study_file_mutations(tmp_path: Path, mnist_dir: Path) -> None:
    outcomes = run_fuzz(tmp_path, mnist_dir, "--kinds", "study", "--sample", "30", "--seed",
                        str(int(time.time()) // 86400))  # a different sample each day
    assert len(outcomes) == 30
    assert sum(o["verdict"] == "rejected" for o in outcomes) >= 10


ISSUE_MUTATIONS = [
    # (a key path of studies/cnn.toml, its new value as TOML, a word the one line must hold)
    ("lr = { low = 3e-4, high = 3e-2, log = true }", "lr = { low = 3e-4, high = inf, log = true }", "search.lr.high"),
    ("weight_decay = { low = 1e-6, high = 1e-2, log = true }", "weight_decay = { low = 1e-6, high = inf }",
     "search.weight_decay.high"),
    ("lr = { low = 3e-4, high = 3e-2, log = true }", "lr = nan", "search.lr"),
    ("conv1_channels = { low = 8, high = 64, log = true }", "conv1_channels = 100000000000", "conv1_channels"),
    ("max_epochs = 15", "max_epochs = 100000000000", "max_epochs"),
    ("reconnect_timeout = 600", "reconnect_timeout = inf", "reconnect_timeout"),
    ('[study]\n', "study = nan\n[studyx]\n", "study"),
]


@pytest.mark.parametrize("old,new,word", ISSUE_MUTATIONS, ids=[m[1][:30] for m in ISSUE_MUTATIONS])
def test_the_issues_mutations_through_the_real_command(tmp_path: Path, old: str, new: str, word: str) -> None:
    # The script forks its cases from one process; here the same inputs go through `hpsearch`.
    text = (REPO / "studies" / "cnn.toml").read_text()
    assert old in text
    (tmp_path / "s.toml").write_text(text.replace(old, new, 1))
    before = sorted(tmp_path.iterdir())
    r = run_cli("worker", "--study", "s.toml", "--storage", "sqlite:///h.db", cwd=tmp_path)
    errors = [line for line in r.stderr.splitlines() if line.startswith("hpsearch: error:")]
    assert r.returncode == 2 and len(errors) == 1 and word in errors[0], r.stderr
    assert "Traceback" not in r.stderr
    assert sorted(tmp_path.iterdir()) == before


def _judge(tmp_path: Path, stderr: str, rc: int, write: bool) -> fuzz_inputs.Outcome:
    folder = tmp_path / "case0000"
    folder.mkdir(parents=True)
    before = fuzz_inputs.snapshot(folder)
    (tmp_path / "case0000.err").write_text(stderr)
    if write:
        (folder / "h.db").write_bytes(b"")
    run = fuzz_inputs.Running(fuzz_inputs.Case("cli", "x", []), folder, 0, before, 0.0)
    return fuzz_inputs.judge(run, rc)


def test_the_count_flags_tracebacks_codes_and_writes(tmp_path: Path) -> None:
    # The script's judge, on made-up outcomes: what it must count as bad, it does.
    line = "hpsearch: error: something\n"
    assert _judge(tmp_path / "a", line, 2, write=False).verdict == "rejected"
    assert _judge(tmp_path / "b", line, 2, write=True).why.startswith("rejected but wrote")
    assert _judge(tmp_path / "c", "Traceback (most recent call last):\n" + line, 2, write=False).why == "traceback"
    assert _judge(tmp_path / "d", "", 1, write=False).why == "exit code 1"
    assert _judge(tmp_path / "e", line + line, 2, write=False).verdict == "bad"
    assert _judge(tmp_path / "f", "", 0, write=False).verdict == "accepted"

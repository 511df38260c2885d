"""The benchmark scripts run (quick mode), so they cannot rot. No timing is asserted here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow


def test_throughput_quick_mode_writes_its_table_and_json(tmp_path: Path, mnist_dir: Path) -> None:
    out = tmp_path / "throughput.json"
    r = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "throughput.py"), "--data-dir", str(mnist_dir),
         "--quick", "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stderr
    assert "seed-style DataLoader" in r.stdout and "+ pool before ReLU" in r.stdout
    doc = json.loads(out.read_text())
    loops = [row["loop"] for row in doc["results"]]
    assert loops[:4] == ["seed-style DataLoader", "hpsearch loop, NCHW", "+ channels_last", "+ pool before ReLU"]
    assert loops[4].startswith("+ bf16 autocast")
    assert all(row["samples_per_s"] > 0 and 0 < row["roofline_fraction"] for row in doc["results"])
    assert set(doc["matmul_gflops"]) == {"float32", "bfloat16"}


def test_search_efficiency_quick_mode_writes_its_table_and_json(tmp_path: Path, mnist_dir: Path) -> None:
    out = tmp_path / "search.json"
    r = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "search_efficiency.py"), "--data-dir", str(mnist_dir),
         "--quick", "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text())
    assert [row["contender"] for row in doc["summary"]] == ["hpsearch", "random, seed-style"]
    for run in doc["runs"]:
        # Both contenders trained and validated for real: epochs with accuracies well above chance.
        assert run["trials"] >= 1 and run["epochs"] >= 1 and len(run["timeline"]) == run["epochs"]
        assert max(acc for _, acc, _ in run["timeline"]) > 0.5
    assert "hpsearch" in r.stdout and "random, seed-style" in r.stdout


@pytest.mark.postgres
def test_scaling_quick_mode_writes_its_table_and_json(tmp_path: Path, mnist_dir: Path) -> None:
    out = tmp_path / "scaling.json"
    r = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "scaling.py"), "--data-dir", str(mnist_dir),
         "--quick", "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads(out.read_text())
    assert sorted(doc["throughput"]["median_per_min"]) == ["1", "2"]
    assert all(run["trials"] == 2 for run in doc["throughput"]["runs"])
    rows = doc["overhead"]
    assert [row["existing"] for row in rows] == [0, 20]
    # Every new trial of the trivial objective finished, on top of the existing ones (a budget
    # may overshoot by up to workers - 1: the README's "Budget across workers").
    assert all(6 <= row["trials"] <= 7 and row["median_ms"] > 0 for row in rows)

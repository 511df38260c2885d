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
    assert "seed-style DataLoader" in r.stdout and "hpsearch channels_last" in r.stdout
    results = json.loads(out.read_text())["results"]
    assert [row["loop"] for row in results] == ["seed-style DataLoader", "hpsearch fp32", "hpsearch channels_last"]
    assert all(row["samples_per_s"] > 0 for row in results)

"""Shared test helpers. Tiers: unit (default, fast), e2e on real MNIST, postgres, browser.

Tests that need the real MNIST files fail (never skip) when they are missing: CI must run them.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The MNIST test set shipped in the repository (the default study's data); HPSEARCH_TEST_MNIST
# points the tests at another copy.
MNIST_DIR = Path(os.environ.get("HPSEARCH_TEST_MNIST", REPO / "datasets" / "mnist-t10k"))


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    if not (MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.fail(
            f"the real MNIST test set is missing at {MNIST_DIR}; it ships in datasets/mnist-t10k "
            f"(or set HPSEARCH_TEST_MNIST)"
        )
    return MNIST_DIR


# A search that reaches >= 97% validation accuracy on MNIST's 7,000 training images in a few
# epochs: the space is narrowed around good values so the test checks the machinery, not luck.
QUICK_STUDY = """\
[study]
name = "{name}"

[data]
dataset = "idx"

[search]
lr = {{ low = 1e-3, high = 1e-2, log = true }}
weight_decay = {{ low = 1e-6, high = 1e-4, log = true }}
optimizer = {{ choices = ["adam", "adamw"] }}
conv1_channels = {{ low = 8, high = 32, log = true }}
conv2_channels = {{ low = 16, high = 64, log = true }}
dropout = {{ low = 0.0, high = 0.3 }}
batch_size = 128

[training]
max_epochs = {max_epochs}
patience = 2

[sampler]
n_startup_trials = 3
seed = 7

[pruner]
type = "median"
n_startup_trials = 2
n_warmup_steps = 1

[budget]
n_trials = {n_trials}

[storage]
heartbeat_interval = {heartbeat_interval}
grace_period = {grace_period}
"""


def write_study(path: Path, name: str = "quick", n_trials: int = 6, max_epochs: int = 4,
                heartbeat_interval: int = 2, grace_period: int = 6) -> Path:
    path.write_text(QUICK_STUDY.format(name=name, n_trials=n_trials, max_epochs=max_epochs,
                                       heartbeat_interval=heartbeat_interval,
                                       grace_period=grace_period))
    return path


def hpsearch_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "hpsearch.cli", *args]


def run_cli(*args: str, cwd: Path, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `hpsearch ARGS` in a subprocess, with no HPSEARCH_* settings leaking in from outside."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("HPSEARCH_")}
    full_env = {**base, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(hpsearch_cmd(*args), cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def free_port() -> int:
    """A port nothing listens on right now (the OS picks it), for a server a test starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class FinishedSearch:
    """A real search that has run to its budget: its folder, study file and storage URL."""

    folder: Path
    study_file: Path
    storage_url: str
    name: str = "quick"


@pytest.fixture(scope="session")
def finished_search(tmp_path_factory: pytest.TempPathFactory, mnist_dir: Path) -> FinishedSearch:
    """4 trials x 2 epochs of the quick study on real MNIST through `hpsearch worker`, run once."""
    folder = tmp_path_factory.mktemp("finished-search")
    study_file = write_study(folder / "quick.toml", "quick", n_trials=4, max_epochs=2)
    url = f"sqlite:///{folder / 'hpsearch.db'}"
    r = run_cli("worker", "--study", str(study_file), "--storage", url, "--data-dir", str(mnist_dir),
                "--device", "cpu", cwd=folder)
    assert r.returncode == 0, r.stdout + r.stderr
    return FinishedSearch(folder, study_file, url)

"""`--processes K`: how K workers are laid out over devices and CPU threads."""

from __future__ import annotations

import pytest
import torch

from conftest import run_cli
from hpsearch import node
from hpsearch.errors import HpsearchError

pytestmark = pytest.mark.fast  # the quick unit tier: uv run pytest -m fast


def test_cpu_node_divides_the_cores(monkeypatch):
    monkeypatch.setattr(node, "usable_cores", lambda: 16)
    assert node.plan("cpu", 3, None) == [("cpu", 5)] * 3
    assert node.plan("cpu", 32, None) == [("cpu", 1)] * 32  # never zero threads
    assert node.plan("cpu", 2, 6) == [("cpu", 6)] * 2  # --threads is per process


def test_gpus_round_robin_several_per_gpu(monkeypatch):
    # No GPU on the CI machine: the layout is a pure function of the device count, given here.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(node, "usable_cores", lambda: 8)
    assert [d for d, _ in node.plan("auto", 5, None)] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0"]
    assert node.plan("cuda", 2, None) == [("cuda:0", 4), ("cuda:1", 4)]


def test_cuda_without_gpus_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert node.plan("auto", 2, 1) == [("cpu", 1)] * 2
    with pytest.raises(HpsearchError, match="CUDA is not available"):
        node.plan("cuda", 2, None)


def test_processes_must_be_positive(tmp_path):
    r = run_cli("worker", "--study", "cnn", "--processes", "0", cwd=tmp_path)
    assert r.returncode == 2 and "--processes: expected a positive integer, but got 0" in r.stderr


def test_the_node_creates_the_study_with_its_dashboard_note(tmp_path, mnist_dir):
    """The parent creates the study before its children start: with the note a single worker writes."""
    import optuna
    from optuna_dashboard import get_note

    from conftest import write_study
    from hpsearch.config import load_config
    from hpsearch.worker import WorkerOptions

    cfg = load_config(write_study(tmp_path / "n.toml", "node"))
    url = f"sqlite:///{tmp_path / 'hpsearch.db'}"
    node._preflight(WorkerOptions(cfg=cfg, storage_url=url, data_dir=str(mnist_dir), device="cpu"))
    note = get_note(optuna.load_study(study_name="node", storage=url))
    assert note.startswith("## node\n") and cfg.fingerprint() in note

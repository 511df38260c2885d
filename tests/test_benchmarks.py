"""The benchmark scripts run (quick mode), so they cannot rot. No timing is asserted here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import optuna
import torch
import pytest

from conftest import REPO
from hpsearch.train import cpu_has_native_bf16

pytestmark = pytest.mark.slow


def run_quick(script: str, mnist_dir: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """`benchmarks/SCRIPT --quick`, writing its JSON to `out`; fails the test if it fails."""
    r = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), "--data-dir", str(mnist_dir), "--quick",
         "--json", str(out), *extra],
        capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def test_throughput_quick_mode_writes_its_table_and_json(tmp_path: Path, mnist_dir: Path) -> None:
    out = tmp_path / "throughput.json"
    r = run_quick("throughput.py", mnist_dir, out)
    assert "seed-style DataLoader" in r.stdout and "+ pool before ReLU" in r.stdout
    doc = json.loads(out.read_text())
    loops = [row["loop"] for row in doc["results"]]
    assert loops[:4] == ["seed-style DataLoader", "hpsearch loop, NCHW", "+ channels_last", "+ pool before ReLU"]
    assert loops[4].startswith("+ bf16 autocast")
    # The bf16 row is timed exactly where this CPU has native bf16 (as hpsearch's "auto" decides).
    assert doc["native_bf16"] == cpu_has_native_bf16()
    expected = ["timed"] * 4 + ["timed" if doc["native_bf16"] else "emulated"]
    assert [row["status"] for row in doc["results"]] == expected
    assert all(row["samples_per_s"] > 0 and 0 < row["roofline_fraction"]
               for row in doc["results"] if row["status"] == "timed")
    assert set(doc["matmul_gflops"]) == {"float32", "bfloat16"}
    assert doc["matmul_size"] == 512  # quick: bounded by work


def test_throughput_quick_mode_skips_bf16_rows_the_cpu_can_only_emulate(tmp_path: Path, mnist_dir: Path) -> None:
    # This machine may have native bf16: --emulated-bf16 takes the path of one that has not.
    out = tmp_path / "throughput.json"
    r = run_quick("throughput.py", mnist_dir, out, "--emulated-bf16")
    doc = json.loads(out.read_text())
    assert doc["native_bf16"] is False
    bf16_row = doc["results"][4]
    assert bf16_row["loop"] == "+ bf16 autocast (forced)"
    assert bf16_row["status"] == "emulated" and bf16_row["samples_per_s"] is None and bf16_row["repeats"] == []
    assert doc["matmul_gflops"]["bfloat16"] == "emulated" and doc["matmul_gflops"]["float32"] > 0
    assert all(row["status"] == "timed" and row["samples_per_s"] > 0 for row in doc["results"][:4])
    assert "emulated: no native bf16" in r.stdout and "bf16 emulated GFLOP/s" in r.stdout


def test_search_efficiency_quick_mode_writes_its_table_and_json(tmp_path: Path, mnist_dir: Path) -> None:
    out = tmp_path / "search.json"
    r = run_quick("search_efficiency.py", mnist_dir, out)
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
    run_quick("scaling.py", mnist_dir, out)
    doc = json.loads(out.read_text())
    assert sorted(doc["throughput"]["median_per_min"]) == sorted(doc["throughput"]["median_per_min_steady"]) == ["1", "2"]
    assert all(2 <= run["trials"] <= run["workers"] + 1 for run in doc["throughput"]["runs"])
    rows = doc["overhead"]
    assert [row["existing"] for row in rows] == [0, 20]
    # Every new trial of the trivial objective finished, on top of the existing ones (a budget
    # may overshoot by up to workers - 1: the README's "Budget across workers").
    assert all(6 <= row["trials"] <= 7 and row["median_ms"] > 0 for row in rows)


@pytest.mark.postgres
def test_loadtest_quick_mode_runs_the_real_loop_directly_and_through_the_proxy(tmp_path: Path,
                                                                               mnist_dir: Path) -> None:
    """Both paths, with the worker's write-behind and with every write waited for, paced (slept
    trials) with a solo worker."""
    out = tmp_path / "loadtest.json"
    r = run_quick("loadtest.py", mnist_dir, out, "--writes", "behind", "sync", "--train-s", "0.3", "--solo",
                  "--existing", "20")
    doc = json.loads(out.read_text())
    rows = doc["results"]
    assert [(row["existing"], row["via"], row["refresh"], row["writes"], row["workers"]) for row in rows] == [
        (20, "postgresql", None, "behind", 8), (20, "proxy", 5.0, "behind", 8),
        (20, "postgresql", None, "sync", 8), (20, "proxy", 5.0, "sync", 8)]
    for row in rows:
        assert row["trials"] >= 1 and row["trials_per_s"] > 0 and row["ask_p50_ms"] > 0
        assert row["overshoot"] == 0 and row["unfinished"] == 0  # the exact budget
        assert row["odd_pairings"] == []  # every trial timed inside its own optimize call
        assert row["db_connections_peak"] >= 1
        # Where the CPU went: the workers and PostgreSQL always work, the proxy when it is used.
        cpu = row["cpu_ms_per_trial"]
        assert cpu["workers"] > 0 and cpu["database"] > 0 and cpu["proxy"] >= 0, row
        assert row["via"] == "postgresql" or cpu["proxy"] > 0, row
        assert row["train_s"] == 0.3 and row["trial_p50_ms"] >= 300 and row["overhead_p50_ms"] > 0
        assert row["solo_trials"] >= 1 and row["solo_overhead_p50_ms"] > 0 and row["solo_cpu_ms_per_trial"] > 0
        assert row["processes"] == 2  # the solo worker's own process and the other 7 workers'
    assert "--existing 20 --writes behind sync --train-s 0.3 --solo" in doc["command"]
    assert "| proxy, refresh 5 s, writes sync |" in r.stdout and "| existing | via |" in r.stdout


@pytest.mark.postgres
def test_solo_worker_quick_mode_times_each_contender_and_its_calls(tmp_path: Path, mnist_dir: Path) -> None:
    out = tmp_path / "solo.json"
    r = run_quick("solo_worker.py", mnist_dir, out)
    doc = json.loads(out.read_text())
    rows = doc["results"]
    assert [(row["contender"], row["writes"], row["pruner"]) for row in rows] == [
        ("behind", "behind", "hpsearch"), ("sync", "sync", "hpsearch"), ("optuna-pruner", "behind", "optuna"),
        ("no-prefetch", "behind", "no-prefetch"), ("tell-waited", "tell-waited", "hpsearch"),
        ("no-ahead", "behind", "hpsearch")]
    assert [row["ahead"] for row in rows] == [True] * 5 + [False]
    for row in rows:
        assert row["trials"] == 2 and row["cpu_ms"] > 0
        calls = row["calls"]
        # The worker waits on trial creation either way; on the tell unless it is sent behind, and
        # on every attribute only when sync.
        assert calls["create_new_trial"]["per_trial"] == 1
        if row["writes"] == "behind":
            assert "set_trial_state_values" not in calls
            assert calls["get_trial"]["per_trial"] == 1  # only Optuna's read of the trial it makes
        else:
            assert calls["set_trial_state_values"]["per_trial"] == 1 and calls["get_trial"]["per_trial"] == 3
    # Every trial writes 11 user attributes first (more when it is not pruned).
    assert "set_trial_user_attr" not in rows[0]["calls"] and rows[1]["calls"]["set_trial_user_attr"]["per_trial"] >= 11
    # The pruner's reads run beside the training: the worker waits on no more of them than reading at
    # the report (as many when the memo answers the report's reads; Optuna's pruner, which reads at the
    # warm-up epochs too, is left out: with epochs of 0.1 s the memo answers some of its reads).
    reads = {row["contender"]: row["calls"]["get_all_trials"]["per_trial"] for row in rows}
    assert reads["behind"] <= reads["no-prefetch"]
    assert set(doc["median_overhead_ms"]) == {"behind", "sync", "optuna-pruner", "no-prefetch", "tell-waited", "no-ahead"}
    assert "| optuna-pruner |" in r.stdout and "| no-prefetch |" in r.stdout


@pytest.mark.postgres
def test_rpc_latency_quick_mode_times_each_path(tmp_path: Path, mnist_dir: Path) -> None:
    out = tmp_path / "rpc.json"
    r = run_quick("rpc_latency.py", mnist_dir, out)
    rows = json.loads(out.read_text())["results"]
    assert [row["path"] for row in rows] == ["postgresql", "proxy, refresh 5 s", "proxy, refresh 0 s"]
    assert all(row["write_ms"] > 0 and row["read_ms"] > 0 for row in rows)
    assert "| proxy, refresh 5 s |" in r.stdout


def test_sampler_cost_quick_mode_writes_its_json(tmp_path: Path, mnist_dir: Path) -> None:
    out = tmp_path / "sampler.json"
    run_quick("sampler_cost.py", mnist_dir, out)
    rows = json.loads(out.read_text())["results"]
    assert [(row["existing"], row["history"], row["ahead"]) for row in rows] == [
        (0, 0, False), (0, 250, False), (300, 0, False), (300, 250, False), (300, 250, True)]
    assert all(row["asks"] == 3 and row["median_ms"] > 0 and row["proposed_loss_best"] > 0 for row in rows)


def test_worker_cost_quick_mode_times_the_tally_against_the_walk(tmp_path: Path, mnist_dir: Path) -> None:
    out = tmp_path / "worker_cost.json"
    r = run_quick("worker_cost.py", mnist_dir, out)
    rows = json.loads(out.read_text())["results"]
    assert [(row["existing"], row["contender"]) for row in rows] == [
        (n, c) for n in (0, 300) for c in ("tally", "walk", "optuna-pruner")]
    assert all(row["trials"] == 3 and row["median_ms"] > 0 for row in rows)
    assert "| 300 | walk |" in r.stdout


def test_peers_quick_mode_runs_hpsearch_ray_tune_and_the_optuna_script(tmp_path: Path, mnist_dir: Path) -> None:
    out = tmp_path / "peers.json"
    r = run_quick("peers.py", mnist_dir, out)
    doc = json.loads(out.read_text())
    assert [row["contender"] for row in doc["summary"]] == ["hpsearch", "ray tune", "optuna script"]
    assert doc["quick"] is True and doc["versions"]["optuna"] == optuna.__version__
    for run in doc["runs"]:
        # Bounded by work: two one-epoch trials each, every one trained and validated for real
        # (well above chance), timed from before the data was loaded, with the load average noted.
        assert run["trials"] == 2 and run["epochs"] == 2, run
        assert len({trial for _, _, trial in run["timeline"]}) == 2
        assert all(0 < t < run["budget_s"] for t, _, _ in run["timeline"])
        assert max(acc for _, acc, _ in run["timeline"]) > 0.5
        assert len(run["load_1min"]) == 2
    # The samplers are seeded alike: every contender's first trial is the same configuration.
    assert len({json.dumps(run["params"][0], sort_keys=True) for run in doc["runs"]}) == 1
    assert "ray tune" in r.stdout and "optuna script" in r.stdout


def test_peers_levers_each_change_one_default_and_two_processes_share_one_study(tmp_path: Path,
                                                                                mnist_dir: Path) -> None:
    out = tmp_path / "levers.json"
    run_quick("peers.py", mnist_dir, out, "--contenders", "hpsearch", "processes2", "batch128")
    doc = json.loads(out.read_text())
    assert [row["contender"] for row in doc["summary"]] == [
        "hpsearch", "hpsearch, 2 processes x 1 thread", "hpsearch, batch 128/256 only"]
    by = {run["contender"]: run for run in doc["runs"]}
    # Two worker processes, one study: the study's budget of 2 trials split between them, both
    # trained for real, each epoch on the run's clock.
    two = by["hpsearch, 2 processes x 1 thread"]
    assert two["trials"] == 2 and two["epochs"] == 2 and len(two["params"]) == 2, two
    assert all(0 < t < two["budget_s"] and acc > 0.5 for t, acc, _ in two["timeline"])
    # The lever changed the space: batches of 64 are no longer drawn.
    assert all(p["batch_size"] in (128, 256) for p in by["hpsearch, batch 128/256 only"]["params"])


def test_mnist_rot_rotates_every_digit_by_a_seeded_angle_and_keeps_the_labels(tmp_path: Path, mnist_dir: Path) -> None:
    from hpsearch.config import load_config
    from hpsearch.data import load_search_data, read_idx

    def build(out: str, *seed: str) -> tuple:
        subprocess.run([sys.executable, str(REPO / "benchmarks" / "mnist_rot.py"), str(mnist_dir), str(tmp_path / out),
                        *seed], check=True, timeout=300)
        return (read_idx(tmp_path / out / "rot-images-idx3-ubyte.gz"), read_idx(tmp_path / out / "rot-labels-idx1-ubyte.gz"))

    source = read_idx(mnist_dir / "t10k-images-idx3-ubyte.gz")
    (images, labels), (again, _), (other, _) = build("a"), build("b"), build("c", "--seed", "1")
    assert (labels == read_idx(mnist_dir / "t10k-labels-idx1-ubyte.gz")).all()
    assert images.shape == source.shape and images.dtype == source.dtype
    assert (images == again).all() and not (images == other).all()  # the seed decides the angles
    # Rotated, not blanked: most digits move, and the ink of a centred digit stays in the frame.
    moved = (images != source).reshape(len(source), -1).any(1).mean()
    assert moved > 0.99
    assert abs(images.astype(float).mean() / source.astype(float).mean() - 1) < 0.05
    # The study files read it as they read MNIST.
    cfg = load_config(REPO / "studies" / "mnist-idx.toml")
    data = load_search_data(cfg.data, tmp_path / "a", torch.device("cpu"))
    assert data.num_classes == 10 and len(data.train) == 6999 and len(data.val) == 1500  # as MNIST-10k splits

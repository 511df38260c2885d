"""`hpsearch worker --processes K`: K worker processes on this node, one study.

Each child is an ordinary `hpsearch worker` with its own `--worker-index` (so its sampler is
seeded apart from its siblings'), its own device (round-robin over the visible GPUs: several
small CNNs share a GPU well, so K may exceed the GPU count) and its share of the CPU threads.

The parent checks the data and the storage once before starting anyone, so a bad URL or a
missing dataset is one error line, not K. The storage URL reaches the children through the
environment, never their command lines (which `ps` shows to every user of the node). The
children run in their own session: a terminal's Ctrl-C reaches the parent only, which passes
each signal on exactly once, so "a second Ctrl-C exits at once" means the same for all of them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from types import FrameType

import torch

from hpsearch.dashboard import save_study_note
from hpsearch.data import load_search_data
from hpsearch.errors import HpsearchError
from hpsearch.signals import SIGNALS
from hpsearch.storage import ENV_ARTIFACTS, ENV_STORAGE, artifact_store, open_storage, redact
from hpsearch.study import check_split, open_study
from hpsearch.worker import ENV_DATA_DIR, WorkerOptions, resolve_data_dir, resolve_device


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # respects taskset and container CPU sets
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def plan(device: str, k: int, threads: int | None) -> list[tuple[str, int]]:
    """(device, CPU threads) for each of `k` workers."""
    if k < 1:
        raise ValueError(f"need at least one process, but got {k=}")
    per = threads or max(1, usable_cores() // k)
    if device in {"auto", "cuda"}:
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if gpus:
            return [(f"cuda:{i % gpus}", per) for i in range(k)]
        if device == "cuda":
            raise HpsearchError("--device cuda: CUDA is not available here; use --device cpu")
        return [("cpu", per)] * k
    resolve_device(device)  # one error for a bad name, before any child starts
    return [(device, per)] * k


def _preflight(opts: WorkerOptions) -> None:
    cfg = opts.cfg
    data = load_search_data(cfg.data, resolve_data_dir(opts.data_dir, cfg), torch.device("cpu"))
    storage = open_storage(opts.storage_url, cfg.storage)
    # Created once here, with its dashboard note, as a single worker creates it: no race among
    # the children, which join it.
    study = open_study(cfg, storage, opts.worker_index, on_create=lambda s: save_study_note(s, cfg, data))
    check_split(study, data.fingerprint, storage)
    artifact_store(opts.storage_url, opts.artifacts)
    storage.close()


def child_command(opts: WorkerOptions, study_arg: str, index: int, device: str, threads: int,
                  debug: bool) -> list[str]:
    cmd = [sys.executable, "-m", "hpsearch.cli", "worker", "--study", study_arg,
           "--device", device, "--threads", str(threads), "--worker-index", str(index),
           "--log-prefix", f"w{index} "]
    if opts.n_trials is not None:
        cmd += ["--n-trials", str(opts.n_trials)]
    if opts.timeout is not None:
        cmd += ["--timeout", repr(opts.timeout)]
    if opts.finish_trial_on_signal:
        cmd.append("--finish-trial-on-signal")
    if debug:
        cmd.append("--debug")
    return cmd


def run_node(opts: WorkerOptions, k: int, *, study_arg: str, debug: bool = False) -> int:
    layout = plan(opts.device, k, opts.threads)
    _preflight(opts)
    env = {**os.environ, ENV_STORAGE: opts.storage_url}
    if opts.artifacts:
        env[ENV_ARTIFACTS] = os.path.abspath(opts.artifacts)
    if opts.data_dir:
        env[ENV_DATA_DIR] = os.path.abspath(opts.data_dir)
    first = opts.worker_index
    where = ", ".join(f"w{first + i}: {d} x{t} threads" for i, (d, t) in enumerate(layout))
    print(f"hpsearch: {k} workers on {redact(opts.storage_url)}: {where}", flush=True)

    children: list[subprocess.Popen] = []
    signalled: list[int] = []

    def forward(signum: int, frame: FrameType | None) -> None:
        signalled.append(signum)
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in SIGNALS}
    try:
        for i, (device, threads) in enumerate(layout):
            if signalled:  # stopping: start no one else
                break
            cmd = child_command(opts, study_arg, first + i, device, threads, debug)
            children.append(subprocess.Popen(cmd, env=env, start_new_session=True))
        codes = [child.wait() for child in children]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if signalled and signalled[0] == signal.SIGINT and all(c in (0, 130) for c in codes):
        return 130
    failed = [(first + i, c) for i, c in enumerate(codes) if c != 0]
    if failed:
        print("hpsearch: workers with a non-zero exit: "
              + ", ".join(f"w{i} ({c})" for i, c in failed), file=sys.stderr, flush=True)
        return 2 if any(c == 2 for _, c in failed) else failed[0][1]
    return 0

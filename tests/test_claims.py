"""Exactly one of several processes that try at the same instant: the first use of the test split,
and the fingerprint of a new study. Real processes released together by a barrier, on a SQLite
file and on the real PostgreSQL server (a fresh database, as in test_postgres.py)."""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
from pathlib import Path

import optuna
import pytest

from conftest import run_cli, write_study
from test_postgres import pg_url  # noqa: F401  (the fixture: a fresh PostgreSQL database)

PROCESSES = 4
ROUNDS = 5


def _claim_rounds(url: str, names: list[str], again: bool, barrier, queue) -> None:
    from hpsearch import claims
    from hpsearch.storage import open_storage

    storage = open_storage(url)
    out = []
    for name in names:
        key = claims.StudyKey.of(storage, name)
        barrier.wait(60)  # every process claims at the same instant
        out.append(claims.claim_next(storage, key, claims.TEST_SPLIT, {"pid": os.getpid()}, again=again))
    queue.put(out)


def _open_rounds(url: str, files: list[str], barrier, queue) -> None:
    from hpsearch.config import load_config
    from hpsearch.errors import StorageError
    from hpsearch.storage import open_storage
    from hpsearch.study import open_study

    storage = open_storage(url)
    out = []
    for path in files:
        cfg = load_config(path)
        created: list[bool] = []
        barrier.wait(60)
        try:
            open_study(cfg, storage, on_create=lambda s: created.append(True))
            out.append((cfg.fingerprint(), "created" if created else "joined"))
        except StorageError as e:
            assert "different study file" in str(e)
            out.append((cfg.fingerprint(), "refused"))
    queue.put(out)


def _race(target, per_process_args: list[tuple]) -> list[list]:
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(len(per_process_args)), ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, barrier, queue)) for args in per_process_args]
    for p in procs:
        p.start()
    results = [queue.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * len(procs)
    return [list(rounds) for rounds in zip(*results)]  # per round: what each process got


def _storages(tmp_path: Path, request) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'claims.db'}"
    return request.getfixturevalue("pg_url")


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def url(tmp_path: Path, request) -> str:
    return _storages(tmp_path, request)


def _new_studies(url: str, prefix: str) -> list[str]:
    names = [f"{prefix}{i}" for i in range(ROUNDS)]
    for name in names:
        optuna.create_study(study_name=name, storage=url)
    return names


def test_exactly_one_of_four_simultaneous_finalizes_claims_the_test_split(url: str) -> None:
    names = _new_studies(url, "once")
    for got in _race(_claim_rounds, [(url, names, False)] * PROCESSES):
        assert sorted(got, key=str) == [1] + [None] * (PROCESSES - 1), got


def test_simultaneous_forced_uses_get_distinct_numbers(url: str) -> None:
    names = _new_studies(url, "forced")
    for got in _race(_claim_rounds, [(url, names, True)] * PROCESSES):
        assert sorted(got) == list(range(1, PROCESSES + 1)), got


def test_of_workers_with_different_files_on_a_new_study_exactly_one_fingerprint_wins(url: str,
                                                                                      tmp_path: Path) -> None:
    # Per round: four files that differ in max_epochs (four fingerprints), then two pairs.
    files: list[list[str]] = [[] for _ in range(PROCESSES)]
    for r in range(ROUNDS):
        for i in range(PROCESSES):
            epochs = 2 + (i if r < ROUNDS - 1 else i % 2)
            path = write_study(tmp_path / f"r{r}w{i}.toml", name=f"fp{r}", max_epochs=epochs)
            files[i].append(str(path))
    for r, got in enumerate(_race(_open_rounds, [(url, f) for f in files])):
        outcomes = sorted(o for _, o in got)
        if r < ROUNDS - 1:
            assert outcomes == ["created", "refused", "refused", "refused"], got
        else:  # two files, two processes each: the winner's twin joins, the other pair is refused
            assert outcomes == ["created", "joined", "refused", "refused"], got
            winner = next(fp for fp, o in got if o == "created")
            assert {fp for fp, o in got if o != "refused"} == {winner}


@pytest.mark.slow
def test_two_finalize_commands_at_once_read_the_test_split_once(finished_search, mnist_dir: Path,
                                                                tmp_path: Path) -> None:
    import subprocess

    from conftest import hpsearch_cmd

    shutil.copy(finished_search.folder / "hpsearch.db", tmp_path / "hpsearch.db")
    shutil.copytree(finished_search.folder / "hpsearch-artifacts", tmp_path / "hpsearch-artifacts")
    url = f"sqlite:///{tmp_path / 'hpsearch.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("HPSEARCH_")}
    cmd = hpsearch_cmd("finalize", "--study", "quick", "--storage", url, "--data-dir", str(mnist_dir),
                       "--device", "cpu")
    procs = [subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert sum("test: accuracy" in out for out in outs) == 1, outs  # one evaluation, one read
    assert not any("--force" in out.split("`--force` evaluates again")[0] for out in outs), outs
    for p, out in zip(procs, outs):
        assert "Traceback" not in out and p.returncode in (0, 2), out
        if p.returncode == 2:  # it lost the claim: it says so, and asks for no --force
            assert "another finalize claimed the test split first" in out and "--force" not in out, out
    uses = optuna.load_study(study_name="quick", storage=url).user_attrs["hpsearch_test_uses"]
    assert [u["n"] for u in uses] == [1] and "test_accuracy" in uses[0]
    r = run_cli("finalize", "--study", "quick", "--storage", url, "--data-dir", str(mnist_dir), cwd=tmp_path)
    assert r.returncode == 0 and "was not read now" in r.stdout, r.stdout + r.stderr


def _split_rounds(url: str, names: list[str], fingerprint: str, barrier, queue) -> None:
    from hpsearch.errors import StorageError
    from hpsearch.storage import open_storage
    from hpsearch.study import check_split

    storage = open_storage(url)
    out = []
    for name in names:
        study = optuna.load_study(study_name=name, storage=storage)
        barrier.wait(60)
        try:
            check_split(study, fingerprint, storage)
            out.append(fingerprint)
        except StorageError:
            out.append("refused")
    queue.put(out)


def test_of_workers_with_different_data_on_a_new_study_exactly_one_split_wins(url: str) -> None:
    names = _new_studies(url, "split")
    for r, got in enumerate(_race(_split_rounds, [(url, names, f"split-{i}") for i in range(PROCESSES)])):
        winners = [g for g in got if g != "refused"]
        assert len(winners) == 1, got
        stored = optuna.load_study(study_name=names[r], storage=url).user_attrs["split_fingerprint"]
        assert stored == winners[0]

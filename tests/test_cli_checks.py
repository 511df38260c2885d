"""Checks before the storage: a bad device, storage URL or artifact folder is one line and exit
code 2, and leaves nothing behind; read-only commands change nothing in a storage.

Every case runs the real CLI in a subprocess and compares the folder (and the SQLite file's bytes)
before and after.
"""

from __future__ import annotations

import getpass
import hashlib
import os
import secrets
import sqlite3
import subprocess
import sys
import zipfile
from pathlib import Path

import optuna
import psycopg2
import pytest

from conftest import REPO, run_cli


def snapshot(folder: Path) -> dict[str, str]:
    """Every path under `folder` with a hash of its bytes (folders as "dir")."""
    return {
        str(p.relative_to(folder)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
    }


def assert_one_line_rejection(r, *words: str) -> None:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stdout + r.stderr
    assert len(lines) == 1 and lines[0].startswith("hpsearch: error:"), r.stderr
    assert "Traceback" not in r.stderr
    for w in words:
        assert w in lines[0], lines[0]


BAD_WORKER_ARGS = [
    # (what, extra arguments, environment, words the line must contain)
    ("mps", ["--device", "mps"], {}, ["'mps'", "use auto, cpu"]),
    ("cpu:5", ["--device", "cpu:5"], {}, ["cpu:5", "--device cpu"]),
    ("cuda missing", ["--device", "cuda:0"], {}, ["CUDA is not available", "--device cpu"]),
    ("asyncpg", ["--storage", "postgresql+asyncpg://u:secret@127.0.0.1/db"], {}, ["asyncpg", "psycopg2"]),
    ("psycopg 3", ["--storage", "postgresql+psycopg://u:secret@127.0.0.1/db"], {}, ["'psycopg' is not installed",
                                                                                   "psycopg2"]),
    ("psycopg 3 via env", [], {"HPSEARCH_STORAGE": "postgresql+psycopg://u@127.0.0.1/db"}, ["not installed"]),
    ("mysql", ["--storage", "mysql://u@127.0.0.1/db"], {}, ["unsupported database 'mysql'"]),
    ("port not a number", ["--storage", "postgresql://u:secret@host:port/db"], {}, ["is not a URL"]),
    ("not a URL", ["--storage", "hpsearch.db"], {}, ["is not a URL"]),
    ("unknown dialect", ["--storage", "oracle+nodriver://u@h/db"], {}, ["unknown database or driver"]),
    ("sqlite folder missing", ["--storage", "sqlite:///no/such/folder/x.db"], {}, ["does not exist"]),
    ("artifacts is a file", ["--artifacts", "a-file"], {}, ["is a file, not a folder"]),
    ("artifacts under a file", ["--artifacts", "a-file/sub"], {}, ["a-file is a file"]),
    ("artifacts via env", [], {"HPSEARCH_ARTIFACTS": "a-file"}, ["$HPSEARCH_ARTIFACTS", "not a folder"]),
    ("artifacts unwritable", ["--artifacts", "/proc/hpsearch-artifacts"], {}, ["not writable"]),
]


@pytest.mark.parametrize("what,args,env,words", BAD_WORKER_ARGS, ids=[b[0] for b in BAD_WORKER_ARGS])
def test_worker_rejects_bad_settings_in_one_line_before_the_storage(tmp_path: Path, what, args, env,
                                                                   words) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    before = snapshot(tmp_path)
    r = run_cli("worker", "--study", "cnn", *args, cwd=tmp_path, env=env)
    assert_one_line_rejection(r, *words)
    assert "secret" not in r.stderr
    assert snapshot(tmp_path) == before  # no SQLite file, no artifact folder, no data folder


def test_artifacts_are_checked_before_the_study_is_created(tmp_path: Path) -> None:
    # An existing storage with another study: the rejected worker must not add its study to it.
    db = tmp_path / "shared.db"
    optuna.create_study(storage=f"sqlite:///{db}", study_name="other")
    (tmp_path / "a-file").write_text("x")
    before = snapshot(tmp_path)
    r = run_cli("worker", "--study", "cnn", "--storage", f"sqlite:///{db}", "--artifacts", "a-file", cwd=tmp_path)
    assert_one_line_rejection(r, "a-file")
    assert snapshot(tmp_path) == before
    assert [s.study_name for s in optuna.get_all_study_summaries(f"sqlite:///{db}")] == ["other"]


def test_the_artifact_probe_leaves_a_writable_folder_as_it_was(tmp_path: Path) -> None:
    from hpsearch.checks import writable_folder

    assert writable_folder(tmp_path / "new" / "deeper", "artifact folder") == tmp_path / "new" / "deeper"
    assert list(tmp_path.iterdir()) == []  # checked through its parent, not created


# --- read-only commands ---------------------------------------------------------------------------


@pytest.fixture
def other_study_db(tmp_path: Path) -> Path:
    """A SQLite storage in rollback-journal mode holding one study that is not the one asked for."""
    db = tmp_path / "store.db"
    optuna.create_study(storage=f"sqlite:///{db}", study_name="other")
    with sqlite3.connect(db) as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    return db


READERS = [
    ("status", ["status", "--study", "cnn"], "no study named 'cnn'"),
    ("finalize by file", ["finalize", "--study", "cnn"], "no study named 'cnn'"),
    ("finalize by name", ["finalize", "--study", "nosuch"], "no study named 'nosuch'"),
]


@pytest.mark.parametrize("what,args,words", READERS, ids=[r[0] for r in READERS])
def test_read_only_commands_change_nothing_in_a_storage_without_the_study(
    tmp_path: Path, other_study_db: Path, what, args, words
) -> None:
    before = snapshot(tmp_path)
    r = run_cli(*args, "--storage", f"sqlite:///{other_study_db}", cwd=tmp_path)
    assert_one_line_rejection(r, words)
    assert snapshot(tmp_path) == before  # no WAL switch, no -artifacts/, no report folder


@pytest.mark.parametrize("command", [["status", "--study", "cnn"], ["finalize", "--study", "cnn"],
                                     ["dashboard", "--port", "1"]])
def test_read_only_commands_create_no_tables_in_an_empty_database(tmp_path: Path, command) -> None:
    db = tmp_path / "empty.db"
    sqlite3.connect(db).close()
    before = snapshot(tmp_path)
    r = run_cli(*command, "--storage", f"sqlite:///{db}", cwd=tmp_path)
    assert_one_line_rejection(r, "holds no study yet")
    assert snapshot(tmp_path) == before


def test_dashboard_on_a_storage_without_studies_creates_no_artifact_folder(tmp_path: Path) -> None:
    db = tmp_path / "store.db"
    storage = optuna.storages.RDBStorage(f"sqlite:///{db}")
    storage.delete_study(storage.create_new_study([optuna.study.StudyDirection.MINIMIZE], "gone"))
    storage.engine.dispose()
    before = snapshot(tmp_path)
    r = run_cli("dashboard", "--storage", f"sqlite:///{db}", "--port", "1", cwd=tmp_path)
    assert_one_line_rejection(r, "holds no study yet")
    assert snapshot(tmp_path) == before


# --- postgresql:// means psycopg2 -----------------------------------------------------------------


@pytest.fixture
def empty_pg_db():
    """A fresh, empty PostgreSQL database on the local server; yields (user, name), dropped after."""
    user = getpass.getuser()
    admin = psycopg2.connect(host="127.0.0.1", port=5432, dbname="postgres", user=user, connect_timeout=5)
    admin.autocommit = True
    name = f"hpsearch_test_{secrets.token_hex(4)}"
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    yield user, name
    with admin.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.close()


def pg_tables(user: str, name: str) -> list[str]:
    with psycopg2.connect(host="127.0.0.1", port=5432, dbname=name, user=user) as con, con.cursor() as cur:
        cur.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        return [row[0] for row in cur.fetchall()]


@pytest.mark.postgres
@pytest.mark.parametrize("scheme,via_env", [("postgresql", False), ("postgres", True)])
def test_plain_postgresql_url_uses_psycopg2_and_status_creates_no_tables(tmp_path: Path, empty_pg_db, scheme,
                                                                         via_env) -> None:
    user, name = empty_pg_db
    url = f"{scheme}://{user}@127.0.0.1:5432/{name}"
    args, env = ([], {"HPSEARCH_STORAGE": url}) if via_env else (["--storage", url], {})
    r = run_cli("status", "--study", "cnn", *args, cwd=tmp_path, env=env)
    # It connected (psycopg2) and found no tables; it created none.
    assert_one_line_rejection(r, "holds no study yet", "postgresql+psycopg2://")
    assert pg_tables(user, name) == []


# --- shipped studies in an installed wheel ----------------------------------------------------------


def test_shipped_studies_are_found_in_an_installed_wheel_from_any_folder(tmp_path: Path) -> None:
    # Build the wheel as `pip install .` would, and put its contents first on the path in place of
    # the source checkout: `--study cnn` must find the study file inside the package.
    out = tmp_path / "dist"
    b = subprocess.run(["uv", "build", "--wheel", "-o", str(out), str(REPO)], capture_output=True, text=True,
                       timeout=300)
    assert b.returncode == 0, b.stderr
    site = tmp_path / "site"
    with zipfile.ZipFile(next(out.glob("hpsearch-*.whl"))) as whl:
        whl.extractall(site)
    assert (site / "hpsearch" / "studies" / "cnn.toml").is_file()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {"PYTHONPATH": str(site)}
    probe = run_cli("status", "--study", "cnn", cwd=elsewhere, env=env)
    # The study file loaded (from the wheel); only the storage is missing.
    assert_one_line_rejection(probe, "no study storage at hpsearch.db")
    where = subprocess.run(
        [sys.executable, "-c", "import hpsearch.config as c; print(c.resolve_study_path('cnn'))"],
        cwd=elsewhere, env={**os.environ, **env}, capture_output=True, text=True, timeout=120,
    )
    assert where.stdout.strip() == str(site / "hpsearch" / "studies" / "cnn.toml"), where.stderr


def test_finalize_records_the_commit_from_the_environment_without_git(tmp_path: Path) -> None:
    code = "from hpsearch.finalize import code_version; print(code_version())"
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "HPSEARCH_GIT_COMMIT": "0123456789abcdef0123"})
    assert r.stdout.strip().endswith("+g0123456789ab"), r.stdout + r.stderr

"""Storage URLs: the embedded SQLite file by default, PostgreSQL for many nodes.

`--storage URL` > `HPSEARCH_STORAGE` > `sqlite:///hpsearch.db` (in the current directory).
Checkpoints go to a file-system artifact store: beside the SQLite file, or `--artifacts DIR`
(`HPSEARCH_ARTIFACTS`), which must be a folder every worker can reach when they share PostgreSQL.
Passwords never leave this module unredacted.
"""

from __future__ import annotations

import os
import sqlite3
import warnings
from pathlib import Path

import optuna
import sqlalchemy
import sqlalchemy.exc
from optuna.artifacts import FileSystemArtifactStore
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

from hpsearch.config import StorageConfig
from hpsearch.errors import StorageError

DEFAULT_URL = "sqlite:///hpsearch.db"
ENV_STORAGE = "HPSEARCH_STORAGE"
ENV_ARTIFACTS = "HPSEARCH_ARTIFACTS"


def resolve_url(cli_value: str | None) -> str:
    return cli_value or os.environ.get(ENV_STORAGE) or DEFAULT_URL


def redact(url: str) -> str:
    """The URL with its password replaced by ***, for logs and errors."""
    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparseable storage URL>"


def _parse(url: str) -> sqlalchemy.engine.URL:
    try:
        parsed = sqlalchemy.engine.make_url(url)
    except Exception:
        raise StorageError(
            f"storage URL {redact(url)!r} is not a URL; use sqlite:///path/to/file.db or "
            f"postgresql+psycopg2://user:password@host:5432/dbname"
        ) from None
    if parsed.get_backend_name() not in {"sqlite", "postgresql"}:
        raise StorageError(
            f"storage URL {redact(url)!r}: unsupported database {parsed.get_backend_name()!r}; "
            f"use sqlite:///file.db or postgresql+psycopg2://..."
        )
    return parsed


def sqlite_path(url: str) -> Path | None:
    parsed = _parse(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    return Path(parsed.database)


def artifacts_dir(url: str, cli_value: str | None = None) -> Path:
    """Where checkpoints live: the option, the env var, or `<db name>-artifacts/` beside SQLite."""
    explicit = cli_value or os.environ.get(ENV_ARTIFACTS)
    if explicit:
        return Path(explicit)
    db = sqlite_path(url)
    if db is not None:
        return db.with_name(db.stem + "-artifacts")
    return Path("hpsearch-artifacts")


def artifact_store(url: str, cli_value: str | None = None) -> FileSystemArtifactStore:
    path = artifacts_dir(url, cli_value)
    path.mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(str(path))


def open_storage(
    url: str, cfg: StorageConfig | None = None, *, must_exist: bool = False
) -> RDBStorage:
    """An RDBStorage for `url`, with the heartbeat when a study config is given.

    `must_exist`: refuse to create a new SQLite file (for `status`, `finalize`, `dashboard`).
    """
    parsed = _parse(url)
    engine_kwargs: dict = {}
    if parsed.get_backend_name() == "sqlite":
        db = sqlite_path(url)
        if db is not None:
            if must_exist and not db.is_file():
                raise StorageError(
                    f"no study storage at {db}; start a search with `hpsearch worker` first, "
                    f"or pass --storage"
                )
            if not db.parent.exists():
                raise StorageError(f"folder {db.parent} for the SQLite storage does not exist")
            _enable_wal(db)
        # Several worker processes share the file: wait for a lock instead of failing at once.
        engine_kwargs["connect_args"] = {"timeout": 60}
    else:
        engine_kwargs.update(
            pool_pre_ping=True,  # a connection PostgreSQL dropped is replaced, not used
            pool_size=2,
            max_overflow=2,
            pool_recycle=300,
            connect_args={"connect_timeout": 10},
        )
    heartbeat: dict = {}
    if cfg is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            retry = RetryHeartbeatStaleTrialCallback(max_retry=cfg.max_retry, inherit_intermediate_values=True)
        heartbeat = dict(
            heartbeat_interval=cfg.heartbeat_interval,
            grace_period=cfg.grace_period,
            heartbeat_stale_trial_callback=retry,
        )
    try:
        return RDBStorage(url, engine_kwargs=engine_kwargs, **heartbeat)
    except (sqlalchemy.exc.SQLAlchemyError, sqlite3.Error) as e:
        reason = str(getattr(e, "orig", e)).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StorageError(f"cannot open storage {redact(url)}: {redact_text(reason, url)}") from None


def redact_text(text: str, url: str) -> str:
    password = _parse(url).password
    return text.replace(str(password), "***") if password else text


def _enable_wal(db: Path) -> None:
    """Write-ahead logging lets readers (status, dashboard) work while workers write."""
    try:
        with sqlite3.connect(db, timeout=60) as con:
            con.execute("PRAGMA journal_mode=WAL")
    except sqlite3.Error as e:
        raise StorageError(f"cannot open SQLite storage {db}: {e}") from None


def study_names(storage: RDBStorage) -> list[str]:
    return sorted(s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False))

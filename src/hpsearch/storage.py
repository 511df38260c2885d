"""Storage URLs: the embedded SQLite file by default, PostgreSQL for many nodes.

`--storage URL` > `HPSEARCH_STORAGE` > `sqlite:///hpsearch.db` (in the current directory).
Checkpoints go to a file-system artifact store: beside the SQLite file, or `--artifacts DIR`
(`HPSEARCH_ARTIFACTS`), which must be a folder every worker can reach when they share PostgreSQL.
Passwords never leave this module unredacted.

Database trouble during a search (PostgreSQL restarted, a connection dropped, a SQLite lock held
too long) is waited out: every storage call retries with back-off for up to
`[storage] reconnect_timeout` seconds and logs that it does (`ReconnectingRDBStorage`). Trouble at
start (a wrong URL, a server that is not there) is a one-line `StorageError` at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import inspect
import logging
import os
import sqlite3
import threading
import time
import warnings
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
import sqlalchemy.exc
from optuna.artifacts import FileSystemArtifactStore
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages._rdb import models as rdb_models
from optuna.storages._rdb.storage import _create_scoped_session

from hpsearch.config import StorageConfig
from hpsearch.errors import StorageError

DEFAULT_URL = "sqlite:///hpsearch.db"
ENV_STORAGE = "HPSEARCH_STORAGE"
ENV_ARTIFACTS = "HPSEARCH_ARTIFACTS"

log = logging.getLogger("hpsearch.storage")


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


def artifact_store(url: str, cli_value: str | None = None, *, create: bool = True) -> FileSystemArtifactStore:
    """The checkpoint store; `create=False` (readers such as the dashboard) leaves a missing
    folder missing: reading from it finds no artifact until a worker creates it."""
    path = artifacts_dir(url, cli_value)
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(str(path))


def open_storage(
    url: str, cfg: StorageConfig | None = None, *, must_exist: bool = False
) -> RDBStorage:
    """An RDBStorage for `url`, with the heartbeat when a study config is given.

    `must_exist` (for `status`, `finalize`, `dashboard`): open only a storage that already holds
    Optuna's tables, and change nothing on the way in (no new file, no tables, no WAL switch).
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
            if not must_exist:  # WAL is a property of the file: the workers that create it set it
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
    if must_exist:
        _require_tables(parsed, url, engine_kwargs)
    try:
        with _schema_lock(parsed, engine_kwargs, creating=not must_exist), warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat args
            storage = ReconnectingRDBStorage(url, engine_kwargs=engine_kwargs, **heartbeat)
    except (sqlalchemy.exc.SQLAlchemyError, sqlite3.Error) as e:
        raise StorageError(
            f"cannot open storage {redact(url)}: {_reason(e, url)} "
            f"(check --storage / ${ENV_STORAGE} and that the database server is up)"
        ) from None
    # Only now: a storage that cannot be opened at all is the user's to fix, not to wait for.
    storage.start_reconnecting(url, cfg.reconnect_timeout if cfg is not None else 0.0)
    return storage


def _require_tables(parsed: sqlalchemy.engine.URL, url: str, engine_kwargs: dict) -> None:
    """Refuse a database without Optuna's tables: RDBStorage would create them, and a reader
    (status, finalize, dashboard) must not write."""
    engine = sqlalchemy.create_engine(parsed, poolclass=sqlalchemy.pool.NullPool,
                                      connect_args=engine_kwargs.get("connect_args", {}))
    try:
        with engine.connect() as con:
            found = sqlalchemy.inspect(con).has_table(rdb_models.StudyModel.__tablename__)
    except (sqlalchemy.exc.SQLAlchemyError, sqlite3.Error) as e:
        raise StorageError(
            f"cannot open storage {redact(url)}: {_reason(e, url)} "
            f"(check --storage / ${ENV_STORAGE} and that the database server is up)"
        ) from None
    finally:
        engine.dispose()
    if not found:
        raise StorageError(
            f"storage {redact(url)} holds no study yet (no Optuna tables); start a search with "
            f"`hpsearch worker` first, or pass the --storage that has it"
        )


# Any fixed 64-bit number, the same in every hpsearch process: the advisory lock's name.
_SCHEMA_LOCK_KEY = zlib.crc32(b"hpsearch: optuna schema")


@contextlib.contextmanager
def _schema_lock(parsed: sqlalchemy.engine.URL, engine_kwargs: dict, creating: bool = True):
    """Hold a PostgreSQL advisory lock while Optuna creates or checks its tables.

    Workers started together on an empty database would otherwise race to create the same tables
    and all but one would fail ("relation alembic_version already exists"). The lock belongs to
    the session: a process that dies holding it releases it. For SQLite the same race exists
    ("table trial_user_attributes already exists"), so an flock on `<db>.lock` beside the file
    serialises it; the kernel releases it when a process dies, too. Readers of an existing file
    (`creating=False`: status, finalize, dashboard) need no lock and leave no lock file behind.
    """
    if parsed.get_backend_name() == "sqlite":
        db = Path(parsed.database) if parsed.database and parsed.database != ":memory:" else None
        if db is None or not creating:
            yield
            return
        with open(db.with_name(db.name + ".lock"), "a") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)
        return
    engine = sqlalchemy.create_engine(parsed, poolclass=sqlalchemy.pool.NullPool,
                                      connect_args=engine_kwargs.get("connect_args", {}))
    try:
        with engine.connect() as con:
            con.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": _SCHEMA_LOCK_KEY})
            try:
                yield
            finally:
                con.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": _SCHEMA_LOCK_KEY})
    finally:
        engine.dispose()


def _reason(e: BaseException, url: str) -> str:
    """The first line of the driver's message (not SQLAlchemy's wrapping), password removed."""
    inner = e
    while inner.__cause__ is not None and not isinstance(inner, (sqlalchemy.exc.DBAPIError, sqlite3.Error)):
        inner = inner.__cause__
    inner = getattr(inner, "orig", None) or inner
    text = str(inner).strip()
    line = text.splitlines()[0] if text else type(inner).__name__
    return redact_text(line, url)


def _connection_trouble(e: BaseException) -> bool:
    """True for errors that mean "the database is not there right now", wherever in the chain.

    Optuna wraps errors raised inside a session in `StorageInternalError`, so the cause is looked
    up. Integrity errors, bad SQL and the like are not retried: waiting would not fix them.
    """
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError,
                            sqlalchemy.exc.DisconnectionError, sqlite3.OperationalError)):
            return True
        if isinstance(cur, sqlalchemy.exc.DBAPIError) and cur.connection_invalidated:
            return True
        if _psycopg2 is not None and isinstance(cur, (_psycopg2.OperationalError, _psycopg2.InterfaceError)):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


try:  # the PostgreSQL driver; a SQLite-only install may lack it
    import psycopg2 as _psycopg2
except ImportError:  # pragma: no cover
    _psycopg2 = None


FIRST_DELAY_S = 0.5
MAX_DELAY_S = 15.0


class ReconnectingRDBStorage(RDBStorage):
    """`RDBStorage` whose calls wait out a database that went away, with back-off and a log line.

    Every storage call Optuna makes (ask, tell, report, attributes, the stale-trial sweep) goes
    through here, so one wrapper covers the worker loop and the objective alike. Retrying is safe
    because a call that failed on a broken connection was rolled back by the server; the one
    ambiguous case is a connection lost while COMMIT itself was in flight, where the retry can
    repeat a write that did land (a trial created twice, for instance) - rare, and the README
    says so. The heartbeat is not retried: a missed beat is simply written at the next interval.
    """

    _url: str = ""
    _reconnect_timeout: float = 0.0  # 0: not yet (during __init__), errors go straight up
    _local = threading.local()

    def start_reconnecting(self, url: str, timeout: float) -> None:
        self._url = url
        self._reconnect_timeout = timeout

    def _call_with_retry(self, name: str, method, *args, **kwargs):
        # Nested calls (one storage method using another) retry once, at the outermost level.
        if self._reconnect_timeout <= 0 or getattr(self._local, "depth", 0) > 0:
            return method(self, *args, **kwargs)
        start = time.monotonic()
        delay = FIRST_DELAY_S
        attempts = 0
        while True:
            self._local.depth = 1
            try:
                result = method(self, *args, **kwargs)
            except Exception as e:
                if not _connection_trouble(e):
                    raise
                attempts += 1
                waited = time.monotonic() - start
                reason = _reason(e, self._url)
                if waited + delay > self._reconnect_timeout:
                    raise StorageError(
                        f"storage {redact(self._url)} unreachable for {waited:.0f} s ({reason}); "
                        f"gave up after [storage] reconnect_timeout = {self._reconnect_timeout:g} s. "
                        f"Check the database, then start the worker again: its trial resumes"
                    ) from None
                log.warning(
                    "storage %s unreachable (%s); retrying %s in %.1f s (attempt %d, %.1f s so far)",
                    redact(self._url), reason, name, delay, attempts, waited,
                )
                time.sleep(delay)
                delay = min(delay * 2, MAX_DELAY_S)
                continue
            finally:
                self._local.depth = 0
            if attempts:
                log.warning(
                    "storage %s is back after %.1f s (%d retries of %s)",
                    redact(self._url), time.monotonic() - start, attempts, name,
                )
            return result

    def set_trial_user_attrs(self, trial_id: int, attrs: Mapping[str, Any]) -> None:
        """Several user attributes in one transaction. Optuna commits once per attribute (a few
        ms each on PostgreSQL, with the server's fsync) and a trial sets about twenty."""

        def write(storage: ReconnectingRDBStorage, trial_id: int, attrs: Mapping[str, Any]) -> None:
            with _create_scoped_session(storage.scoped_session, True) as session:
                for key, value in attrs.items():
                    storage._set_trial_attr_without_commit(
                        session, rdb_models.TrialUserAttributeModel, trial_id, key, value)

        self._call_with_retry("set_trial_user_attrs", write, trial_id, attrs)

    def record_heartbeat(self, trial_id: int) -> None:
        # The heartbeat thread: a beat lost to an outage is written again one interval later. It
        # must not die (Optuna's thread would), or the trial would look dead once the grace
        # period passes although it is training.
        try:
            super().record_heartbeat(trial_id)
        except Exception as e:
            if not _connection_trouble(e):
                raise
            log.warning("heartbeat of trial id %d not written (%s); next try in %s s",
                        trial_id, _reason(e, self._url), self.heartbeat_interval)


def _retrying(name: str, method):
    @functools.wraps(method)
    def wrapper(self: ReconnectingRDBStorage, *args, **kwargs):
        return self._call_with_retry(name, method, *args, **kwargs)

    return wrapper


_NOT_RETRIED = {
    "record_heartbeat", "remove_session", "upgrade", "get_current_version", "get_head_version",
    "get_all_versions", "get_heartbeat_interval", "get_heartbeat_stale_trial_callback",
    "_build_frozen_trial_from_trial_model",
}
# Every RDBStorage method that opens its own session (Optuna's cache calls some private ones,
# such as `_get_trials`). Helpers handed an open `session` belong to their caller's retry.
for _name, _fn in list(vars(RDBStorage).items()):
    if (
        inspect.isfunction(_fn) and not _name.startswith("__") and _name not in _NOT_RETRIED
        and "session" not in inspect.signature(_fn).parameters
    ):
        setattr(ReconnectingRDBStorage, _name, _retrying(_name, _fn))


def set_user_attrs(trial: optuna.Trial, attrs: Mapping[str, Any]) -> None:
    """`trial.set_user_attr(k, v)` for every item, in one transaction on hpsearch's storages."""
    backend = getattr(trial.storage, "_backend", trial.storage)  # Optuna caches RDB storages
    if not isinstance(backend, ReconnectingRDBStorage):
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        return
    backend.set_trial_user_attrs(trial._trial_id, attrs)
    trial._cached_frozen_trial.user_attrs.update(attrs)  # as Trial.set_user_attr does after writing


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

"""Storage URLs: the embedded SQLite file by default, PostgreSQL for many nodes.

`--storage URL` > `HPSEARCH_STORAGE` > `sqlite:///hpsearch.db` (in the current directory).
Checkpoints go to a file-system artifact store: beside the SQLite file, or `--artifacts DIR`
(`HPSEARCH_ARTIFACTS`), which must be a folder every worker can reach when they share PostgreSQL.
Passwords never leave this module unredacted.

Every command reaches the storage through `RetryingStorage`, which delegates to any Optuna
storage (`RDBStorage` behind Optuna's cache, or `GrpcStorageProxy` for `grpc://host:port`, an
`hpsearch proxy`) by its public methods only. Database trouble during a search (PostgreSQL
restarted, a connection dropped, a SQLite lock held too long, the proxy restarting) is waited out:
every call retries with back-off for up to `[storage] reconnect_timeout` seconds, logs that it
does, and stops waiting at once when the worker is asked to stop. Trouble at start (a wrong URL, a
server that is not there) is a one-line `StorageError` at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sqlite3
import time
import warnings
import zlib
from collections.abc import Container, Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
import sqlalchemy.exc
from optuna.artifacts import FileSystemArtifactStore
from optuna.distributions import BaseDistribution
from optuna.storages import BaseStorage, GrpcStorageProxy, RDBStorage, get_storage
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

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
    if parsed.get_backend_name() not in {"sqlite", "postgresql", "grpc"}:
        raise StorageError(
            f"storage URL {redact(url)!r}: unsupported database {parsed.get_backend_name()!r}; "
            f"use sqlite:///file.db, postgresql+psycopg2://... or grpc://host:port (an hpsearch proxy)"
        )
    return parsed


def backend_name(url: str) -> str:
    """sqlite, postgresql or grpc; a one-line StorageError for anything else."""
    return _parse(url).get_backend_name()


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
    url: str, cfg: StorageConfig | None = None, *, must_exist: bool = False, stop: Any = None,
    **pool: int,
) -> RetryingStorage:
    """The storage at `url` (SQLite, PostgreSQL, or an hpsearch proxy at grpc://host:port),
    retrying outages for `[storage] reconnect_timeout` seconds when a study config is given.

    `must_exist` (for `status`, `finalize`, `dashboard`): open only a storage that already holds
    Optuna's tables, and change nothing on the way in (no new file, no tables, no WAL switch).
    `stop`: a StopRequest that ends every wait for the storage (the worker's).
    `pool`: pool_size / max_overflow of the database connections (threads sharing one storage).
    """
    parsed = _parse(url)
    timeout = cfg.reconnect_timeout if cfg is not None else 0.0
    if parsed.get_backend_name() == "grpc":
        storage = RetryingStorage(_open_proxy(url, parsed), url, timeout, stop)
        return storage
    rdb = open_rdb(url, must_exist=must_exist, **pool)
    # Optuna's cache in front of the database (get_storage), as every Optuna study uses it: a
    # study's finished trials are read from the database once, not at every ask.
    storage = RetryingStorage(get_storage(rdb), url, timeout, stop)
    storage.rdb = rdb
    return storage


def open_rdb(url: str, *, must_exist: bool = False, pool_size: int = 2, max_overflow: int = 2) -> RDBStorage:
    """An RDBStorage for `url`: the tables made (under a lock) or checked; one-line errors."""
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
            pool_size=pool_size,  # per process: a worker needs one or two, the proxy more
            max_overflow=max_overflow,
            pool_recycle=300,
            connect_args={"connect_timeout": 10},
        )
    if must_exist:
        _require_tables(parsed, url, engine_kwargs)
    try:
        with _schema_lock(parsed, engine_kwargs, creating=not must_exist):
            return RDBStorage(url, engine_kwargs=engine_kwargs, skip_table_creation=must_exist)
    except optuna.exceptions.StorageInternalError:
        raise StorageError(
            f"storage {redact(url)} holds no Optuna study tables; start a search with `hpsearch worker` "
            f"first, or pass the --storage that has it"
        ) from None
    except (sqlalchemy.exc.SQLAlchemyError, sqlite3.Error) as e:
        raise StorageError(
            f"cannot open storage {redact(url)}: {_reason(e, url)} "
            f"(check --storage / ${ENV_STORAGE} and that the database server is up)"
        ) from None


PROXY_READY_S = 10.0


def _open_proxy(url: str, parsed: sqlalchemy.engine.URL) -> GrpcStorageProxy:
    if not parsed.host or not parsed.port or parsed.database:
        raise StorageError(f"storage URL {redact(url)!r}: a proxy is grpc://host:port (no path), "
                           f"for example grpc://localhost:13000")
    if _grpc is None:  # pragma: no cover
        raise StorageError("grpc:// storages need the grpcio package; install hpsearch with its dependencies")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        proxy = GrpcStorageProxy(host=parsed.host, port=parsed.port)
    try:
        proxy.wait_server_ready(timeout=PROXY_READY_S)
    except ConnectionError:
        proxy.close()
        raise StorageError(
            f"no hpsearch proxy answers at {redact(url)} within {PROXY_READY_S:g} s; start one with "
            f"`hpsearch proxy --storage postgresql+psycopg2://...` or check --storage / ${ENV_STORAGE}"
        ) from None
    return proxy


def _require_tables(parsed: sqlalchemy.engine.URL, url: str, engine_kwargs: dict) -> None:
    """Refuse an empty database: RDBStorage would create Optuna's tables in it, and a reader
    (status, finalize, dashboard) must not write. (A database with other tables is opened with
    `skip_table_creation`, and Optuna's schema check refuses it.)"""
    engine = sqlalchemy.create_engine(parsed, poolclass=sqlalchemy.pool.NullPool,
                                      connect_args=engine_kwargs.get("connect_args", {}))
    try:
        with engine.connect() as con:
            found = bool(sqlalchemy.inspect(con).get_table_names())
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
    if _grpc is not None and isinstance(e, _grpc.RpcError) and callable(getattr(e, "code", None)):
        return redact_text(f"{e.code().name}: {e.details()}", url)
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


def _grpc_trouble(e: BaseException) -> bool:
    """A gRPC proxy that is not there right now (restarting, network): worth waiting for."""
    if _grpc is None or not isinstance(e, _grpc.RpcError):
        return False
    code = e.code() if callable(getattr(e, "code", None)) else None
    return code in (_grpc.StatusCode.UNAVAILABLE, _grpc.StatusCode.DEADLINE_EXCEEDED)


try:  # the gRPC client, for grpc:// storages
    import grpc as _grpc
except ImportError:  # pragma: no cover
    _grpc = None


class StorageStopped(StorageError):
    """The worker was asked to stop while it waited for the storage to come back."""


class RetryingStorage(BaseStorage):
    """Any Optuna storage (RDB, gRPC proxy, in-memory) through its public methods, waiting out
    outages.

    A call that fails because the database or the proxy is not there right now is retried with
    back-off for up to `timeout` seconds, logging that it does; each wait ends at once when the
    worker is asked to stop (`stop`, a `StopRequest`). Errors that waiting cannot fix go straight
    up. Retrying is safe because every write hpsearch makes is idempotent (attributes, params and
    intermediate values are keyed upserts) or checked: a state change whose commit landed before
    the connection broke is found on the retry (the trial is already in that state with those
    values) and counts as done, and so does a study that the first attempt created. The one write
    that a retry can repeat is creating a trial; the copy is RUNNING without a lease and the sweep
    fails and re-queues it (recovery.py), so the budget stays exact.
    """

    def __init__(self, backend: BaseStorage, url: str, timeout: float = 0.0, stop: Any = None) -> None:
        self.backend = backend
        self.url = url
        self.timeout = timeout  # 0: no retries (opening, read-only commands)
        self.stop = stop  # a hpsearch.signals.StopRequest, or None

    # --- the retry loop -------------------------------------------------------------------
    def _call(self, name: str, *args: Any, landed: Any = None, **kwargs: Any) -> Any:
        """`backend.name(*args)`, retried on connection trouble. `landed(error)` is asked, after a
        retry only, whether an error means the first attempt's write did land; it returns the
        result to give back, or raises."""
        method = getattr(self.backend, name)
        start = time.monotonic()
        delay = FIRST_DELAY_S
        attempts = 0
        while True:
            try:
                result = method(*args, **kwargs)
            except Exception as e:
                if attempts and landed is not None and not _trouble(e):
                    return landed(e)
                if not _trouble(e) or self.timeout <= 0:
                    raise
                attempts += 1
                waited = time.monotonic() - start
                reason = _reason(e, self.url)
                if waited + delay > self.timeout:
                    raise StorageError(
                        f"storage {redact(self.url)} unreachable for {waited:.0f} s ({reason}); "
                        f"gave up after [storage] reconnect_timeout = {self.timeout:g} s. "
                        f"Check the database, then start the worker again: its trial resumes"
                    ) from None
                log.warning("storage %s unreachable (%s); retrying %s in %.1f s (attempt %d, %.1f s so far)",
                            redact(self.url), reason, name, delay, attempts, waited)
                if self._wait(delay):
                    raise StorageStopped(
                        f"stopped while waiting for storage {redact(self.url)} ({reason}); the running "
                        f"trial, if any, is re-queued by the next worker once its lease expires"
                    ) from None
                delay = min(delay * 2, MAX_DELAY_S)
                continue
            if attempts:
                log.warning("storage %s is back after %.1f s (%d retries of %s)",
                            redact(self.url), time.monotonic() - start, attempts, name)
            return result

    def _wait(self, seconds: float) -> bool:
        if self.stop is not None:
            return self.stop.wait(seconds)
        time.sleep(seconds)
        return False

    # --- writes whose retry may find them done --------------------------------------------
    def create_new_study(self, directions: Sequence[StudyDirection], study_name: str | None = None) -> int:
        def landed(e: Exception) -> int:
            if isinstance(e, optuna.exceptions.DuplicatedStudyError) and study_name is not None:
                return self.backend.get_study_id_from_name(study_name)
            raise e

        return self._call("create_new_study", directions, study_name, landed=landed)

    def set_trial_state_values(self, trial_id: int, state: TrialState,
                               values: Sequence[float] | None = None) -> bool:
        def landed(e: Exception) -> bool:
            if isinstance(e, optuna.exceptions.UpdateFinishedTrialError):
                now = self.backend.get_trial(trial_id)
                if now.state == state and (values is None or list(now.values or []) == list(values)):
                    log.warning("trial id %d: the %s written before the connection broke had landed",
                                trial_id, state.name)
                    return True
            raise e

        return self._call("set_trial_state_values", trial_id, state, values, landed=landed)

    def record_lease(self, trial_id: int, key: str, value: Any) -> bool:
        """One write, not retried (a lost beat is written at the next interval); False if lost."""
        try:
            self.backend.set_trial_system_attr(trial_id, key, value)
            return True
        except Exception as e:
            if not _trouble(e):
                raise
            log.warning("lease of trial id %d not written (%s); next try at the next beat",
                        trial_id, _reason(e, self.url))
            return False

    # --- everything else: plain delegation with retries -----------------------------------
    def delete_study(self, study_id: int) -> None:
        self._call("delete_study", study_id)

    def set_study_user_attr(self, study_id: int, key: str, value: Any) -> None:
        self._call("set_study_user_attr", study_id, key, value)

    def set_study_system_attr(self, study_id: int, key: str, value: Any) -> None:
        self._call("set_study_system_attr", study_id, key, value)

    def get_study_id_from_name(self, study_name: str) -> int:
        return self._call("get_study_id_from_name", study_name)

    def get_study_name_from_id(self, study_id: int) -> str:
        return self._call("get_study_name_from_id", study_id)

    def get_study_directions(self, study_id: int) -> list[StudyDirection]:
        return self._call("get_study_directions", study_id)

    def get_study_user_attrs(self, study_id: int) -> dict[str, Any]:
        return self._call("get_study_user_attrs", study_id)

    def get_study_system_attrs(self, study_id: int) -> dict[str, Any]:
        return self._call("get_study_system_attrs", study_id)

    def get_all_studies(self) -> list[Any]:
        return self._call("get_all_studies")

    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        return self._call("create_new_trial", study_id, template_trial)

    def set_trial_param(self, trial_id: int, param_name: str, param_value_internal: float,
                        distribution: BaseDistribution) -> None:
        self._call("set_trial_param", trial_id, param_name, param_value_internal, distribution)

    def get_trial_id_from_study_id_trial_number(self, study_id: int, trial_number: int) -> int:
        return self._call("get_trial_id_from_study_id_trial_number", study_id, trial_number)

    def set_trial_intermediate_value(self, trial_id: int, step: int, intermediate_value: float) -> None:
        self._call("set_trial_intermediate_value", trial_id, step, intermediate_value)

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._call("set_trial_user_attr", trial_id, key, value)

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._call("set_trial_system_attr", trial_id, key, value)

    def get_trial(self, trial_id: int) -> FrozenTrial:
        return self._call("get_trial", trial_id)

    def get_all_trials(self, study_id: int, deepcopy: bool = True,
                       states: Container[TrialState] | None = None) -> list[FrozenTrial]:
        return self._call("get_all_trials", study_id, deepcopy=deepcopy, states=states)

    def get_n_trials(self, study_id: int, state: tuple[TrialState, ...] | TrialState | None = None) -> int:
        return self._call("get_n_trials", study_id, state)

    def remove_session(self) -> None:
        self.backend.remove_session()

    def close(self) -> None:
        """Give back the connections (a gRPC channel, an engine's pool)."""
        if isinstance(self.backend, GrpcStorageProxy):
            self.backend.close()
        elif self.rdb is not None:
            self.rdb.engine.dispose()

    rdb: RDBStorage | None = None  # the RDBStorage underneath, when there is one

    @property
    def engine(self) -> sqlalchemy.engine.Engine:
        """The database engine (for hpsearch's own tables); not there through a proxy."""
        if self.rdb is None:
            raise AttributeError(f"storage {redact(self.url)} has no database engine here (a proxy)")
        return self.rdb.engine


def delegating(base: type, name: str, also: Sequence[str] = ()) -> type:
    """`base` (a partial `BaseStorage` holding the storage it wraps in `self.inner`) made whole:
    every abstract method of Optuna's storage interface it does not define, and the methods named
    in `also`, call the same method of `inner`. One that a future Optuna adds is delegated too,
    rather than left abstract."""

    def delegate(name: str) -> Any:
        def method(self: Any, *args: Any, **kwargs: Any) -> Any:
            return getattr(self.inner, name)(*args, **kwargs)

        method.__name__ = name
        return method

    names = sorted(set(BaseStorage.__abstractmethods__) | set(also))
    return type(name, (base,), {
        "__module__": base.__module__, **{n: delegate(n) for n in names if n not in base.__dict__}})


def _trouble(e: BaseException) -> bool:
    return _connection_trouble(e) or _grpc_trouble(e)


def set_user_attrs(trial: optuna.Trial, attrs: Mapping[str, Any]) -> None:
    """`trial.set_user_attr(k, v)` for every item (one upsert each, through the public API)."""
    for key, value in attrs.items():
        trial.set_user_attr(key, value)


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


def study_names(storage: BaseStorage) -> list[str]:
    """The studies in the storage, without hpsearch's claim markers (claims.py)."""
    from hpsearch.claims import is_marker

    return sorted(s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)
                  if not is_marker(s.study_name))

"""Checks of the command line and environment that run before the storage is opened.

A wrong `--device`, an artifact folder nobody can write, or a storage URL whose driver is not
installed must be one line and exit code 2, and must not leave a study (or a file) behind: these
checks run before `open_storage`, and write nothing themselves.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import sqlalchemy

from hpsearch.errors import HpsearchError, StorageError

# The PostgreSQL driver hpsearch ships with. SQLAlchemy 2.1 maps a bare `postgresql://` to psycopg
# (version 3), which hpsearch does not install: the URL most people type means psycopg2 here.
PG_DRIVER = "psycopg2"
_PG_ALIASES = ("postgresql://", "postgres://")
_EXAMPLES = ("sqlite:///path/to/file.db, postgresql://user:password@host:5432/dbname or "
             "grpc://host:13000 (an `hpsearch proxy`)")


def _proxy_url(url: str) -> str:
    """grpc://HOST:PORT, an `hpsearch proxy`: a host, a numeric port, nothing else."""
    from hpsearch.storage import redact

    try:
        parsed = sqlalchemy.engine.make_url(url)
        ok = bool(parsed.host) and parsed.port is not None and not parsed.database and not parsed.username
    except Exception:
        ok = False
    if not ok:
        raise StorageError(f"storage URL {redact(url)!r}: a proxy is grpc://HOST:PORT (no user, no path), "
                           f"for example grpc://localhost:13000")
    return url


def storage_url(url: str) -> str:
    """`url` with `postgresql://`/`postgres://` meaning psycopg2, checked for a usable driver.

    Raises `StorageError` (one line) for a malformed URL, a database other than SQLite/PostgreSQL,
    or a driver that is asynchronous or not installed. Connects to nothing.
    """
    from hpsearch.storage import redact

    given = url
    if url.startswith("grpc://"):
        return _proxy_url(url)
    for alias in _PG_ALIASES:
        if url.startswith(alias):
            url = f"postgresql+{PG_DRIVER}://" + url.removeprefix(alias)
            break
    try:
        parsed = sqlalchemy.engine.make_url(url)
        dialect = parsed.get_dialect()
    except sqlalchemy.exc.NoSuchModuleError:
        raise StorageError(
            f"storage URL {redact(url)!r} names an unknown database or driver; use {_EXAMPLES}"
        ) from None
    except Exception:
        # Not the URL itself: a malformed one may hold a password that redact cannot find.
        scheme = given.partition("://")[0] if "://" in given else ""
        what = f"storage URL starting {scheme + '://'!r}" if scheme else "storage URL"
        raise StorageError(
            f"{what} is not a URL (check the host, a numeric port and the database name); "
            f"use {_EXAMPLES}"
        ) from None
    backend = parsed.get_backend_name()
    if backend not in {"sqlite", "postgresql"}:
        raise StorageError(
            f"storage URL {redact(url)!r}: unsupported database {backend!r} (hpsearch stores studies "
            f"in SQLite or PostgreSQL); use {_EXAMPLES}"
        )
    fix = "sqlite:///file.db" if backend == "sqlite" else f"postgresql+{PG_DRIVER}://... (installed)"
    if getattr(dialect, "is_async", False):
        raise StorageError(
            f"storage URL {redact(url)!r}: driver {dialect.driver!r} is asynchronous, which Optuna "
            f"cannot use; use {fix}"
        )
    try:
        dialect.import_dbapi()
    except ImportError:
        raise StorageError(
            f"storage URL {redact(url)!r}: database driver {dialect.driver!r} is not installed; "
            f"use {fix}"
        ) from None
    if backend == "sqlite" and parsed.database and parsed.database != ":memory:":
        db = Path(parsed.database)
        if db.exists() and not db.is_file():
            raise StorageError(f"SQLite storage {db} is a folder, not a file; name a .db file in it")
        if not db.parent.is_dir():
            raise StorageError(f"folder {db.parent} for the SQLite storage {db} does not exist; create it first")
    return url


def writable_folder(path: Path, what: str) -> Path:
    """Check that `path` is a folder this process can write to, or can be created as one.

    Nothing is left behind: an existing folder is probed with a temporary file that is removed at
    once, a missing one through its nearest existing parent (which must be a writable folder). As
    root, permission bits say little (read-only mounts, /proc), so the probe writes for real.
    """
    path = path.expanduser()
    if path.exists() and not path.is_dir():
        raise HpsearchError(f"{what} {path} is a file, not a folder; pass a folder")
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise HpsearchError(f"{what} {path} cannot be created: {probe} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=probe, prefix=".hpsearch-probe-"):
            pass
    except OSError as e:
        where = "" if probe == path else f" (its parent {probe} is not writable)"
        raise HpsearchError(
            f"{what} {path} is not writable{where}: {e.strerror or e}; pass a folder you can write to"
        ) from None
    return path


def device(name: str) -> None:
    """Check `--device` (one line for a bad one); the worker resolves it again when it starts."""
    from hpsearch.worker import resolve_device

    resolve_device(name)


def artifacts(url: str, cli_value: str | None) -> Path:
    """The artifact folder the command will use (`--artifacts`, `$HPSEARCH_ARTIFACTS` or beside
    the SQLite file), checked to be writable before the study is created."""
    from hpsearch.storage import ENV_ARTIFACTS, artifacts_dir

    source = "--artifacts" if cli_value else (f"${ENV_ARTIFACTS}" if os.environ.get(ENV_ARTIFACTS) else None)
    what = f"artifact folder ({source})" if source else "artifact folder"
    return writable_folder(artifacts_dir(url, cli_value), what)

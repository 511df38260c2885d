"""Real storages for tests, in the way Optuna's own tests supply them (optuna.testing.storages):
a SQLite file, a fresh PostgreSQL database, and an `hpsearch proxy` process in front of one.

Also `FlakyStorage`: a real `BaseStorage` around another one that breaks the connection on the
calls a test names, before or after the call has done its work.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import secrets
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg2
import pytest
import sqlalchemy.exc
from optuna.storages import BaseStorage

from conftest import hpsearch_cmd

HOST, PORT = "127.0.0.1", 5432
STORAGE_KINDS = ["sqlite", "postgresql", "grpc"]


def admin_connection():
    """A connection to the `postgres` database as this OS user, else as `postgres`."""
    errors = []
    for user in dict.fromkeys([getpass.getuser(), "postgres"]):
        try:
            con = psycopg2.connect(host=HOST, port=PORT, dbname="postgres", user=user, connect_timeout=5)
            con.autocommit = True
            return con, user
        except psycopg2.OperationalError as e:
            errors.append(f"{user}: {str(e).strip().splitlines()[0]}")
    pytest.fail(f"PostgreSQL on {HOST}:{PORT} is needed for these tests ({'; '.join(errors)})")


@contextlib.contextmanager
def pg_database() -> Iterator[str]:
    """A new, randomly named database on the shared server; dropped afterwards."""
    con, user = admin_connection()
    name = f"hpsearch_test_{secrets.token_hex(4)}"
    with con.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    con.close()
    try:
        yield f"postgresql+psycopg2://{user}@{HOST}:{PORT}/{name}"
    finally:
        con, _ = admin_connection()
        with con.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        con.close()


def pg_connections(url: str) -> int:
    """Connections open to the database of `url` (pg_stat_activity)."""
    con, _ = admin_connection()
    with con.cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (url.rsplit("/", 1)[1],))
        n = cur.fetchone()[0]
    con.close()
    return n


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proxy:
    """`hpsearch proxy` in front of `backend_url`, as a real process; restartable on its port."""

    def __init__(self, backend_url: str, log: Path, port: int | None = None, args: tuple[str, ...] = ()) -> None:
        self.backend_url = backend_url
        self.args = args  # more options of `hpsearch proxy`
        self.port = port or free_port()
        self.url = f"grpc://127.0.0.1:{self.port}"
        self.log = log
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Proxy":
        env = {k: v for k, v in os.environ.items() if not k.startswith("HPSEARCH_")}
        with open(self.log, "a") as out:
            self.proc = subprocess.Popen(
                hpsearch_cmd("proxy", "--storage", self.backend_url, "--port", str(self.port), *self.args),
                env={**env, "PYTHONUNBUFFERED": "1"}, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"hpsearch proxy exited with {self.proc.returncode}:\n{self.log.read_text()}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.1)
        pytest.fail(f"hpsearch proxy did not listen within 60 s:\n{self.log.read_text()}")

    def stop(self, sig: int | None = None) -> None:
        if self.proc is not None and self.proc.poll() is None:
            if sig is None:
                self.proc.terminate()
            else:
                self.proc.send_signal(sig)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def broken_connection() -> Exception:
    """What SQLAlchemy raises when PostgreSQL drops the connection mid-statement."""
    return sqlalchemy.exc.OperationalError(
        "COMMIT", {}, Exception("server closed the connection unexpectedly"))


class FlakyStorage(BaseStorage):
    """`inner` (any storage), except that the calls named in `fail` raise a broken connection:
    `fail = {"set_trial_state_values": ("after", 1)}` makes the first such call do its work and
    then raise, as a COMMIT that landed on a connection that broke before the answer came back;
    "before" raises without doing it. `calls` counts every call by name."""

    def __init__(self, inner: BaseStorage, fail: dict[str, tuple[str, int]] | None = None) -> None:
        self.inner = inner
        self.fail = dict(fail or {})
        self.calls: Counter[str] = Counter()

    def _do(self, name: str, *args: Any, **kwargs: Any) -> Any:
        self.calls[name] += 1
        when, times = self.fail.get(name, ("", 0))
        if times and when == "before":
            self.fail[name] = (when, times - 1)
            raise broken_connection()
        result = getattr(self.inner, name)(*args, **kwargs)
        if times and when == "after":
            self.fail[name] = (when, times - 1)
            raise broken_connection()
        return result

    def __getattribute__(self, name: str) -> Any:
        # Every public BaseStorage method goes through `_do`; the rest is this object's own.
        if not name.startswith("_") and name not in {"inner", "fail", "calls"} and hasattr(BaseStorage, name):
            return lambda *a, **k: object.__getattribute__(self, "_do")(name, *a, **k)
        return object.__getattribute__(self, name)


for _name in list(getattr(BaseStorage, "__abstractmethods__", ())):
    # Concrete (the class can be instantiated); calls are routed by __getattribute__ above.
    setattr(FlakyStorage, _name, getattr(BaseStorage, _name))
FlakyStorage.__abstractmethods__ = frozenset()

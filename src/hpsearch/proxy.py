"""`hpsearch proxy`: Optuna's gRPC storage proxy in front of the study database.

With hundreds of workers, each holding its own database connections and reading the whole study
at every ask, the database becomes the limit. The proxy is one process that holds a few
connections and the study's trials in memory; workers, `status`, `finalize` and `dashboard` reach
it with `--storage grpc://HOST:PORT`. It runs `optuna.storages.run_grpc_proxy_server` on
`ProxyCache` (proxycache.py: reads from memory, every write to the database first), over the
storage that Optuna's `get_storage` makes (RDBStorage behind its cache, as Optuna's documentation
advises) wrapped in hpsearch's `RetryingStorage`: a database outage is waited out in the proxy,
and the workers' calls simply take longer. Optuna's heartbeats cannot pass through the proxy; hpsearch
keeps its own lease in trial attributes instead (recovery.py), so crash recovery is the same.
"""

from __future__ import annotations

import logging
import signal
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import optuna
from optuna.storages import get_storage, run_grpc_proxy_server

from hpsearch.errors import StorageError
from hpsearch.proxycache import REFRESH_S, ProxyCache
from hpsearch.storage import RetryingStorage, backend_name, open_rdb, redact

log = logging.getLogger("hpsearch.proxy")


@dataclass(frozen=True)
class ProxyOptions:
    storage_url: str
    host: str = "127.0.0.1"
    port: int = 13000
    threads: int = 16
    reconnect_timeout: float = 600.0
    refresh: float = REFRESH_S  # seconds: how old a trial written elsewhere may look (proxycache.py)


def serve(opts: ProxyOptions, say=print) -> None:
    """Serve until SIGTERM or Ctrl-C."""
    if backend_name(opts.storage_url) == "grpc":
        raise StorageError(f"--storage {redact(opts.storage_url)}: the proxy needs the database itself "
                           f"(sqlite:///file.db or postgresql+psycopg2://...), not another proxy")
    # The proxy's threads share one connection pool: as many connections as threads at most.
    rdb = open_rdb(opts.storage_url, pool_size=min(opts.threads, 8), max_overflow=max(0, opts.threads - 8))
    # Requests waiting out a database outage end at once when the proxy is stopped.
    stopping = threading.Event()
    database = RetryingStorage(get_storage(rdb), opts.storage_url, opts.reconnect_timeout, stop=stopping)
    storage = ProxyCache(database, opts.refresh)  # reads from memory; writes reach the database first
    signal.signal(signal.SIGTERM, _raise_interrupt)  # docker stop: stop serving as Ctrl-C does
    say(f"proxy for {redact(opts.storage_url)} on grpc://{opts.host}:{opts.port} "
        f"({opts.threads} threads, trials written elsewhere re-read every {opts.refresh:g} s); Ctrl-C stops it")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            run_grpc_proxy_server(storage, host=opts.host, port=opts.port,
                                  thread_pool=ThreadPoolExecutor(max_workers=opts.threads))
    except KeyboardInterrupt:
        stopping.set()
        say("proxy stopped")
    except RuntimeError as e:  # grpc: "Failed to bind to address ..."
        raise StorageError(f"cannot listen on {opts.host}:{opts.port} ({e}); is another proxy there? "
                           f"choose another --port or --host") from None
    finally:
        rdb.engine.dispose()


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt

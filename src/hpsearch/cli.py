"""`hpsearch worker | status | finalize | dashboard | proxy`: known errors become one line and exit code 2.

    hpsearch worker --study cnn                 # search (or join a search) on ./hpsearch.db
    hpsearch worker --study cnn --processes 4   # four workers on this node, spread over its GPUs
    hpsearch status --study cnn                 # trials, budget, rate, reasons, best, finalize result
    hpsearch finalize --study cnn               # test the best model once, write reports/cnn/
    hpsearch dashboard                          # optuna-dashboard on http://127.0.0.1:8080
    hpsearch proxy --storage postgresql+psycopg2://...   # one gRPC proxy; workers use grpc://host:13000
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import traceback
import warnings
from collections.abc import Callable

from hpsearch import __version__
from hpsearch.errors import HpsearchError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line that says where to look."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")
        sys.exit(EXIT_USAGE)


def _number(kind: type, what: str, ok: Callable[[float], bool]) -> Callable[[str], float]:
    """An argparse type: parse `kind`, check it with `ok`, and name what was expected if not."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, but got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {what}, but got {value}")
        return value

    return parse


_positive_int = _number(int, "a positive integer", lambda v: v >= 1)
_non_negative_int = _number(int, "an integer >= 0", lambda v: v >= 0)
_positive_float = _number(float, "a positive number", lambda v: v > 0)
_non_negative_float = _number(float, "a finite number >= 0", lambda v: 0 <= v < float("inf"))
_port = _number(int, "a port number in 1..65535", lambda v: 1 <= v <= 65535)


ARTIFACTS_HELP = "checkpoint store (default: $HPSEARCH_ARTIFACTS, else <db>-artifacts/ beside the SQLite file)"


def _add_training_options(p: argparse.ArgumentParser, data_root: str) -> None:
    """--device, --data-dir and --artifacts: the same for every command that trains."""
    p.add_argument("--device", default="auto", help="auto (default: cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--data-dir", metavar="DIR", help=f"dataset folder (default: $HPSEARCH_DATA_DIR, else {data_root})")
    p.add_argument("--artifacts", metavar="DIR", help=ARTIFACTS_HELP)


def build_parser() -> argparse.ArgumentParser:
    # Shared options may come before or after the command; SUPPRESS keeps a subcommand's default
    # from overwriting a value given before it (`hpsearch --debug worker ...`).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks for errors")
    common.add_argument(
        "--storage", default=argparse.SUPPRESS,
        metavar="URL",
        help="study storage: sqlite:///file.db, postgresql://user:pw@host/db (psycopg2) or "
        "grpc://host:port (an `hpsearch proxy`) "
        "(default: $HPSEARCH_STORAGE, else sqlite:///hpsearch.db)",
    )
    study = argparse.ArgumentParser(add_help=False)
    study.add_argument(
        "--study", required=True, metavar="NAME|PATH",
        help="a study in studies/ (e.g. cnn) or a path to a .toml study file",
    )

    parser = _Parser(
        prog="hpsearch",
        description="Hyperparameter search for PyTorch image classifiers on Optuna.",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"hpsearch {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")

    w = sub.add_parser(
        "worker", parents=[common, study], help="run trials of a study until its budget is met",
        description="Create the study if missing, else join it, and run trials until the study's "
        "budget of finished trials is met (by all workers together) or this worker's own limit.",
    )
    w.add_argument("--n-trials", type=_positive_int, metavar="N", help="run at most N trials in this worker")
    w.add_argument("--timeout", type=_positive_float, metavar="SECONDS",
                   help="start no new trial after this many seconds")
    _add_training_options(w, data_root="data.root of the study file")
    w.add_argument("--threads", type=_positive_int, metavar="N",
                   help="CPU threads for PyTorch, per worker process (default: all cores, divided "
                   "between the processes with --processes)")
    w.add_argument("--processes", type=_positive_int, default=1, metavar="K",
                   help="start K worker processes on this node, round-robin over the visible GPUs "
                   "(several per GPU when K exceeds them); on a CPU-only node they share the cores")
    w.add_argument("--worker-index", type=_non_negative_int, default=0, metavar="I",
                   help="this worker's index on its node (set by --processes): seeds its sampler "
                   "apart from the node's other workers")
    w.add_argument("--finish-trial-on-signal", action="store_true",
                   help="on SIGTERM/Ctrl-C finish the running trial before exiting (default: stop it "
                   "within one batch, fail it and re-queue it to resume from its last epoch); "
                   "a second signal exits at once either way")
    w.add_argument("--log-prefix", default="", help=argparse.SUPPRESS)  # set by --processes

    s = sub.add_parser(
        "status", parents=[common], help="where a search stands: trials, budget, rate, reasons, best, finalize",
        description="For one study: trials by state, the budget, wall time, trials per minute and the time "
        "to the budget at that rate, failure and prune reasons by count, the best trials, and the finalize "
        "result. Without --study: every study in the storage, one line each.",
    )
    s.add_argument("--study", metavar="NAME|PATH",
                   help="the study: its name in the storage, or its study file (name in studies/ or a .toml "
                   "path); default: list every study in the storage")
    s.add_argument("--top", type=_positive_int, default=5, metavar="K", help="list the K best trials")
    s.add_argument("--json", action="store_true", help="print the same as JSON, for scripts")

    d = sub.add_parser(
        "dashboard", parents=[common], help="serve optuna-dashboard on the study storage",
        description="Serve optuna-dashboard on the same storage and artifact store as the workers. "
        "It has no authentication and can delete studies: it listens on 127.0.0.1 unless --host "
        "says otherwise (reach it from elsewhere with an SSH tunnel).",
    )
    d.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1; 0.0.0.0 exposes it to the network)")
    d.add_argument("--port", type=_port, default=8080, help="port to listen on (default: 8080)")
    d.add_argument("--artifacts", metavar="DIR", help=ARTIFACTS_HELP)

    f = sub.add_parser(
        "finalize", parents=[common],
        help="evaluate the best model once on the held-out test split and write a report",
        description="Pick the winner on validation (the best trial, or with --top-k/--seeds the "
        "configuration with the lowest mean validation loss over several re-trainings), evaluate it "
        "ONCE on the test split, store the result in the study and as a dashboard note, and write "
        "report.md, report.html and report.json to OUT/<study>/. Run again, it shows the stored result "
        "without reading the test split; --force evaluates again and records the extra use.",
    )
    f.add_argument(
        "--study", required=True, metavar="NAME|PATH",
        help="the study: its name in the storage, or its study file (name in studies/ or a .toml path)",
    )
    f.add_argument("--top-k", type=_positive_int, metavar="K",
                   help="re-train the K best configurations (train split) and pick by mean validation loss")
    f.add_argument("--seeds", type=_positive_int, metavar="N",
                   help="seeds per re-trained configuration (default 1 with --top-k); reports mean ± std")
    f.add_argument("--force", action="store_true",
                   help="evaluate on the test split again although it was used before (recorded)")
    f.add_argument("--out", default="reports", metavar="DIR", help="reports go to DIR/<study>/ (default: reports)")
    _add_training_options(f, data_root="data.root of the study's config")

    x = sub.add_parser(
        "proxy", parents=[common], help="serve the storage to many workers through Optuna's gRPC proxy",
        description="Run Optuna's gRPC storage proxy in front of --storage (the database): one "
        "process holds the database connections and a trial cache for any number of workers, which "
        "then use --storage grpc://HOST:PORT. Database outages are waited out here. It has no "
        "authentication: keep it on a private network.",
    )
    x.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1; 0.0.0.0 for workers on other nodes)")
    x.add_argument("--port", type=_port, default=13000, help="port to listen on (default: 13000)")
    x.add_argument("--threads", type=_positive_int, default=16, metavar="N",
                   help="requests served at once, and at most as many database connections (default: 16)")
    x.add_argument("--reconnect-timeout", type=_positive_float, default=600.0, metavar="SECONDS",
                   help="how long to wait out a database outage before a request fails (default: 600)")
    x.add_argument("--refresh", type=_non_negative_float, default=5.0, metavar="SECONDS",
                   help="re-read what others write (another proxy, a worker on the database itself) "
                   "this often; this proxy's own writes, and every trial made before one it makes, "
                   "are seen at once (default: 5)")
    return parser


def _log_to_stderr(prefix: str) -> None:
    """hpsearch's own log lines (database retries, recovered trials) go to stderr, one line each."""
    log = logging.getLogger("hpsearch")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"{prefix}hpsearch: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def _storage_url(args: argparse.Namespace) -> str:
    """--storage, $HPSEARCH_STORAGE or the default, checked (driver installed) and normalised."""
    from hpsearch import checks
    from hpsearch.storage import resolve_url

    return checks.storage_url(resolve_url(args.storage))


def _cmd_worker(args: argparse.Namespace) -> int:
    from hpsearch import checks
    from hpsearch.config import load_config
    from hpsearch.worker import WorkerOptions, quiet_optuna

    # Every check that needs no storage comes first: a rejected run leaves no study behind.
    cfg = load_config(args.study)
    checks.device(args.device)
    url = _storage_url(args)
    checks.artifacts(url, args.artifacts)
    quiet_optuna()
    _log_to_stderr(args.log_prefix)
    opts = WorkerOptions(
        cfg=cfg, storage_url=url, artifacts=args.artifacts,
        data_dir=args.data_dir, device=args.device, n_trials=args.n_trials,
        timeout=args.timeout, threads=args.threads, worker_index=args.worker_index,
        finish_trial_on_signal=args.finish_trial_on_signal,
    )
    if args.processes > 1:
        from hpsearch.node import run_node

        return run_node(opts, args.processes, study_arg=args.study, debug=args.debug)

    from hpsearch.progress import Display
    from hpsearch.worker import run_worker

    display = Display.for_terminal(args.log_prefix)
    try:
        summary = run_worker(opts, display)
    finally:
        display.close()
    # Ctrl-C keeps the shell's convention (130); a SIGTERM (docker stop, the scheduler) asked for a
    # clean stop, and got one: 0.
    return EXIT_INTERRUPTED if summary.signal == signal.SIGINT.name else 0


def _cmd_status(args: argparse.Namespace) -> int:
    from hpsearch.status import print_status

    print_status(args.study, _storage_url(args), top=args.top, as_json=args.json)
    return 0


def _cmd_dashboard(args: argparse.Namespace) -> int:
    from hpsearch.dashboard import DashboardOptions, serve

    # `docker stop` and friends send SIGTERM: stop serving as Ctrl-C does (a PID 1 would ignore it).
    signal.signal(signal.SIGTERM, _raise_interrupt)
    serve(DashboardOptions(_storage_url(args), args.artifacts, args.host, args.port))
    return 0


def _cmd_proxy(args: argparse.Namespace) -> int:
    from hpsearch.proxy import ProxyOptions, serve
    from hpsearch.storage import resolve_url

    _log_to_stderr("")
    serve(ProxyOptions(resolve_url(args.storage), args.host, args.port, args.threads, args.reconnect_timeout,
                       args.refresh),
          say=lambda line: print(f"hpsearch: {line}", flush=True))
    return 0


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _cmd_finalize(args: argparse.Namespace, argv: list[str] | None) -> int:
    from hpsearch import checks
    from hpsearch.finalize import FinalizeOptions, command_line, finalize
    from hpsearch.worker import quiet_optuna

    checks.device(args.device)
    url = _storage_url(args)
    quiet_optuna()
    finalize(FinalizeOptions(
        study=args.study, storage_url=url, artifacts=args.artifacts,
        data_dir=args.data_dir, device=args.device, top_k=args.top_k, seeds=args.seeds,
        force=args.force, out=args.out, command=command_line(argv),
    ), say=lambda line: print(f"hpsearch: {line}", flush=True))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Not parser.set_defaults: the shared actions are the same objects in every subparser, so
    # that would reset a `--debug` given before the command. Fill the suppressed defaults here.
    args.debug = getattr(args, "debug", False)
    args.storage = getattr(args, "storage", None)
    warnings.filterwarnings("ignore", module="optuna")
    commands = {
        "worker": _cmd_worker,
        "status": _cmd_status,
        "finalize": lambda a: _cmd_finalize(a, argv),
        "dashboard": _cmd_dashboard,
        "proxy": _cmd_proxy,
    }
    try:
        return commands[args.command](args)
    except HpsearchError as e:
        if args.debug:
            traceback.print_exc()
        # One line, always: messages quoting other libraries (torchvision, psycopg2) may hold newlines.
        sys.stderr.write(f"hpsearch: error: {' '.join(str(e).split())}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        # Only before a worker installs its own handlers (signals.py): no trial is running yet.
        sys.stderr.write("hpsearch: interrupted\n")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())

"""`hpsearch worker | status | finalize`: known errors become one line and exit code 2.

    hpsearch worker --study cnn        # search (or join a search) on ./hpsearch.db
    hpsearch status --study cnn        # trials by state, best value and parameters
    hpsearch finalize --study cnn      # test the best model once, write reports/cnn/
"""

from __future__ import annotations

import argparse
import sys
import traceback
import warnings

from hpsearch import __version__
from hpsearch.errors import HpsearchError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line that says where to look."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")
        sys.exit(EXIT_USAGE)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, but got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, but got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, but got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, but got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    common.add_argument(
        "--storage",
        metavar="URL",
        help="study storage: sqlite:///file.db or postgresql+psycopg2://user:pw@host/db "
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
    w.add_argument("--device", default="auto", help="auto (default: cuda if available), cpu, cuda, cuda:N")
    w.add_argument("--data-dir", metavar="DIR",
                   help="dataset folder (default: $HPSEARCH_DATA_DIR, else data.root of the study file)")
    w.add_argument("--artifacts", metavar="DIR",
                   help="checkpoint store (default: $HPSEARCH_ARTIFACTS, else <db>-artifacts/ "
                   "beside the SQLite file)")
    w.add_argument("--threads", type=_positive_int, metavar="N", help="CPU threads for PyTorch")

    s = sub.add_parser("status", parents=[common, study], help="trials by state, best value and parameters")
    s.add_argument("--top", type=_positive_int, default=5, metavar="K", help="list the K best trials")

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
    f.add_argument("--device", default="auto", help="auto (default: cuda if available), cpu, cuda, cuda:N")
    f.add_argument("--data-dir", metavar="DIR",
                   help="dataset folder (default: $HPSEARCH_DATA_DIR, else data.root of the study's config)")
    f.add_argument("--artifacts", metavar="DIR",
                   help="checkpoint store (default: $HPSEARCH_ARTIFACTS, else <db>-artifacts/ "
                   "beside the SQLite file)")
    return parser


def _cmd_worker(args: argparse.Namespace) -> int:
    from hpsearch.config import load_config
    from hpsearch.progress import Display
    from hpsearch.storage import resolve_url
    from hpsearch.worker import WorkerOptions, quiet_optuna, run_worker

    cfg = load_config(args.study)  # every problem in the file, before the storage is touched
    quiet_optuna()
    display = Display.for_terminal()
    try:
        run_worker(
            WorkerOptions(
                cfg=cfg, storage_url=resolve_url(args.storage), artifacts=args.artifacts,
                data_dir=args.data_dir, device=args.device, n_trials=args.n_trials,
                timeout=args.timeout, threads=args.threads,
            ),
            display,
        )
    finally:
        display.close()
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from hpsearch.status import print_status

    print_status(args.study, args.storage, top=args.top)
    return 0


def _cmd_finalize(args: argparse.Namespace, argv: list[str] | None) -> int:
    from hpsearch.finalize import FinalizeOptions, command_line, finalize
    from hpsearch.storage import resolve_url
    from hpsearch.worker import quiet_optuna

    quiet_optuna()
    finalize(FinalizeOptions(
        study=args.study, storage_url=resolve_url(args.storage), artifacts=args.artifacts,
        data_dir=args.data_dir, device=args.device, top_k=args.top_k, seeds=args.seeds,
        force=args.force, out=args.out, command=command_line(argv),
    ), say=lambda line: print(f"hpsearch: {line}", flush=True))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", module="optuna")
    commands = {
        "worker": _cmd_worker,
        "status": _cmd_status,
        "finalize": lambda a: _cmd_finalize(a, argv),
    }
    try:
        return commands[args.command](args)
    except HpsearchError as e:
        if args.debug:
            traceback.print_exc()
        sys.stderr.write(f"hpsearch: error: {e}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        sys.stderr.write("hpsearch: interrupted; the running trial (if any) was marked failed\n")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())

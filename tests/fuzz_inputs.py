"""Bad input, counted: tracebacks, exit codes other than 0 and 2, and writes to a storage on rejection.

Every leaf (and every table) of both shipped study files is mutated to a wrong type, negative,
zero, huge, inf, NaN, empty, missing and an unknown key beside it; then come bad command lines and
environments, bad data folders, and the read-only commands on a storage that holds another study.
Each case runs `hpsearch ...` against its own fresh folder (its SQLite file, its artifacts) and is
classified:

- rejected: exit code 2 with one `hpsearch: error:` line. The folder must be as it was before
  (no SQLite file, no artifact folder; a pre-existing storage byte for byte unchanged).
- accepted: the worker started. It is stopped with SIGTERM once its first trial has reported an
  epoch (or after --grace seconds) and must exit 0.
- bad: a traceback, an exit code other than 0 and 2, more than one error line, a rejection that
  wrote, or a process that did not stop.

    uv run python tests/fuzz_inputs.py --data-dir ../shared/data/mnist-t10k          # all of it
    uv run python tests/fuzz_inputs.py --data-dir ../shared/data/mnist-t10k --sample 30 --seed 1

Speed: the cases run in children forked from one process that has already imported hpsearch,
torch and Optuna (`hpsearch.cli.main(argv)` in the child, with its own cwd, environment, stdout
and stderr, exit status from main's return value; an exception escaping main is printed as Python
would and counts as exit code 1). The interpreter start is the only thing skipped; tests/
test_fuzz_inputs.py runs a sample through real `hpsearch` subprocesses as well. The data is a
1,000-image slice of the real MNIST test set, so an accepted case trains one short epoch.
Lives in tests/ (not benchmarks/): it measures correctness, not speed, and its test imports it.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import hashlib
import json
import math
import os
import random
import shutil
import signal
import sqlite3
import sys
import tempfile
import time
import tomllib
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tomli_w

REPO = Path(__file__).resolve().parents[1]
STUDY_FILES = {"cnn": REPO / "studies" / "cnn.toml", "mnist-idx": REPO / "studies" / "mnist-idx.toml"}
N_IMAGES = 1000
UNKNOWN = "no_such_key"


@dataclass
class Case:
    kind: str  # study | cli | data | read-only
    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)  # written into the run folder first
    storage: str = "fresh"  # fresh: no SQLite file before; "other": one holding another study


@dataclass
class Outcome:
    case: Case
    verdict: str  # rejected | accepted | bad
    rc: int | None
    why: str
    stderr_tail: str


# --- study-file mutations ---------------------------------------------------------------------------


def paths(doc, prefix=()):
    """Every key path in a TOML document, tables and lists included, list elements as indices."""
    items = doc.items() if isinstance(doc, dict) else enumerate(doc)
    for key, value in items:
        path = (*prefix, key)
        yield path, value
        if isinstance(value, (dict, list)):
            yield from paths(value, path)


def mutations(value):
    """(name, new value) for one leaf; None as the value means: remove the key."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    wrong = "x" if number or isinstance(value, (bool, list, dict)) else 12345
    huge = (10**12 if isinstance(value, int) else 1e300) if number else ("x" * 100_000 if isinstance(value, str)
                                                                       else [value] * 10_000)
    empty = {str: "", list: [], dict: {}}.get(type(value), "")
    return [
        ("wrong type", wrong),
        ("negative", -abs(value) if number and value else -1),
        ("zero", 0),
        ("huge", huge),
        ("inf", math.inf),
        ("nan", math.nan),
        ("empty", empty),
        ("missing", None),
    ]


def _set(doc, path, value):
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    if value is None:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value


def study_cases(study: str, data_dir: Path) -> list[Case]:
    base = tomllib.loads(STUDY_FILES[study].read_text())
    seen: set[str] = set()
    cases = []

    def add(name: str, doc) -> None:
        try:
            text = tomli_w.dumps(doc)
        except (TypeError, ValueError):  # e.g. a list emptied into mixed types: not writable TOML
            return
        digest = hashlib.sha256(text.encode()).hexdigest()
        if digest not in seen:
            seen.add(digest)
            cases.append(Case("study", f"{study}: {name}", worker_argv("s.toml", data_dir),
                              files={"s.toml": text.encode()}))

    for path, value in list(paths(base)):
        where = ".".join(map(str, path))
        for what, new in mutations(value):
            doc = copy.deepcopy(base)
            _set(doc, path, new)
            add(f"{where} {what}", doc)
        # An unknown key beside this one (in its table), or an extra element in its list.
        doc = copy.deepcopy(base)
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        if isinstance(parent, dict):
            parent[UNKNOWN] = 1
        else:
            parent.append("bogus")
        add(f"{where} unknown key beside it", doc)
    doc = copy.deepcopy(base)
    doc[UNKNOWN] = {"a": 1}
    add("unknown section", doc)
    # A byte-order mark and Windows line ends: accepted.
    text = "\ufeff" + STUDY_FILES[study].read_text().replace("\n", "\r\n")
    cases.append(Case("study", f"{study}: BOM and CRLF", worker_argv("s.toml", data_dir),
                      files={"s.toml": text.encode()}))
    return cases


def worker_argv(study: str, data_dir: Path | None, *extra: str, storage: bool = True) -> list[str]:
    """A one-trial worker on ./h.db; without the option the environment variable under test gives
    (`storage=False` for HPSEARCH_STORAGE, `data_dir=None` for HPSEARCH_DATA_DIR)."""
    return ["worker", "--study", study, *(["--storage", "sqlite:///h.db"] if storage else []),
            *(["--data-dir", str(data_dir)] if data_dir is not None else []),
            "--device", "cpu", "--n-trials", "1", "--threads", "1", *extra]


# --- command lines, environments, data folders ------------------------------------------------------


def cli_cases(idx_dir: Path, good: bytes) -> list[Case]:
    w = lambda *extra, env=None, name=None: Case(  # noqa: E731
        "cli", name or " ".join(extra), worker_argv("s.toml", idx_dir, *extra), env or {},
        {"s.toml": good, "a-file": b"x"})
    raw = lambda argv, env=None, name=None, files=None: Case(  # noqa: E731
        "cli", name or " ".join(argv), argv, env or {}, {"s.toml": good, **(files or {})})
    cases = [w("--device", d) for d in ("mps", "cpu:5", "cuda", "cuda:7", "tpu", "", "meta", "CPU", "cpu:x")]
    urls = ["postgresql://u:pw@127.0.0.1:1/x", "postgres://u:pw@127.0.0.1:1/x", "postgresql+asyncpg://u@h/db",
            "postgresql+psycopg://u@h/db", "mysql://u@h/db", "sqlite:///no/such/dir/x.db", "sqlite:///.",
            "nonsense", "postgresql://h:port/db", "sqlite+aiosqlite:///x.db", "oracle://u@h/db",
            "postgresql+psycopg2://nobody_here@127.0.0.1:5432/no_such_db", "http://example.com/db",
            "sqlite:////proc/x.db"]
    cases += [w("--storage", u) for u in urls]
    cases += [raw(worker_argv("s.toml", idx_dir, storage=False), env={"HPSEARCH_STORAGE": u},
                  name=f"HPSEARCH_STORAGE={u}") for u in urls[:6]]
    arts = ["a-file", "a-file/sub", "/proc/hpsearch-x", "/dev/null"]
    files = {"a-file": b"x"}
    cases += [raw(worker_argv("s.toml", idx_dir, "--artifacts", a), files=files) for a in arts]
    cases += [raw(worker_argv("s.toml", idx_dir), env={"HPSEARCH_ARTIFACTS": a}, files=files,
                  name=f"HPSEARCH_ARTIFACTS={a}") for a in arts]
    for opt, values in {"--n-trials": ["0", "-1", "x", "1e3", ""], "--timeout": ["0", "-5", "nan", "x"],
                        "--threads": ["0", "-2", "x"], "--processes": ["0", "x"],
                        "--worker-index": ["-1", "x"]}.items():
        cases += [w(opt, v) for v in values]
    cases += [w("--data-dir", "no-such-dir"), w("--data-dir", "a-file", name="--data-dir a file"),
              raw(worker_argv("s.toml", None), env={"HPSEARCH_DATA_DIR": "no-such-dir"},
                  name="HPSEARCH_DATA_DIR=no-such-dir"),
              w("--bogus-option"), w("--study", "", name="--study ''")]
    for study in ["missing.toml", "", "/etc", "no-such-name", "a-file", "bin.toml", "latin1.toml"]:
        cases.append(raw(["worker", "--study", study, "--storage", "sqlite:///h.db"], name=f"--study {study!r}",
                         files={"a-file": b"x", "bin.toml": bytes(range(256)), "latin1.toml": "[study]\nname = 'caf\xe9'\n".encode("latin-1")}))
    cases += [raw([]), raw(["worker"]), raw(["status"]), raw(["nope"]), raw(["--storage"]),
              raw(["status", "--study", "s.toml", "--top", "0"]),
              raw(["status", "--study", "s.toml", "--storage", "sqlite:///h.db"], name="status: no storage"),
              raw(["finalize", "--study", "s.toml", "--storage", "sqlite:///h.db"], name="finalize: no storage"),
              raw(["finalize", "--study", "s.toml", "--top-k", "0"]), raw(["finalize", "--study", "s.toml", "--seeds", "-1"]),
              raw(["finalize", "--study", "s.toml", "--device", "mps"]),
              raw(["finalize", "--study", "s.toml", "--storage", "postgresql+asyncpg://u@h/d"]),
              raw(["dashboard", "--port", "0"]), raw(["dashboard", "--port", "70000"]), raw(["dashboard", "--port", "x"]),
              raw(["dashboard", "--storage", "sqlite:///h.db"], name="dashboard: no storage"),
              raw(["dashboard", "--storage", "mysql://u@h/d"])]
    return cases


def _idx(path: Path, array: np.ndarray) -> None:
    from hpsearch.data import write_idx

    write_idx(path, array)


def data_cases(root: Path, images: np.ndarray, labels: np.ndarray, good: bytes) -> list[Case]:
    """Bad IDX folders, made once under `root`; the worker points --data-dir at each."""
    made: dict[str, Path] = {}

    def folder(name: str) -> Path:
        p = root / name
        p.mkdir(parents=True)
        made[name] = p
        return p

    img, lab = "x-images-idx3-ubyte.gz", "x-labels-idx1-ubyte.gz"
    folder("empty")
    _idx(folder("images-only") / img, images)
    _idx(folder("labels-only") / lab, labels)
    p = folder("truncated-gz")
    _idx(p / img, images), _idx(p / lab, labels)
    (p / img).write_bytes((p / img).read_bytes()[:5000])
    p = folder("garbage-gz")
    (p / img).write_bytes(b"not gzip at all"), _idx(p / lab, labels)
    p = folder("bad-magic")
    (p / img).write_bytes(gzip.compress(b"\x12\x34\x56\x78" + bytes(100))), _idx(p / lab, labels)
    p = folder("count-mismatch")
    _idx(p / img, images), _idx(p / lab, labels[:-1])
    p = folder("zero-images")
    _idx(p / img, images[:0]), _idx(p / lab, labels[:0])
    p = folder("tiny-images")
    _idx(p / img, images[:, :4, :4].copy()), _idx(p / lab, labels)
    p = folder("one-class")
    _idx(p / img, images), _idx(p / lab, np.zeros_like(labels))
    p = folder("few-images")
    _idx(p / img, images[:5]), _idx(p / lab, labels[:5])
    p = folder("claims-a-billion")
    raw = b"\x00\x00\x08\x03" + (10**9).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + bytes(784 * 3)
    (p / img).write_bytes(gzip.compress(raw)), _idx(p / lab, labels)
    p = folder("folder-named-like-a-file")
    (p / img).mkdir(), _idx(p / lab, labels)
    p = folder("dangling-symlink")
    (p / img).symlink_to(p / "nowhere"), _idx(p / lab, labels)
    p = folder("shapes-differ")
    _idx(p / img, images), _idx(p / lab, labels)
    _idx(p / "y-images-idx3-ubyte.gz", images[:, :20, :20].copy()), _idx(p / "y-labels-idx1-ubyte.gz", labels)
    p = folder("float-images")
    _idx(p / img, images.astype(np.float32)), _idx(p / lab, labels)
    p = folder("labels-2d")
    _idx(p / img, images), _idx(p / lab.replace("idx1", "idx1"), labels.reshape(-1, 1).repeat(2, 1))
    (root / "a-file").write_bytes(b"x")
    made["a file"] = root / "a-file"
    return [Case("data", f"data: {name}", worker_argv("s.toml", p), files={"s.toml": good})
            for name, p in made.items()]


def read_only_cases(good: bytes) -> list[Case]:
    argvs = [["status", "--study", "s.toml"], ["finalize", "--study", "s.toml"], ["finalize", "--study", "nosuch"],
             ["status", "--study", "s.toml", "--storage", "sqlite:///h.db"]]
    return [Case("read-only", "read-only: " + " ".join(a), [*a, "--storage", "sqlite:///other.db"]
                 if "--storage" not in a else a, files={"s.toml": good}, storage="other") for a in argvs]


# --- running a case --------------------------------------------------------------------------------


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): "dir" if p.is_dir() and not p.is_symlink()
            else hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "other"
            for p in sorted(folder.rglob("*"))}


def _child(case: Case, folder: Path) -> None:
    """In the forked child: run hpsearch's main as the `hpsearch` command would, then _exit."""
    code = 1
    try:
        out = os.open(folder.parent / f"{folder.name}.out", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        err = os.open(folder.parent / f"{folder.name}.err", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(out, 1), os.dup2(err, 2)
        os.setsid()  # its own process group: a stop reaches what it starts, too
        os.chdir(folder)
        base = {k: v for k, v in os.environ.items() if not k.startswith("HPSEARCH_")}
        os.environ.clear()
        os.environ.update({**base, **case.env})
        sys.argv = ["hpsearch", *case.argv]
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL if sig == signal.SIGTERM else signal.default_int_handler)
        from hpsearch import cli

        try:
            code = cli.main(case.argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if isinstance(e.code, str):
                sys.stderr.write(e.code + "\n")
    except BaseException:  # what Python prints for an uncaught exception, and its exit code 1
        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush(), sys.stderr.flush()
        finally:
            os._exit(code if isinstance(code, int) else 1)


def _first_epoch_reported(db: Path) -> bool:
    if not db.is_file():
        return False
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
            return con.execute("SELECT count(*) FROM trial_intermediate_values").fetchone()[0] > 0
    except sqlite3.Error:
        return False


@dataclass
class Running:
    case: Case
    folder: Path
    pid: int
    before: dict
    started: float
    stopped_at: float | None = None


def run_all(cases: list[Case], work: Path, other_db: bytes, jobs: int, grace: float) -> list[Outcome]:
    pending = list(enumerate(cases))
    running: list[Running] = []
    outcomes: list[Outcome] = []
    while pending or running:
        while pending and len(running) < jobs:
            i, case = pending.pop(0)
            folder = work / f"case{i:04d}"
            folder.mkdir()
            for name, data in case.files.items():
                (folder / name).write_bytes(data)
            if case.storage == "other":
                (folder / "other.db").write_bytes(other_db)
            before = snapshot(folder)
            pid = os.fork()
            if pid == 0:
                _child(case, folder)
            running.append(Running(case, folder, pid, before, time.monotonic()))
        time.sleep(0.05)
        for r in list(running):
            done, status = os.waitpid(r.pid, os.WNOHANG)
            if done == 0:
                age = time.monotonic() - r.started
                if r.stopped_at is None and (_first_epoch_reported(r.folder / "h.db") or age > grace):
                    os.kill(r.pid, signal.SIGTERM)
                    r.stopped_at = time.monotonic()
                elif r.stopped_at is not None and time.monotonic() - r.stopped_at > 60:
                    os.killpg(r.pid, signal.SIGKILL)
                continue
            running.remove(r)
            outcomes.append(judge(r, os.waitstatus_to_exitcode(status)))
    return outcomes


def judge(r: Running, rc: int) -> Outcome:
    err = (r.folder.parent / f"{r.folder.name}.err").read_text(errors="replace")
    tail = "\n".join(err.strip().splitlines()[-3:])
    errors = [line for line in err.splitlines() if line.startswith("hpsearch: error")]
    usage = [line for line in err.splitlines() if line.startswith("hpsearch: error:") or ": error:" in line]
    if "Traceback" in err:
        return Outcome(r.case, "bad", rc, "traceback", tail)
    if rc == 2:
        if len(usage) != 1 or len(errors) > 1:
            return Outcome(r.case, "bad", rc, "rejected without exactly one error line", tail)
        after = snapshot(r.folder)
        if after != r.before:
            changed = sorted(set(after.items()) ^ set(r.before.items()))
            return Outcome(r.case, "bad", rc, f"rejected but wrote: {sorted({c[0] for c in changed})}", tail)
        return Outcome(r.case, "rejected", rc, errors[0] if errors else usage[0], tail)
    if rc == 0:
        return Outcome(r.case, "accepted", rc, "stopped" if r.stopped_at else "ran to its end", tail)
    return Outcome(r.case, "bad", rc, f"exit code {rc}", tail)


# --- main ------------------------------------------------------------------------------------------


def build_cases(work: Path, mnist_dir: Path) -> tuple[list[Case], bytes]:
    """All cases, and the bytes of a SQLite storage holding another study (for read-only ones)."""
    from hpsearch.data import read_idx

    images = read_idx(mnist_dir / "t10k-images-idx3-ubyte.gz")[:N_IMAGES].copy()
    labels = read_idx(mnist_dir / "t10k-labels-idx1-ubyte.gz")[:N_IMAGES].copy()
    idx_dir = work / "data" / "idx"
    idx_dir.mkdir(parents=True)
    _idx(idx_dir / "t-images-idx3-ubyte.gz", images), _idx(idx_dir / "t-labels-idx1-ubyte.gz", labels)
    # cnn.toml's FashionMNIST, as torchvision finds it in its folder (raw, uncompressed files):
    # the same 1,000 real images, so that an accepted cnn mutation trains instead of downloading.
    raw = work / "data" / "fashion" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for part in ("train", "t10k"):
        _idx(raw / f"{part}-images-idx3-ubyte", images), _idx(raw / f"{part}-labels-idx1-ubyte", labels)
    good = STUDY_FILES["mnist-idx"].read_bytes()
    cases = study_cases("cnn", work / "data" / "fashion") + study_cases("mnist-idx", idx_dir)
    cases += cli_cases(idx_dir, good) + data_cases(work / "data" / "bad", images, labels, good)
    cases += read_only_cases(good)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    other = work / "other.db"
    optuna.create_study(storage=f"sqlite:///{other}", study_name="other")
    return cases, other.read_bytes()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data" / "mnist-t10k",
                    help="the real MNIST test set (IDX, gzipped)")
    ap.add_argument("--sample", type=int, help="run a random sample of this many cases")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kinds", nargs="+", default=["study", "cli", "data", "read-only"])
    ap.add_argument("--skip", nargs="+", default=[], metavar="NAME", help="leave out the cases of these names")
    ap.add_argument("--jobs", type=int, default=2, help="cases run at once")
    ap.add_argument("--grace", type=float, default=60.0, help="seconds before an accepted worker is stopped "
                    "if its first epoch has not been reported")
    ap.add_argument("--json", type=Path, help="write every outcome here")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args(argv)

    # Imported once here, so every forked child starts with them (what makes a case cheap).
    import hpsearch.cli, hpsearch.config, hpsearch.dashboard, hpsearch.finalize  # noqa: E401, F401
    import hpsearch.status, hpsearch.worker  # noqa: E401, F401

    work = Path(tempfile.mkdtemp(prefix="hpsearch-fuzz-"))
    t0 = time.monotonic()
    try:
        cases, other_db = build_cases(work, args.data_dir)
        cases = [c for c in cases if c.kind in args.kinds and c.name not in args.skip]
        if args.sample is not None and args.sample < len(cases):
            cases = random.Random(args.seed).sample(cases, args.sample)
        (work / "runs").mkdir()
        outcomes = run_all(cases, work / "runs", other_db, args.jobs, args.grace)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    report(outcomes, time.monotonic() - t0)
    if args.json:
        args.json.write_text(json.dumps([dict(kind=o.case.kind, name=o.case.name, argv=o.case.argv,
                                              env=o.case.env, verdict=o.verdict, rc=o.rc, why=o.why)
                                         for o in outcomes], indent=1))
    return 1 if any(o.verdict == "bad" for o in outcomes) else 0


def report(outcomes: list[Outcome], seconds: float) -> None:
    by_kind = Counter((o.case.kind, o.verdict) for o in outcomes)
    print(f"{'inputs':<12}{'cases':>7}{'rejected':>10}{'accepted':>10}{'bad':>6}")
    for kind in ("study", "cli", "data", "read-only"):
        n = sum(v for (k, _), v in by_kind.items() if k == kind)
        if n:
            print(f"{kind:<12}{n:>7}{by_kind[kind, 'rejected']:>10}{by_kind[kind, 'accepted']:>10}"
                  f"{by_kind[kind, 'bad']:>6}")
    bad = [o for o in outcomes if o.verdict == "bad"]
    tracebacks = sum(o.why == "traceback" for o in bad)
    codes = sum(o.rc not in (0, 2) for o in outcomes)
    writes = sum(o.why.startswith("rejected but wrote") for o in bad)
    print(f"{len(outcomes)} cases in {seconds:.0f} s: {tracebacks} tracebacks, {codes} exit codes other than "
          f"0 and 2, {writes} rejections that wrote, {len(bad)} bad in all")
    for o in bad:
        print(f"BAD {o.case.kind}: {o.case.name[:90]!s}: {o.why} (rc {o.rc})\n    {o.stderr_tail[-300:]}")


if __name__ == "__main__":
    sys.exit(main())

"""`hpsearch dashboard`: optuna-dashboard on the study storage and artifact store, and its notes.

The dashboard has no authentication and anyone who reaches it can delete studies, so it listens on
127.0.0.1 unless told otherwise, and says so loudly when it is told otherwise. It reads the same
storage and artifact store as the workers (`--storage`, `--artifacts` and their environment
variables), so checkpoints show up as trial artifacts.

What people see there is written by the worker that creates a study: a study note (markdown) with
the study file, search space, data split sizes and budget (`save_study_note`). `hpsearch finalize`
adds its result at the end of that note (`append_note_section`), never over it.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

import optuna
import optuna_dashboard

from hpsearch.config import BatchChoice, Choice, FloatRange, IntRange, OptimizerChoice, StudyConfig
from hpsearch.errors import HpsearchError, StorageError
from hpsearch.storage import artifact_store, artifacts_dir, open_storage, redact, study_names
from hpsearch.study import ATTR, OBJECTIVE_NAME

if TYPE_CHECKING:
    from hpsearch.data import SearchData  # torch: the server itself has no use for it

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080


# --- the study note ------------------------------------------------------------------------------


def _num(x: float | int) -> str:
    return f"{x:,}" if isinstance(x, int) else f"{x:.4g}"


def _knob(value: Any, note: str = "") -> str:
    """A search-space entry as people read it: a range, a list of choices, or a fixed value."""
    if isinstance(value, (FloatRange, IntRange)):
        text = f"{_num(value.low)} – {_num(value.high)}" + (", log scale" if value.log else "")
    elif isinstance(value, (Choice, OptimizerChoice, BatchChoice)):
        text = "one of " + ", ".join(str(c) for c in value.choices)
    else:
        return f"{value} (fixed{'; ' + note if note else ''})"
    return f"{text} ({note})" if note else text


def study_note(cfg: StudyConfig, data: SearchData, meta: dict[str, Any] | None = None) -> str:
    """The study's dashboard note: where it came from, what it searches, on what data, how long."""
    meta = meta or {}
    d, t, b, s, p = cfg.data, cfg.training, cfg.budget, cfg.sampler, cfg.pruner
    lines = [f"## {cfg.study.name}", ""]
    if cfg.study.description:
        lines += [cfg.study.description, ""]
    made = f"Study file `{cfg.source or '?'}` (fingerprint `{cfg.fingerprint()}`)"
    if meta.get("created_at"):
        made += f", created {meta['created_at']} on {meta.get('created_by', '?')} by hpsearch {meta.get('version', '?')}"
    lines += [
        made + ".",
        "",
        f"Objective: **{OBJECTIVE_NAME}** (minimize). Trial user attributes: val_accuracy, epochs, "
        f"samples_per_s, host, device; pruned trials keep their per-epoch curve.",
        "",
        "### Search space",
        "",
        "| parameter | values |",
        "|---|---|",
    ]
    for name in type(cfg.search).model_fields:
        note = "SGD only" if name == "momentum" else ""
        lines.append(f"| {name} | {_knob(getattr(cfg.search, name), note)} |")
    train_f, val_f, test_f = d.split
    sampler = f"{s.type} (n_startup_trials={s.n_startup_trials}, seed={s.seed})" if s.type == "tpe" else s.type
    pruner = {
        "median": f"median (n_startup_trials={p.n_startup_trials}, n_warmup_steps={p.n_warmup_steps})",
        "hyperband": f"hyperband (min_resource={p.min_resource}, reduction_factor={p.reduction_factor})",
    }.get(p.type, p.type)
    lines += [
        "",
        "### Data",
        "",
        f"Dataset `{d.dataset}`, {data.num_classes} classes, images "
        f"{'×'.join(str(n) for n in data.image_shape)}, split per class with split_seed={d.split_seed} "
        f"(train + validation fingerprint `{data.fingerprint}`).",
        "",
        "| part | images | share |",
        "|---|---|---|",
        f"| train | {len(data.train):,} | {train_f:.0%} |",
        f"| validation | {len(data.val):,} | {val_f:.0%} |",
        f"| test | held out | {test_f:.0%} |",
        "",
        "No worker loads the test part; only `hpsearch finalize` evaluates on it, once.",
        "",
        f"Classes (original labels or folder names, in output order): {', '.join(data.classes)}.",
        *(f"\n**Warning:** {w}" for w in data.class_counts.warnings),
        "",
        "### Budget",
        "",
        f"- {b.n_trials} finished trials (complete, pruned or failed) across all workers"
        + (f", or {b.timeout_minutes:g} minutes from the study's creation" if b.timeout_minutes else ""),
        f"- at most {t.max_epochs} epochs per trial; early stop after {t.patience} epochs without "
        f"a lower validation loss",
        f"- sampler {sampler}; pruner {pruner}",
    ]
    return "\n".join(lines) + "\n"


def save_study_note(study: optuna.Study, cfg: StudyConfig, data: SearchData) -> None:
    optuna_dashboard.save_note(study, study_note(cfg, data, study.user_attrs.get(ATTR)))


FINALIZE_HEADING = "## Final test evaluation (hpsearch finalize)"  # finalize's section starts so


def append_note_section(study: optuna.Study, section: str) -> str:
    """Add finalize's `section` (starting with FINALIZE_HEADING) at the end of the study's note.

    What the worker (or a person) wrote stays. A section appended before by finalize is replaced,
    so a forced re-evaluation does not stack up old results (the uses table in the new section
    lists every use). Returns the whole new note.
    """
    if not section.lstrip().startswith(FINALIZE_HEADING):
        raise ValueError(f"a finalize note section starts with {FINALIZE_HEADING!r}, but got {section[:60]!r}")
    kept = (optuna_dashboard.get_note(study) or "").split(FINALIZE_HEADING, 1)[0].rstrip()
    kept = kept.removesuffix("---").rstrip()  # the rule that separated the old section
    note = (kept + "\n\n---\n\n" if kept else "") + section.strip() + "\n"
    optuna_dashboard.save_note(study, note)
    return note


# --- the server ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DashboardOptions:
    storage_url: str
    artifacts: str | None = None
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a browser's open request must not keep the process alive at exit


class _Server6(_Server):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    # The page polls every few seconds: one log line per request would drown everything else.
    def log_message(self, format: str, *args: Any) -> None:
        pass


def resolve_host(host: str, port: int) -> tuple[int, str, bool]:
    """(address family, address to bind, whether every address `host` names is loopback)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise HpsearchError(
            f"--host {host!r} is not an address or a known host name ({e.strerror}); "
            f"use {DEFAULT_HOST} (the default) or an address of this machine"
        ) from None
    family, _, _, _, sockaddr = infos[0]
    loopback = all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)
    return family, sockaddr[0], loopback


def bind(host: str, port: int) -> WSGIServer:
    """Listen on host:port now, before the app exists, so a taken port is reported first."""
    family, address, _ = resolve_host(host, port)
    server_class = _Server6 if family == socket.AF_INET6 else _Server
    try:
        return server_class((address, port), _QuietHandler)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise HpsearchError(
                f"port {port} on {host} is already in use (another dashboard?); "
                f"stop that process or pass --port with a free port"
            ) from None
        if e.errno == errno.EACCES:
            raise HpsearchError(
                f"no permission to listen on port {port}; pass --port with a port above 1023"
            ) from None
        raise HpsearchError(f"cannot listen on {host}:{port}: {e.strerror}") from None


def url_for(host: str, port: int) -> str:
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def serve(opts: DashboardOptions, log: Callable[[str], None] = _stderr) -> None:
    """Serve optuna-dashboard until interrupted (Ctrl-C, or SIGTERM turned into KeyboardInterrupt).

    Checked first, each with a one-line error: the storage exists and holds a study, the host
    resolves, the port is free.
    """
    storage = open_storage(opts.storage_url, must_exist=True)
    names = study_names(storage)
    if not names:
        raise StorageError(
            f"storage {redact(opts.storage_url)} holds no study yet; start one with "
            f"`hpsearch worker --study NAME` on the same --storage, or pass the --storage that has it"
        )
    if not resolve_host(opts.host, opts.port)[2]:
        log(
            f"hpsearch: warning: the dashboard on {opts.host}:{opts.port} is reachable from other "
            f"machines; it has no authentication and anyone who reaches it can delete studies "
            f"(the default --host {DEFAULT_HOST} with an SSH tunnel is safer)"
        )
    server = bind(opts.host, opts.port)
    try:
        store = artifact_store(opts.storage_url, opts.artifacts, create=False)  # a reader
        server.set_app(optuna_dashboard.wsgi(storage, artifact_store=store))
        log(
            f"hpsearch: dashboard on {url_for(opts.host, opts.port)} for {len(names)} "
            f"stud{'y' if len(names) == 1 else 'ies'} ({', '.join(names)}) in {redact(opts.storage_url)}, "
            f"artifacts in {artifacts_dir(opts.storage_url, opts.artifacts)}; Ctrl-C stops it"
        )
        server.serve_forever()
    except KeyboardInterrupt:
        log("hpsearch: dashboard stopped")
    finally:
        server.server_close()

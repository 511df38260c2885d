"""`hpsearch status`: where a search stands, from the storage alone.

For one study (by its name in the storage, or its study file): trials by state, the budget, wall
time, trials per minute and the time to the budget at that rate, why trials failed or were
pruned (by count), the best trials, and the finalize result when there is one. With no study,
every study in the storage, one line each. `--json` prints the same as data for scripts.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from datetime import datetime
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console
from rich.table import Table

from hpsearch.config import study_name_of
from hpsearch.storage import open_storage, redact, resolve_url, study_names
from hpsearch.study import ATTR, budget_state, load_study

# Study user attributes written by `hpsearch finalize` (the same names as there; a test checks).
RESULT_ATTR = "hpsearch_finalize"
USES_ATTR = "hpsearch_test_uses"


def reason_of(t: FrozenTrial) -> str:
    """Why a trial failed or was pruned, with the numbers that differ per trial taken out, so that
    the same cause counts once ("diverged", "pruned after epoch N", "out of memory on cuda:0")."""
    text = t.user_attrs.get("stop_reason") or t.system_attrs.get("fail_reason") or ""
    if not text:
        return "no reason recorded"
    head = text.split(": ", 1)[0].strip()  # "diverged: training loss is nan ..." -> "diverged"
    head = re.sub(r"\(batch_size=\d+\)", "", head).strip()
    return re.sub(r"\b\d+\b", "N", head) if head.startswith("pruned after epoch") else head


def _iso(d: datetime | None) -> str | None:
    return d.isoformat(timespec="seconds") if d else None


def summarize_study(study: optuna.Study, budget: int | None = None, top: int = 5,
                    now: datetime | None = None) -> dict[str, Any]:
    trials = study.get_trials(deepcopy=False)
    meta = study.user_attrs.get(ATTR) or {}
    recorded = (meta.get("config") or {}).get("budget") or {}
    budget = budget or recorded.get("n_trials")
    states = {s.name.lower(): n for s in TrialState if (n := sum(t.state == s for t in trials))}
    b = budget_state(study, budget or 0)
    starts = [t.datetime_start for t in trials if t.datetime_start]
    ends = [t.datetime_complete for t in trials if t.datetime_complete]
    running = any(t.state == TrialState.RUNNING for t in trials)
    end = (now or datetime.now()) if running else (max(ends) if ends else None)
    wall = (end - min(starts)).total_seconds() if starts and end else None
    rate = b.finished / (wall / 60) if wall and b.finished else None
    left = max(budget - b.finished, 0) if budget else None
    done = sorted((t for t in trials if t.state == TrialState.COMPLETE and t.value is not None),
                  key=lambda t: (t.value, t.number))
    result = study.user_attrs.get(RESULT_ATTR)
    uses = study.user_attrs.get(USES_ATTR) or []
    return {
        "study": study.study_name,
        "trials": len(trials),
        "states": states,
        "budget": {"n_trials": budget, "finished": b.finished, "left": left,
                   "timeout_minutes": recorded.get("timeout_minutes")},
        "first_start": _iso(min(starts)) if starts else None,
        "last_end": _iso(max(ends)) if ends else None,
        "running": running,
        "wall_time_s": wall,
        "trials_per_minute": rate,
        "eta_s": left / rate * 60 if rate and left is not None else None,
        "failed_reasons": dict(Counter(reason_of(t) for t in trials if t.state == TrialState.FAIL).most_common()),
        "pruned_reasons": dict(Counter(reason_of(t) for t in trials if t.state == TrialState.PRUNED).most_common()),
        "best": [{"trial": t.number, "value": t.value, "val_accuracy": t.user_attrs.get("val_accuracy"),
                  "epochs": t.user_attrs.get("epochs"), "params": t.params} for t in done[:top]],
        "finalize": None if result is None else {
            "trial": result["trial"], "test_accuracy": result["test"]["accuracy"],
            "test_loss": result["test"]["loss"], "images": result["test"]["images"],
            "finished_at": result.get("finished_at"), "test_split_uses": len(uses),
        },
        "test_split_uses": len(uses),
    }


def duration(s: float | None) -> str:
    """Seconds as a person reads them: `1 h 5 min`, `3 min 20 s`, `42 s` (the report uses it too)."""
    if s is None:
        return "-"
    s = round(s)
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h} h {m} min" if h else f"{m} min {sec} s" if m else f"{sec} s"


def _params(params: dict) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(params.items()))


def print_study(s: dict, console: Console) -> None:
    b = s["budget"]
    states = ", ".join(f"{n} {k}" for k, n in s["states"].items()) or "none yet"
    budget = f"{b['finished']}/{b['n_trials']} finished" if b["n_trials"] else f"{b['finished']} finished, budget unknown"
    console.print(f"trials: {s['trials']} ({states}); budget {budget}")
    rate = f"{s['trials_per_minute']:.2f} trials/min" if s["trials_per_minute"] else "-"
    eta = ""
    if s["eta_s"] is not None:
        eta = "; budget reached" if b["left"] == 0 else f"; {b['left']} to go, about {duration(s['eta_s'])} at that rate"
    console.print(f"wall time: {duration(s['wall_time_s'])} ({s['first_start'] or '-'} to "
                  f"{'now, running' if s['running'] else s['last_end'] or '-'}); {rate}{eta}")
    for kind in ("failed", "pruned"):
        reasons = s[f"{kind}_reasons"]
        if reasons:
            console.print(f"{kind}: " + "; ".join(f"{n} × {r}" for r, n in reasons.items()))
    f = s["finalize"]
    if f:
        console.print(f"finalized {f['finished_at']}: trial {f['trial']}, test accuracy {f['test_accuracy']:.2%}, "
                      f"loss {f['test_loss']:.4f} on {f['images']:,} images (test split used {f['test_split_uses']} time(s))")
    elif s["test_split_uses"]:
        console.print(f"finalize: the test split was read {s['test_split_uses']} time(s) but no result was stored")
    else:
        console.print("finalize: not yet (the test split is untouched)")
    if not s["best"]:
        console.print("best: no completed trial yet")
        return
    best = s["best"][0]
    acc = best["val_accuracy"]
    console.print(f"best: trial {best['trial']}, validation loss {best['value']:.4f}"
                  + (f", validation accuracy {acc:.2%}" if acc is not None else ""))
    table = Table(title=f"top {len(s['best'])} trials", title_justify="left")
    for col in ("trial", "val loss", "val acc", "epochs"):
        table.add_column(col, justify="right")
    table.add_column("params")
    for t in s["best"]:
        acc = t["val_accuracy"]
        table.add_row(str(t["trial"]), f"{t['value']:.4f}", f"{acc:.2%}" if acc is not None else "-",
                      str(t["epochs"] if t["epochs"] is not None else "-"), _params(t["params"]))
    console.print(table)


def list_studies(storage: optuna.storages.BaseStorage, top: int) -> list[dict]:
    return [summarize_study(optuna.load_study(study_name=name, storage=storage), top=top)
            for name in study_names(storage)]


def print_status(study_arg: str | None, storage_arg: str | None, top: int = 5, as_json: bool = False,
                 console: Console | None = None) -> None:
    console = console or Console(highlight=False, soft_wrap=True)  # long lines stay whole (grep, logs)
    name, file_cfg = study_name_of(study_arg) if study_arg else (None, None)  # a bad file fails first
    budget = file_cfg.budget.n_trials if file_cfg is not None else None
    url = resolve_url(storage_arg)
    storage = open_storage(url, must_exist=True)
    if name is None:
        studies = list_studies(storage, top)
        if as_json:
            print(json.dumps({"storage": redact(url), "studies": studies}, indent=2))
            return
        console.print(f"{len(studies)} stud{'y' if len(studies) == 1 else 'ies'} on {redact(url)}")
        table = Table()
        for col in ("study", "trials", "states", "budget", "best val loss", "finalized"):
            table.add_column(col)
        for s in studies:
            best = s["best"][0] if s["best"] else None
            f = s["finalize"]
            table.add_row(s["study"], str(s["trials"]), ", ".join(f"{n} {k}" for k, n in s["states"].items()),
                          f"{s['budget']['finished']}/{s['budget']['n_trials'] or '?'}",
                          f"{best['value']:.4f} (trial {best['trial']})" if best else "-",
                          f"test acc {f['test_accuracy']:.2%}" if f else "no")
        console.print(table)
        return
    s = summarize_study(load_study(name, storage), budget, top)
    if as_json:
        print(json.dumps({"storage": redact(url), **s}, indent=2))
        return
    console.print(f"study [bold]{s['study']}[/bold] on {redact(url)}")
    print_study(s, console)

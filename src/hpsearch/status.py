"""`hpsearch status`: trials by state, the budget, and the best trials with their parameters."""

from __future__ import annotations

from optuna.trial import TrialState
from rich.console import Console
from rich.table import Table

from hpsearch.config import load_config
from hpsearch.storage import open_storage, redact, resolve_url
from hpsearch.study import budget_state, load_study


def print_status(study_arg: str, storage_arg: str | None, top: int = 5, console: Console | None = None) -> None:
    console = console or Console(highlight=False)
    cfg = load_config(study_arg)
    url = resolve_url(storage_arg)
    storage = open_storage(url, must_exist=True)
    study = load_study(cfg.study.name, storage)
    trials = study.get_trials(deepcopy=False)
    b = budget_state(study, cfg.budget.n_trials)
    by_state = {s.name.lower(): sum(t.state == s for t in trials) for s in TrialState}
    console.print(f"study [bold]{study.study_name}[/bold] on {redact(url)}")
    console.print(
        "trials: " + ", ".join(f"{n} {k}" for k, n in by_state.items() if n)
        + f" (budget {b.finished}/{b.budget} finished)" if trials else "trials: none yet"
    )
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    if not done:
        console.print("best: no completed trial yet")
        return
    done.sort(key=lambda t: t.value)
    best = done[0]
    acc = best.user_attrs.get("val_accuracy")
    console.print(
        f"best: trial {best.number}, validation loss {best.value:.4f}"
        + (f", validation accuracy {acc:.2%}" if acc is not None else "")
    )
    table = Table(title=f"top {min(top, len(done))} trials", title_justify="left")
    table.add_column("trial", justify="right")
    table.add_column("val loss", justify="right")
    table.add_column("val acc", justify="right")
    table.add_column("epochs", justify="right")
    table.add_column("params")
    for t in done[:top]:
        a = t.user_attrs.get("val_accuracy")
        params = ", ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(t.params.items())
        )
        table.add_row(str(t.number), f"{t.value:.4f}", f"{a:.2%}" if a is not None else "-",
                      str(t.user_attrs.get("epochs", "-")), params)
    console.print(table)

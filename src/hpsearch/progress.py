"""The worker's live display: the running trial's epoch, validation loss, best so far, samples/s.

On a terminal it is one status line that redraws in place, with a line per finished trial above
it; in a log file (not a TTY) every epoch and every trial is a plain line.
"""

from __future__ import annotations

import math
import sys
import time

import optuna
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.text import Text

from hpsearch.objective import Progress
from hpsearch.study import BudgetState


def _fmt(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.4f}"


class Display:
    def __init__(self, console: Console, live: bool, prefix: str = "") -> None:
        self.console = console
        self._live = Live(console=console, refresh_per_second=4, transient=True) if live else None
        self._study_best: float | None = None
        # "[w2] " for one of several worker processes sharing a terminal (`--processes`).
        self.prefix = prefix
        self._started = time.monotonic()

    def _elapsed(self) -> str:
        m, s = divmod(int(time.monotonic() - self._started), 60)
        return f"{m}m{s:02d}s"

    @staticmethod
    def for_terminal(prefix: str = "") -> "Display":
        console = Console(stderr=False, highlight=False, soft_wrap=True)
        # Several processes cannot share one redrawing status line: they print plain lines.
        return Display(console, live=sys.stdout.isatty() and not prefix, prefix=prefix)

    def note(self, message: str) -> None:
        self.console.print(f"{escape(self.prefix)}[dim]hpsearch:[/dim] {escape(message)}")

    def progress(self, p: Progress) -> None:
        best = self._study_best
        if best is None or p.trial_best < best:
            best_txt = f"{_fmt(p.trial_best)} (this trial)"
        else:
            best_txt = _fmt(best)
        line = (
            f"trial {p.trial:>4}  epoch {p.epoch:>2}/{p.max_epochs}  val loss {_fmt(p.val_loss)}  "
            f"val acc {p.val_accuracy:6.2%}  best {best_txt}  {p.samples_per_s:,.0f} samples/s"
        )
        if self._live is None:
            self.console.print(self.prefix + line, markup=False)
            return
        if not self._live.is_started:
            self._live.start()
        self._live.update(Text(line, style="cyan"))

    def trial_done(self, study: optuna.Study, trial: FrozenTrial, budget: BudgetState) -> None:
        if budget.best is not None:  # the worker's tally has it, without a walk over every trial
            self._study_best = budget.best
        else:
            try:
                self._study_best = study.best_value
            except ValueError:
                self._study_best = None
        attrs = trial.user_attrs
        state = {
            TrialState.COMPLETE: "[green]complete[/green]",
            TrialState.PRUNED: "[yellow]pruned[/yellow]",
            TrialState.FAIL: "[red]failed[/red]",
        }.get(trial.state, trial.state.name.lower())
        value = _fmt(trial.value) if trial.value is not None else "-"
        acc = attrs.get("val_accuracy")
        acc_txt = f"  val acc {acc:.2%}" if acc is not None else ""
        why = attrs.get("stop_reason", "")
        self.console.print(
            f"{escape(self.prefix)}[dim]{self._elapsed():>7}[/dim] trial {trial.number:>4} {state}: "
            f"val loss {value}{acc_txt}  "
            f"epochs {attrs.get('epochs', '-')}  best {_fmt(self._study_best)}  "
            f"[{budget.finished}/{budget.budget} finished]  [dim]{escape(why)}[/dim]"
        )

    def close(self) -> None:
        if self._live is not None and self._live.is_started:
            self._live.stop()

"""The report's figures as SVG text: Optuna's own plots (its matplotlib back end), plus the two it lacks.

Optuna draws the optimization history, intermediate values, parallel coordinates, slice, contour,
importances and timeline. Drawn here, on matplotlib too: one trial's training and validation
curves together, and the confusion matrix. Every figure is rendered to SVG with its text kept as
text, so `report.html` stays one offline file.

Losses can be 0 (a perfect validation split) or, for other objectives, negative: `value_scale`
picks a y scale on which every point shows (log only when every value is positive).
"""

from __future__ import annotations

import io
import math
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # no display; must come before pyplot, which Optuna's plots use

import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402
import optuna.visualization.matplotlib as ovm  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

# Okabe-Ito: distinguishable with the common colour-vision deficiencies.
BLUE, ORANGE, GREEN, RED, GREY = "#0072B2", "#E69F00", "#009E73", "#D55E00", "#999999"
SPREAD = 30  # values spanning more than this factor get a logarithmic axis
LEGEND_MAX = 10  # Optuna's intermediate-values plot names every trial in its legend: only up to this


@dataclass(frozen=True)
class Plot:
    name: str  # file stem: <name>.svg
    title: str
    svg: str | None  # None: not drawn, see `missing`
    missing: str = ""  # why not, in words


def value_scale(values: Sequence[float]) -> tuple[str, dict]:
    """A matplotlib y scale (name, kwargs) on which every finite value shows.

    log when all are positive and spread widely; symlog (linear around 0) when zero or negative
    values come with a wide spread of the others; linear otherwise.
    """
    v = [x for x in values if x is not None and math.isfinite(x)]
    nonzero = [abs(x) for x in v if x != 0]
    if not nonzero or max(nonzero) / min(nonzero) <= SPREAD:
        return "linear", {}
    if min(v) > 0:
        return "log", {}
    return "symlog", {"linthresh": min(nonzero)}


def apply_scale(ax: Axes, values: Sequence[float]) -> str:
    name, kwargs = value_scale(values)
    ax.set_yscale(name, **kwargs)
    if name == "symlog":
        ax.set_ylim(bottom=min(0.0, *[x for x in values if x is not None and math.isfinite(x)]))
    return name


def to_svg(fig: Figure, name: str) -> str:
    """The figure as a stand-alone SVG file (closed afterwards)."""
    buf = io.StringIO()
    # Text as <text>, not glyph outlines (smaller, selectable); ids salted per figure, so that
    # several figures inline in one page never share an id.
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": name, "font.family": "sans-serif"}):
        fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    plt.close(fig)
    return buf.getvalue()


def inline(svg: str) -> str:
    """A stand-alone SVG as an element of an HTML page: no XML prologue, metadata or namespaces.

    HTML5 parses inline <svg> (and `xlink:href`) without the namespace declarations, and leaving
    them out keeps every URL out of the page.
    """
    svg = re.sub(r"<\?xml[^>]*\?>|<!DOCTYPE[^>]*>|<metadata>.*?</metadata>|<!--.*?-->", "", svg, flags=re.S)
    svg = re.sub(r'\s+xmlns(:\w+)?="[^"]*"', "", svg)
    return svg.strip()


def _figure_of(ax) -> Figure:
    first = ax.flat[0] if hasattr(ax, "flat") else ax
    return first.figure


def _optuna(name: str, title: str, draw: Callable[[], object], after: Callable | None = None,
            size: tuple[float, float] | None = (9.0, 4.5)) -> Plot:
    """One of Optuna's plots; a plot Optuna cannot draw for this study is reported, not raised.

    `size` (inches) replaces matplotlib's default 6.4 x 4.8, which crowds a plot of many trials.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ExperimentalWarning for the matplotlib back end
            ax = draw()
            if size is not None:
                _figure_of(ax).set_size_inches(*size)
            if after is not None:
                after(ax)
    except (ValueError, RuntimeError, ZeroDivisionError, KeyError) as e:
        plt.close("all")
        return Plot(name, title, None, f"Optuna could not draw it for this study: {e}")
    return Plot(name, title, to_svg(_figure_of(ax), name))


def history(study: optuna.Study, winner: int, values: Sequence[float]) -> Plot:
    def mark(ax: Axes) -> None:
        apply_scale(ax, values)
        won = [t for t in study.get_trials(deepcopy=False) if t.number == winner]
        if won and won[0].value is not None:
            ax.scatter([winner], [won[0].value], s=90, facecolors="none", edgecolors=RED, linewidths=2,
                       zorder=5, label=f"winner (trial {winner})")
            ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0))

    return _optuna("history", "Optimization history", lambda: ovm.plot_optimization_history(study), mark)


def intermediate(study: optuna.Study, winner: int, values: Sequence[float]) -> Plot:
    def tidy(ax: Axes) -> None:
        apply_scale(ax, values)
        for line in ax.get_lines():  # the winner's curve in front and in red
            if line.get_label() == f"Trial{winner}":
                line.set(color=RED, linewidth=2.5, alpha=1.0, zorder=5)
        legend = ax.get_legend()
        if legend is not None and len(legend.get_texts()) > LEGEND_MAX:
            legend.remove()
        elif legend is not None:  # again, so that it shows the winner's new colour
            ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0))

    return _optuna("intermediate", "Validation loss per epoch (intermediate values)",
                   lambda: ovm.plot_intermediate_values(study), tidy)


def parallel(study: optuna.Study, params: list[str]) -> Plot:
    return _optuna("parallel", "Parallel coordinates",
                   lambda: ovm.plot_parallel_coordinate(study, params=params or None), size=(11.0, 5.0))


def slices(study: optuna.Study, params: list[str]) -> Plot:
    def tidy(axes) -> None:
        for ax in getattr(axes, "flat", [axes]):  # a narrow log axis labels its minor ticks: slant them
            ax.tick_params(axis="x", which="both", labelrotation=45, labelsize=7)

    return _optuna("slice", "Slice: validation loss against each parameter",
                   lambda: ovm.plot_slice(study, params=params or None), tidy, size=(11.0, 4.0))


def contour(study: optuna.Study, params: list[str]) -> Plot:
    if len(params) < 2:
        return Plot("contour", "Contour", None, "needs two searched parameters")
    return _optuna("contour", f"Contour of the top two parameters ({params[0]}, {params[1]})",
                   lambda: ovm.plot_contour(study, params=params[:2]), size=(7.5, 5.5))


def importances(study: optuna.Study) -> Plot:
    return _optuna("importance", "Parameter importances", lambda: ovm.plot_param_importances(
        study, evaluator=optuna.importance.PedAnovaImportanceEvaluator()))


def timeline(study: optuna.Study) -> Plot:
    n = len(study.get_trials(deepcopy=False))
    return _optuna("timeline", "Timeline", lambda: ovm.plot_timeline(study), size=(9.0, min(12.0, 3.0 + 0.06 * n)))


def curves(curve: Sequence[Sequence[float]], trial: int) -> Plot:
    """Training and validation loss (left) and accuracy (right) per epoch of one trial.

    `curve` rows: [epoch, train loss, train accuracy, val loss, val accuracy]; train values may be
    None (trials recorded before training curves were kept).
    """
    title = f"Trial {trial}: training and validation per epoch"
    if not curve:
        return Plot("curves", title, None, f"trial {trial} recorded no epochs")
    epochs = [r[0] for r in curve]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, col, what in ((left, 1, "loss"), (right, 2, "accuracy")):
        train = [r[col] for r in curve]
        val = [r[col + 2] for r in curve]
        if any(x is not None for x in train):
            ax.plot(epochs, train, "o-", color=BLUE, label=f"training {what}")
        ax.plot(epochs, val, "s-", color=RED, label=f"validation {what}")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
        ax.legend()
        if what == "loss":
            apply_scale(ax, [x for x in train + val if x is not None])
    fig.suptitle(title)
    return Plot("curves", title, to_svg(fig, "curves"))


def confusion(classes: Sequence[str], matrix: Sequence[Sequence[int]]) -> Plot:
    """Rows: true class, columns: predicted; colour is the share of the row (recall), so a small
    class reads as clearly as a large one. Counts are written in the cells up to 15 classes."""
    k = len(classes)
    side = min(11.0, 2.5 + 0.22 * k)
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    shares = [[v / (sum(row) or 1) for v in row] for row in matrix]
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    size = max(5.0, min(10.0, 220 / max(k, 1)))
    ax.set_xticks(range(k), [str(c) for c in classes], rotation=90, fontsize=size)
    ax.set_yticks(range(k), [str(c) for c in classes], fontsize=size)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if k <= 15:
        for i, row in enumerate(matrix):
            for j, v in enumerate(row):
                if v:
                    ax.text(j, i, str(v), ha="center", va="center", fontsize=8,
                            color="white" if shares[i][j] > 0.55 else "black")
    ax.set_title("Confusion matrix (test split)")
    return Plot("confusion", "Confusion matrix", to_svg(fig, "confusion"))

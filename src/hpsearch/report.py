"""The finalize report: `report.json` (the data), `report.md` and a self-contained `report.html`.

Everything in it comes from the study storage (trials, the recorded config, the stored test result
and the list of test-split uses), so it can be written again at any time without touching data.
The Markdown comes from one Jinja template (`templates/report.md.j2`); the HTML is that Markdown
rendered by markdown-it, with the figures inline as SVG (`plots`), so the two say the same thing
and the HTML needs no network and no other file. `reproduce.toml` is written with tomli-w.
"""

from __future__ import annotations

import json
import math
import shlex
import statistics
import warnings
from collections import Counter
from datetime import datetime, timezone
from html import escape
from pathlib import Path
from typing import Any

import jinja2
import optuna
import tomli_w
from markdown_it import MarkdownIt
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

from hpsearch import __version__, plots
from hpsearch.config import BatchChoice, FloatRange, IntRange, OptimizerChoice, StudyConfig
from hpsearch.objective import CURVE_ATTR, trial_seed
from hpsearch.status import duration as _duration
from hpsearch.storage import redact
from hpsearch.study import ATTR, OBJECTIVE_NAME, budget_state

EDGE = 0.05  # a best value within 5% of either end of its range (on its sampling scale) is "at the edge"
# Below this many complete trials, importances mostly measure which values the sampler happened to
# try (TPE starts with random trials): shown with a caution.
MIN_TRIALS_FOR_IMPORTANCES = 20
RUNNERS_UP = 3  # the next best trials the winner's lead is measured against
# The pruner's settings that apply to each type (the config holds all of them).
PRUNER_SETTINGS = {"median": ("n_startup_trials", "n_warmup_steps"),
                   "hyperband": ("min_resource", "reduction_factor"), "none": ()}


# --- the data -----------------------------------------------------------------------------------


def build_report(study: optuna.Study, cfg: StudyConfig, storage_url: str, out_dir: Path,
                 result: dict, uses: list[dict]) -> dict:
    """Everything the report shows, as plain JSON-able data."""
    trials = study.get_trials(deepcopy=False)
    meta = study.user_attrs.get(ATTR, {})
    by_state = {s.name.lower(): sum(t.state == s for t in trials) for s in TrialState}
    b = budget_state(study, cfg.budget.n_trials)
    starts = [t.datetime_start for t in trials if t.datetime_start]
    ends = [t.datetime_complete for t in trials if t.datetime_complete]
    workers = Counter(t.user_attrs.get("worker", "unknown") for t in trials)
    hosts = Counter(t.user_attrs.get("host", "unknown") for t in trials)
    winner = next(t for t in trials if t.number == result["trial"])
    return _finite({
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "hpsearch_version": __version__,
        "study": {
            "name": study.study_name,
            "storage": redact(storage_url),
            "objective": f"{OBJECTIVE_NAME} (minimize)",
            "source": meta.get("source", cfg.source),
            "fingerprint": meta.get("fingerprint", cfg.fingerprint()),
            "created_at": meta.get("created_at"),
            "created_by": meta.get("created_by"),
            "split_fingerprint": study.user_attrs.get("split_fingerprint"),
            "dataset": cfg.data.dataset,
            "split": list(cfg.data.split),
            "trials": len(trials),
            "trials_by_state": {k: v for k, v in by_state.items() if v},
            "budget": {"n_trials": b.budget, "finished": b.finished, "complete": b.complete,
                       "pruned": b.pruned, "failed": b.failed, "running": b.running,
                       "waiting": b.waiting, "timeout_minutes": cfg.budget.timeout_minutes},
            "first_start": min(starts).isoformat(timespec="seconds") if starts else None,
            "last_end": max(ends).isoformat(timespec="seconds") if ends else None,
            "wall_time_s": (max(ends) - min(starts)).total_seconds() if starts and ends else None,
            "compute_time_s": sum((t.datetime_complete - t.datetime_start).total_seconds()
                                  for t in trials if t.datetime_start and t.datetime_complete),
            "workers": [{"worker": w, "trials": n} for w, n in workers.most_common()],
            "hosts": [{"host": h, "trials": n} for h, n in hosts.most_common()],
            "sampler": cfg.sampler.model_dump(mode="json"),
            "pruner": {k: v for k, v in cfg.pruner.model_dump(mode="json").items()
                       if k == "type" or k in PRUNER_SETTINGS[cfg.pruner.type]},
            "max_epochs": cfg.training.max_epochs,
            "search_space": search_space(cfg),
        },
        "result": result,
        "test_split_uses": uses,
        "edge_warnings": edge_warnings(winner),
        "importances": param_importances(study),
        "why": why_this_model(study, winner, result, storage_url),
        "reproduce": reproduce(cfg, result, out_dir, study.study_name),
        "trials": [_trial(t) for t in trials],
    })


def search_space(cfg: StudyConfig) -> dict:
    """Every knob of the study file: a range, a list of choices, or a fixed value."""
    out = {}
    for name in type(cfg.search).model_fields:
        knob = getattr(cfg.search, name)
        if isinstance(knob, (FloatRange, IntRange)):
            out[name] = {"low": knob.low, "high": knob.high, "log": knob.log}
        elif isinstance(knob, (OptimizerChoice, BatchChoice)):
            out[name] = {"choices": list(knob.choices)}
        else:
            out[name] = {"fixed": knob}
    return out


def _trial(t: FrozenTrial) -> dict:
    a = t.user_attrs
    return {
        "number": t.number,
        "state": t.state.name.lower(),
        "value": t.value,
        "params": t.params,
        "intermediate_values": sorted([int(k), v] for k, v in t.intermediate_values.items()),
        "val_accuracy": a.get("val_accuracy"),
        "best_epoch": a.get("best_epoch"),
        "epochs": a.get("epochs"),
        "stop_reason": a.get("stop_reason"),
        "curve": a.get(CURVE_ATTR),
        "worker": a.get("worker"),
        "seed": a.get("seed"),
        "started": t.datetime_start.isoformat(timespec="seconds") if t.datetime_start else None,
        "duration_s": (t.datetime_complete - t.datetime_start).total_seconds()
        if t.datetime_start and t.datetime_complete else None,
    }


def edge_warnings(trial: FrozenTrial) -> list[dict]:
    """Every searched parameter of `trial` whose value sits at an end of its search range."""
    out = []
    for name, d in trial.distributions.items():
        v = trial.params[name]
        if isinstance(d, (FloatDistribution, IntDistribution)):
            lo, hi = d.low, d.high
            if hi <= lo:
                continue
            pos = (math.log(v / lo) / math.log(hi / lo)) if d.log else (v - lo) / (hi - lo)
            scale = " (log scale)" if d.log else ""
        elif isinstance(d, CategoricalDistribution):
            numeric = [c for c in d.choices if isinstance(c, (int, float)) and not isinstance(c, bool)]
            # An ordered choice of numbers (batch sizes) has edges too; two choices are both edges.
            if len(numeric) != len(d.choices) or len(numeric) < 3:
                continue
            lo, hi = min(numeric), max(numeric)
            pos = 0.0 if v == lo else 1.0 if v == hi else 0.5
            scale = " (choices)"
        else:
            continue
        if EDGE < pos < 1 - EDGE:
            continue
        edge = "lower" if pos <= EDGE else "upper"
        out.append({
            "param": name, "value": v, "low": lo, "high": hi, "edge": edge,
            "message": f"{name} = {v:.4g} sits at the {edge} edge of its search range "
                       f"[{lo:g}, {hi:g}]{scale}: the best value may lie beyond it; widen the range in "
                       f"the study file and search again",
        })
    return out


def param_importances(study: optuna.Study) -> dict:
    # PED-ANOVA needs nothing beyond Optuna (fANOVA, the default, needs scikit-learn). It measures how
    # much each parameter matters for reaching the best 10% of the completed trials.
    method = "PED-ANOVA (optuna.importance), completed trials, top-10% quantile"
    n = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    if n < 2:
        return {"method": method, "values": {}, "note": f"needs at least 2 completed trials, the study has {n}",
                "left_out": [], "complete": n}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            values = optuna.importance.get_param_importances(
                study, evaluator=optuna.importance.PedAnovaImportanceEvaluator()
            )
    except (ValueError, RuntimeError) as e:
        return {"method": method, "values": {}, "note": f"could not be computed: {e}", "left_out": [], "complete": n}
    searched = {p for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) for p in t.params}
    # Optuna ranks the parameters every complete trial has: a conditional one (momentum, SGD only)
    # is left out rather than shown as 0.
    left_out = sorted(searched - set(values))
    return {"method": method, "values": dict(values), "note": "", "left_out": left_out, "complete": n}


def reproduce(cfg: StudyConfig, result: dict, out_dir: Path, name: str) -> dict:
    """A study file that fixes every knob at the winner's values, and the command that runs it.

    The objective seeds trial 0 of a study with `trial_seed(sampler.seed, 0)`; the sampler seed is
    chosen so that this gives the winner's seed, hence the same initial weights and batch order.
    """
    seed = int(result["seed"])
    base = seed * pow(1_000_003, -1, 2**31) % 2**31
    assert trial_seed(base, 0) == seed
    conf = cfg.model_dump(mode="json")
    conf["study"] = {
        "name": f"{name}-reproduce-trial{result['trial']}-seed{seed}",
        "description": f"Re-trains the winner of study {name!r} (trial {result['trial']}, seed {seed}).",
    }
    conf["data"]["root"] = result["data_dir"]
    conf["search"] = dict(result["hparams"])
    conf["sampler"] = {**conf["sampler"], "seed": base}
    conf["pruner"] = {"type": "none"}
    conf["budget"] = {"n_trials": 1}
    study_file = out_dir / "reproduce.toml"
    db = out_dir / "reproduce.db"
    command = shlex.join(["hpsearch", "worker", "--study", str(study_file), "--storage", f"sqlite:///{db}",
                          "--device", result["device"]])
    header = (f"# Written by `hpsearch finalize` for study {name!r}: every knob fixed at the winner's\n"
              f"# value, and the sampler seed chosen so that trial 0 trains with seed {seed}.\n"
              f"#   {command}\n\n")
    return {
        "study_file": str(study_file),
        "study_file_text": header + to_toml(conf),
        "command": command,
        "expected_val_loss": result["validation"]["loss"],
    }


def to_toml(conf: dict) -> str:
    """`conf` as TOML; None means "not set" and is left out (TOML has no null)."""
    return tomli_w.dumps(_drop_none(conf))


def _drop_none(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _drop_none(v) for k, v in x.items() if v is not None}
    if isinstance(x, (list, tuple)):
        return [_drop_none(v) for v in x]
    return x


def _finite(x: Any) -> Any:
    """JSON has no NaN or infinity: they become null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


# --- why this model -----------------------------------------------------------------------------


def why_this_model(study: optuna.Study, winner: FrozenTrial, result: dict, storage_url: str) -> dict:
    """How far the winner's lead can be trusted, and what in the result needs a second look."""
    done = sorted((t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                   if t.value is not None), key=lambda t: (t.value, t.number))
    noise = seed_noise(result["selection"])
    runners = [t for t in done if t.number != winner.number][:RUNNERS_UP]
    next_best = []
    for t in runners:
        gap = t.value - winner.value if winner.value is not None else None
        row = {"trial": t.number, "value": t.value, "gap": gap, "verdict": None}
        if noise["std"] and gap is not None:
            # Two single-seed runs differ by sqrt(2) seed standard deviations on average.
            row["z"] = gap / (math.sqrt(2) * noise["std"])
            row["verdict"] = _verdict(row["z"])
        next_best.append(row)
    command = shlex.join(["hpsearch", "finalize", "--study", study.study_name, "--storage", redact(storage_url),
                          "--top-k", str(RUNNERS_UP + 1), "--seeds", "3", "--force"])
    return {
        "next_best": next_best,
        "seed_noise": noise,
        "measure_command": command,
        "complete_trials": len(done),
        "min_trials_for_importances": MIN_TRIALS_FOR_IMPORTANCES,
        "unused_params": unused_params(result["hparams"], {p for t in done for p in t.params}),
        "class_coverage": class_coverage(result),
    }


def _verdict(z: float) -> str:
    if z >= 2:
        return "larger than seed noise"
    if z >= 1:
        return "about the size of seed noise"
    return "within seed noise"


def seed_noise(selection: dict) -> dict:
    """The seed-to-seed standard deviation of the validation loss, from `--top-k/--seeds` runs.

    Pooled over the re-trained configurations (each with 2+ seeds). With two or more of them, the
    winner's lead in mean validation loss over each other one is given in standard errors of the
    difference of two means (z).
    """
    rows = [c for c in selection.get("candidates", []) if c.get("mean_val_loss") is not None and len(c["runs"]) > 1]
    if not rows:
        return {"measured": False, "std": None, "seeds": 0, "configurations": 0, "comparisons": []}
    std = math.sqrt(statistics.fmean(c["std_val_loss"] ** 2 for c in rows))
    seeds = min(len(c["runs"]) for c in rows)
    best = min(rows, key=lambda c: c["mean_val_loss"])
    comparisons = []
    for c in sorted(rows, key=lambda c: c["mean_val_loss"]):
        if c is best:
            continue
        lead = c["mean_val_loss"] - best["mean_val_loss"]
        z = lead / (std * math.sqrt(2 / seeds)) if std > 0 else math.inf
        comparisons.append({"trial": c["trial"], "lead": lead, "z": z, "verdict": _verdict(z)})
    return {"measured": True, "std": std, "seeds": seeds, "configurations": len(rows), "comparisons": comparisons}


def unused_params(hparams: dict, searched: set[str]) -> list[dict]:
    """Searched settings the winner carries but does not use (momentum exists for SGD only).

    A fixed momentum is not flagged: nobody reads a search result into it.
    """
    opt = hparams.get("optimizer")
    if opt and opt != "sgd" and "momentum" in searched:
        return [{"param": "momentum", "message": f"momentum is not used by the winner's optimizer ({opt}); "
                                                 f"its value and importance say nothing about this model"}]
    return []


def class_coverage(result: dict) -> list[str]:
    """Classes the evaluation cannot speak for: no test or no validation images, and the data's own
    warnings (classes too small for every part of the split)."""
    out = list(result.get("data_warnings") or [])
    for c in result["test"]["per_class"]:
        if not c["support"]:
            out.append(f"class {c['class']} has no test images: its recall is unmeasured")
    val_counts = result["validation"].get("class_counts") or []
    for name, n in zip(result["test"]["classes"], val_counts):
        if not n:
            out.append(f"class {name} has no validation images: the search never scored it")
    return out


# --- figures ------------------------------------------------------------------------------------


def figures(study: optuna.Study, doc: dict) -> list[plots.Plot]:
    trials, r = doc["trials"], doc["result"]
    winner = r["trial"]
    values = [t["value"] for t in trials if t["state"] == "complete" and t["value"] is not None]
    steps = [v for t in trials for _, v in t["intermediate_values"]]
    complete = [t for t in trials if t["state"] == "complete"]
    everywhere = set.intersection(*(set(t["params"]) for t in complete)) if complete else set()
    # Parameters by importance, the winner's own ones (a conditional one it lacks says nothing of it).
    ranked = [p for p in doc["importances"]["values"] if p in r["params"]]
    ranked += sorted(set(r["params"]) - set(ranked))
    won = next(t for t in trials if t["number"] == winner)
    curve = won["curve"] or [[e, None, None, v, None] for e, v in won["intermediate_values"]]
    test = r["test"]
    return [
        plots.history(study, winner, values),
        plots.intermediate(study, winner, steps),
        plots.curves(curve, winner),
        plots.parallel(study, [p for p in ranked if p in everywhere]),
        plots.slices(study, ranked[:4]),
        plots.contour(study, ranked[:2]),
        plots.importances(study),
        plots.timeline(study),
        plots.confusion(test["classes"], test["confusion_matrix"]),
    ]


# --- rendering ----------------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return "-" if x is None or isinstance(x, jinja2.Undefined) else f"{x:.2%}"


def _num(x: Any) -> str:
    if x is None or isinstance(x, jinja2.Undefined):  # a key an older record lacks
        return "-"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def _cell(x: Any) -> str:
    """A Markdown table cell: no pipe or newline may end it early."""
    return str(x).replace("|", "\\|").replace("\n", " ")


def _range(d: dict) -> str:
    if "fixed" in d:
        return "fixed"
    if "choices" in d:
        return str(d["choices"])
    return f"[{d['low']:g}, {d['high']:g}]" + (" log" if d["log"] else "")


_templates = jinja2.Environment(
    loader=jinja2.PackageLoader("hpsearch", "templates"), autoescape=False,
    trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
)
_templates.filters.update(pct=_pct, num=_num, duration=_duration, cell=_cell, range=_range)


def render_markdown(doc: dict, figs: list[plots.Plot], template: str = "report.md.j2") -> str:
    return _templates.get_template(template).render(
        doc=doc, r=doc["result"], st=doc["study"], test=doc["result"]["test"], why=doc["why"], figs=figs,
        edge=EDGE, min_imp=MIN_TRIALS_FOR_IMPORTANCES,
    )


def render_html(markdown: str, figs: list[plots.Plot], title: str) -> str:
    """The Markdown as one HTML page; each figure reference becomes the figure itself, inline."""
    inline = {f"{p.name}.svg": plots.inline(p.svg) for p in figs if p.svg}
    md = MarkdownIt("commonmark", {"html": False}).enable("table")

    def image(renderer, tokens, idx, options, env):
        token = tokens[idx]
        caption = escape(renderer.renderInlineAsText(token.children or [], options, env))
        svg = inline.get(str(token.attrGet("src")))
        if svg is None:
            return f"<em>[{caption}]</em>"
        return f'<figure class="plot">{svg}<figcaption>{caption}</figcaption></figure>'

    md.add_render_rule("image", image)
    body = md.render(markdown)
    return _templates.get_template("report.html.j2").render(title=title, body=body)


def write_report(study: optuna.Study, doc: dict, out_dir: Path) -> list[Path]:
    """report.json, report.md (+ its SVG figures), report.html (self-contained), reproduce.toml."""
    out_dir.mkdir(parents=True, exist_ok=True)
    figs = figures(study, doc)
    markdown = render_markdown(doc, figs)
    files = {
        "report.json": json.dumps(doc, indent=2, allow_nan=False) + "\n",
        "report.md": markdown,
        "report.html": render_html(markdown, figs, f"hpsearch report: {doc['study']['name']}"),
        "reproduce.toml": doc["reproduce"]["study_file_text"],
        **{f"{p.name}.svg": p.svg for p in figs if p.svg},
    }
    written = []
    for name, text in files.items():
        path = out_dir / name
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)  # a reader never sees half a report
        written.append(path)
    return written


def note_section(doc: dict) -> str:
    """The summary, as the section finalize adds to the study's dashboard note."""
    return render_markdown(doc, [], template="note.md.j2")

"""The finalize report: `report.json` (the data), `report.md` and a self-contained `report.html`.

Everything in it comes from the study storage (trials, the recorded config, the stored test result
and the list of test-split uses), so it can be written again at any time without touching data.
The document is built once as a list of blocks and rendered to Markdown and to HTML, so the two
say the same thing. Plots are inline SVG (`svgplot`): the HTML needs no network and no other file.
"""

from __future__ import annotations

import json
import math
import re
import shlex
import warnings
from collections import Counter
from datetime import datetime, timezone
from html import escape
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

from hpsearch import __version__, svgplot
from hpsearch.config import BatchChoice, FloatRange, IntRange, OptimizerChoice, StudyConfig
from hpsearch.objective import trial_seed
from hpsearch.storage import redact
from hpsearch.study import ATTR, OBJECTIVE_NAME, budget_state

EDGE = 0.05  # a best value within 5% of either end of its range (on its sampling scale) is "at the edge"
FIGURES = ("history", "curves", "importance")


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
            "pruner": cfg.pruner.model_dump(mode="json"),
            "max_epochs": cfg.training.max_epochs,
            "search_space": search_space(cfg),
        },
        "result": result,
        "test_split_uses": uses,
        "edge_warnings": edge_warnings(winner),
        "importances": param_importances(study),
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
        return {"method": method, "values": {}, "note": f"needs at least 2 completed trials, the study has {n}"}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            values = optuna.importance.get_param_importances(
                study, evaluator=optuna.importance.PedAnovaImportanceEvaluator()
            )
    except (ValueError, RuntimeError) as e:
        return {"method": method, "values": {}, "note": f"could not be computed: {e}"}
    return {"method": method, "values": dict(values), "note": ""}


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
    lines = []
    for section, table in conf.items():
        lines.append(f"[{section}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in table.items() if v is not None)
        lines.append("")
    return "\n".join(lines)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(f"TOML has no value for {v=}")
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # JSON's string escapes are valid TOML basic-string escapes
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items() if x is not None) + " }"
    raise TypeError(f"cannot write {type(v).__name__} to TOML, but got {v=}")


def _finite(x: Any) -> Any:
    """JSON has no NaN or infinity: they become null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


# --- figures ------------------------------------------------------------------------------------


def figures(doc: dict) -> dict[str, str]:
    trials = doc["trials"]
    winner = doc["result"]["trial"]
    complete = [t for t in trials if t["state"] == "complete" and t["value"] is not None]
    pruned = [t for t in trials if t["state"] == "pruned" and t["intermediate_values"]]
    best, best_line = math.inf, []
    for t in sorted(complete, key=lambda t: t["number"]):
        best = min(best, t["value"])
        best_line.append((t["number"], best))
    history = svgplot.line_chart(
        [
            svgplot.Series([(t["number"], t["value"]) for t in complete], svgplot.BLUE, "complete",
                           line=False, marker="circle"),
            svgplot.Series([(t["number"], t["intermediate_values"][-1][1]) for t in pruned], svgplot.GREY,
                           "pruned (last reported)", line=False, marker="cross"),
            svgplot.Series(best_line, svgplot.ORANGE, "best so far"),
            svgplot.Series([(t["number"], t["value"]) for t in complete if t["number"] == winner],
                           svgplot.RED, f"winner (trial {winner})", line=False, marker="circle"),
        ],
        title="Optimization history", xlabel="trial", ylabel=OBJECTIVE_NAME, log_y=True,
    )
    series = []
    labelled: set[str] = set()
    for t in trials:
        pts = [tuple(p) for p in t["intermediate_values"]]
        if not pts or t["number"] == winner:
            continue
        kind = t["state"]
        label = {"complete": "complete", "pruned": "pruned (x: where it stopped)"}.get(kind, kind)
        color = {"complete": svgplot.BLUE, "pruned": svgplot.GREY}.get(kind, svgplot.PURPLE)
        series.append(svgplot.Series(
            pts, color, label if label not in labelled else "", dashed=kind != "complete",
            opacity=0.65, end_marker="cross" if kind == "pruned" else None,
        ))
        labelled.add(label)
    won = next(t for t in trials if t["number"] == winner)
    series.append(svgplot.Series([tuple(p) for p in won["intermediate_values"]], svgplot.RED,
                                 f"winner (trial {winner})", marker="circle"))
    curves = svgplot.line_chart(series, title="Learning curves (validation loss per epoch)",
                                xlabel="epoch", ylabel=OBJECTIVE_NAME, log_y=True)
    imp = doc["importances"]["values"]
    importance = svgplot.bar_chart(list(imp), list(imp.values()), title="Parameter importances",
                                   xlabel=doc["importances"]["method"])
    return {"history": history, "curves": curves, "importance": importance}


# --- the document -------------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.2%}"


def _num(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def _duration(s: float | None) -> str:
    if s is None:
        return "-"
    s = round(s)
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h} h {m} min" if h else f"{m} min {sec} s" if m else f"{sec} s"


def summary_blocks(doc: dict) -> list[tuple]:
    r, st, t = doc["result"], doc["study"], doc["result"]["test"]
    uses = doc["test_split_uses"]
    states = ", ".join(f"{n} {k}" for k, n in st["trials_by_state"].items())
    val = r["validation"]
    items = [
        f"**Winner:** trial {r['trial']}; {r['source']}.",
        f"**Test:** accuracy **{_pct(t['accuracy'])}**, loss {t['loss']:.4f} on {t['images']:,} held-out "
        f"images; evaluated {r['finished_at']} on {r['device']} with hpsearch {r['code_version']} "
        f"(use {r['use']} of the test split).",
        f"**Validation:** loss {val['loss']:.4f}, accuracy {_pct(val['accuracy'])} (best epoch "
        f"{_num(val['best_epoch'])} of {_num(val['epochs'])}).",
    ]
    won = [c for c in r["selection"]["candidates"] if c.get("winner")]
    if won:
        c = won[0]
        items.append(f"**Selection:** mean validation loss {_num(c['mean_val_loss'])} ± {c['std_val_loss']:.2g} "
                     f"over {len(c['runs'])} seed(s), best of {r['selection']['top_k']} re-trained configuration(s).")
    n_workers, n_hosts = len(st["workers"]), len(st["hosts"])
    items.append(
        f"**Search:** {st['trials']} trials ({states}); budget {st['budget']['finished']}/"
        f"{st['budget']['n_trials']} finished; wall time {_duration(st['wall_time_s'])} "
        f"({_duration(st['compute_time_s'])} of training) on {n_workers} worker(s), {n_hosts} host(s)."
    )
    edges = doc["edge_warnings"]
    items.append(
        f"**Range edges:** {len(edges)} best parameter(s) at the edge of the search range: "
        + ", ".join(f"{e['param']} ({e['edge']})" for e in edges) + "."
        if edges else "**Range edges:** no best parameter is at the edge of its search range."
    )
    blocks: list[tuple] = [("ul", items)]
    if len(uses) > 1:
        blocks.append(("warn", f"The test split has been used {len(uses)} times (see below). Only the "
                               f"first evaluation is an unbiased estimate; later ones may have been "
                               f"influenced by earlier results."))
    blocks += [("h", 2, "Test split uses"), uses_table(uses)]
    return blocks


def uses_table(uses: list[dict]) -> tuple:
    rows = [[u.get("n"), u.get("at"), u.get("trial"), "yes" if u.get("forced") else "no",
             _pct(u.get("test_accuracy")), _num(u.get("test_loss")), "@".join(x for x in (u.get("user"), u.get("host")) if x),
             u.get("code_version"), f"`{u['command']}`" if u.get("command") else "-"] for u in uses]
    return ("table", ["#", "when (UTC)", "trial", "--force", "test accuracy", "test loss", "by", "code", "command"],
            rows)


def document(doc: dict) -> list[tuple]:
    r, st, test = doc["result"], doc["study"], doc["result"]["test"]
    space = st["search_space"]
    b: list[tuple] = [
        ("h", 1, f"hpsearch report: study `{st['name']}`"),
        ("p", f"Generated {doc['generated_at']} by hpsearch {doc['hpsearch_version']} from storage "
              f"`{st['storage']}`; study file `{st['source']}` (fingerprint {st['fingerprint']}), "
              f"dataset {st['dataset']}, train/validation/test split {st['split']}."),
        ("h", 2, "Summary"),
        *summary_blocks(doc),
    ]
    for e in doc["edge_warnings"]:
        b.append(("warn", e["message"]))
    for w in r.get("data", {}).get("warnings", []):  # a class missing from a part of the split
        b.append(("warn", w))

    b += [("h", 2, f"Winner: trial {r['trial']}"), ("p", r["source"] + ".")]
    edges = {e["param"]: e["edge"] for e in doc["edge_warnings"]}
    rows = []
    for name, value in r["hparams"].items():
        d = space.get(name, {"fixed": value})
        rng = ("fixed" if "fixed" in d else f"{d['choices']}" if "choices" in d
               else f"[{d['low']:g}, {d['high']:g}]" + (" log" if d["log"] else ""))
        note = f"at the {edges[name]} edge" if name in edges else ""
        if name == "momentum" and r["hparams"].get("optimizer") != "sgd":
            note = f"unused by {r['hparams'].get('optimizer')}"
        rows.append([name, _num(value), rng, note])
    b.append(("table", ["parameter", "value", "search range", "note"], rows))
    val = r["validation"]
    b.append(("ul", [
        f"validation loss {val['loss']:.4f} (the search recorded {_num(r['search_value'])}), accuracy "
        f"{_pct(val['accuracy'])}, best epoch {_num(val['best_epoch'])} of {_num(val['epochs'])}",
        f"seed {r['seed']}; weights: {r['weights_artifact'] or '-'}",
    ]))

    sel = r["selection"]
    if sel["candidates"]:
        b += [("h", 2, "Selection on validation"), ("p", sel["method"] + ".")]
        rows = []
        for c in sel["candidates"]:
            runs = ", ".join(f"seed {x['seed']}: {_num(x['val_loss'])}" for x in c["runs"])
            rows.append([c["trial"], _num(c["search_value"]), runs,
                         f"{_num(c['mean_val_loss'])} ± {c['std_val_loss']:.2g}", _pct(c["mean_val_accuracy"]),
                         "**winner**" if c.get("winner") else ""])
        b.append(("table", ["trial", "search val loss", "re-trained val loss", "mean ± std", "mean val acc", ""],
                  rows))
        ranked = sorted((c for c in sel["candidates"] if c["mean_val_loss"] is not None),
                        key=lambda c: c["mean_val_loss"])
        if len(ranked) > 1 and ranked[1]["mean_val_loss"] - ranked[0]["mean_val_loss"] < max(
                ranked[0]["std_val_loss"], ranked[1]["std_val_loss"]):
            b.append(("p", f"The winner's lead over trial {ranked[1]['trial']} is smaller than the seed-to-seed "
                           f"standard deviation: within seed noise, the two are equally good."))

    b += [("h", 2, "Test results"), ("ul", [
        f"accuracy {_pct(test['accuracy'])} ({test['correct']:,} of {test['images']:,}), loss {test['loss']:.4f}",
        f"test part fingerprint {test.get('fingerprint', '-')}; evaluated in {r['seconds']:.1f} s "
        f"(selection included) on {r['device']} ({r['host']})",
    ])]
    b.append(("table", ["class", "precision", "recall", "support"],
              [[c["class"], _pct(c["precision"]), _pct(c["recall"]), c["support"]] for c in test["per_class"]]))
    b += [("p", "Confusion matrix (rows: true class, columns: predicted class):"),
          ("heat", test["classes"], test["confusion_matrix"])]

    states = st["trials_by_state"]
    bud = st["budget"]
    b += [("h", 2, "The study"),
          ("table", ["state", "trials"], [[k, v] for k, v in states.items()] + [["**all**", st["trials"]]]),
          ("ul", [
              f"budget: {bud['finished']} of {bud['n_trials']} trials finished ({bud['complete']} complete, "
              f"{bud['pruned']} pruned, {bud['failed']} failed, {bud['running']} running)"
              + (f"; timeout {bud['timeout_minutes']:g} min" if bud["timeout_minutes"] else ""),
              f"wall time {_duration(st['wall_time_s'])} ({st['first_start']} to {st['last_end']}); "
              f"training time summed over trials {_duration(st['compute_time_s'])}",
              f"created {st['created_at']} by {st['created_by']}; up to {st['max_epochs']} epochs per trial",
              "sampler: " + ", ".join(f"{k}={v}" for k, v in st["sampler"].items()),
              "pruner: " + ", ".join(f"{k}={v}" for k, v in st["pruner"].items()),
          ]),
          ("table", ["worker (host:pid)", "trials"], [[w["worker"], w["trials"]] for w in st["workers"]]),
          ("table", ["host", "trials"], [[h["host"], h["trials"]] for h in st["hosts"]])]

    n_pruned = states.get("pruned", 0)
    b += [("h", 2, "Optimization history"), ("fig", "history", "Validation loss of each trial, and the best so far"),
          ("h", 2, "Learning curves"),
          ("fig", "curves", f"Validation loss per epoch of every trial; the {n_pruned} pruned trial(s) "
                            f"are dashed and end with a cross")]
    imp = doc["importances"]
    b.append(("h", 2, "Parameter importances"))
    if imp["values"]:
        b += [("fig", "importance", imp["method"]),
              ("table", ["parameter", "importance"], [[k, f"{v:.3f}"] for k, v in imp["values"].items()])]
    else:
        b.append(("p", f"Not available: {imp['note']}."))
    b.append(("h", 2, "Best parameters at the edge of their range"))
    b.append(("ul", [e["message"] for e in doc["edge_warnings"]]) if doc["edge_warnings"]
             else ("p", f"None: every best parameter lies inside the middle {1 - 2 * EDGE:.0%} of its range."))

    m = r["model"]
    b += [("h", 2, "Model"),
          ("table", ["layer", "type", "settings", "output shape", "parameters"],
           [[x["name"], x["type"], x["detail"], "×".join(map(str, x["output_shape"])), f"{x['parameters']:,}"]
            for x in m["layers"]]),
          ("ul", [f"input {'×'.join(map(str, m['input_shape']))}; {m['parameters']:,} parameters; "
                  f"{m['size_bytes'] / 1024:.1f} KiB of weights; {m['flops_per_sample'] / 1e6:.2f} MFLOPs per image"])]

    rep = doc["reproduce"]
    b += [("h", 2, "Reproduce the winner"),
          ("p", f"Run from the folder `finalize` ran in. `{rep['study_file']}` fixes every knob at the winner's value "
                f"and sets the seed; the run should end with a validation loss of about "
                f"{rep['expected_val_loss']:.4f} (exactly, on the same hardware and thread count)."),
          ("code", rep["command"])]

    rows = []
    for t in doc["trials"]:
        params = ", ".join(f"{k}={_num(v)}" for k, v in sorted(t["params"].items()))
        rows.append([t["number"], t["state"], _num(t["value"]), _pct(t["val_accuracy"]), _num(t["epochs"]),
                     t["stop_reason"] or "", params])
    b += [("h", 2, "All trials"), ("table", ["trial", "state", "val loss", "val acc", "epochs", "stopped", "params"],
                                   rows)]
    return b


# --- rendering ----------------------------------------------------------------------------------


def _md_cell(x: Any) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def render_markdown(blocks: list[tuple], figure_files: bool = True) -> str:
    out = []
    for blk in blocks:
        kind = blk[0]
        if kind == "h":
            out.append("#" * blk[1] + " " + blk[2])
        elif kind == "p":
            out.append(blk[1])
        elif kind == "ul":
            out.append("\n".join(f"- {item}" for item in blk[1]))
        elif kind == "warn":
            out.append(f"> **Warning:** {blk[1]}")
        elif kind == "table":
            head, rows = blk[1], blk[2]
            lines = ["| " + " | ".join(map(_md_cell, head)) + " |", "|" + "---|" * len(head)]
            lines += ["| " + " | ".join(map(_md_cell, row)) + " |" for row in rows]
            out.append("\n".join(lines))
        elif kind == "heat":
            classes, cm = blk[1], blk[2]
            lines = ["| true \\ predicted | " + " | ".join(map(_md_cell, classes)) + " |",
                     "|" + "---|" * (len(classes) + 1)]
            lines += ["| " + " | ".join([f"**{_md_cell(c)}**", *(str(v) for v in row)]) + " |"
                      for c, row in zip(classes, cm)]
            out.append("\n".join(lines))
        elif kind == "fig":
            if figure_files:
                out.append(f"![{blk[2]}]({blk[1]}.svg)")
        elif kind == "code":
            out.append(f"```bash\n{blk[1]}\n```")
        else:
            raise ValueError(f"unknown block kind, but got {kind=}")
    return "\n\n".join(out) + "\n"


def _inline(text: str) -> str:
    """Escape, then the two bits of Markdown the document uses: **bold** and `code`."""
    html = escape(str(text))
    html = re.sub(r"`([^`]+)`", r"<code>\1</code>", html)
    return re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", html)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}td,th{border:1px solid #ccc;padding:.25em .6em;
text-align:left;vertical-align:top}th{background:#f3f3f3}code,pre{background:#f5f5f5;border-radius:3px}
code{padding:0 .2em}pre{padding:.7em;overflow-x:auto}.warn{background:#fff4e5;border-left:4px solid #E69F00;
padding:.5em .8em;margin:.6em 0}figure{margin:1em 0}figcaption{color:#555;font-size:.9em}
table.heat td{text-align:right;min-width:2.6em}svg{max-width:100%;height:auto}
"""


def render_html(blocks: list[tuple], figs: dict[str, str], title: str) -> str:
    out = []
    for blk in blocks:
        kind = blk[0]
        if kind == "h":
            out.append(f"<h{blk[1]}>{_inline(blk[2])}</h{blk[1]}>")
        elif kind == "p":
            out.append(f"<p>{_inline(blk[1])}</p>")
        elif kind == "ul":
            out.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in blk[1]) + "</ul>")
        elif kind == "warn":
            out.append(f'<div class="warn"><strong>Warning:</strong> {_inline(blk[1])}</div>')
        elif kind == "table":
            head = "".join(f"<th>{_inline(h)}</th>" for h in blk[1])
            body = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in blk[2])
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif kind == "heat":
            classes, cm = blk[1], blk[2]
            top = max((v for row in cm for v in row), default=1) or 1
            head = "<th>true \\ predicted</th>" + "".join(f"<th>{escape(str(c))}</th>" for c in classes)
            rows = []
            for c, row in zip(classes, cm):
                cells = []
                for v in row:
                    alpha = 0.08 + 0.85 * v / top if v else 0.0
                    ink = "#fff" if alpha > 0.55 else "#222"
                    cells.append(f'<td style="background:rgba(0,114,178,{alpha:.2f});color:{ink}">{v}</td>')
                rows.append(f"<tr><th>{escape(str(c))}</th>{''.join(cells)}</tr>")
            out.append(f'<table class="heat"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>')
        elif kind == "fig":
            out.append(f"<figure>{figs[blk[1]]}<figcaption>{_inline(blk[2])}</figcaption></figure>")
        elif kind == "code":
            out.append(f"<pre><code>{escape(blk[1])}</code></pre>")
        else:
            raise ValueError(f"unknown block kind, but got {kind=}")
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{_CSS}</style></head>\n<body>\n"
        + "\n".join(out) + "\n</body></html>\n"
    )


def write_report(doc: dict, out_dir: Path) -> list[Path]:
    """report.json, report.md (+ its SVG figures), report.html (self-contained), reproduce.toml."""
    out_dir.mkdir(parents=True, exist_ok=True)
    blocks = document(doc)
    figs = figures(doc)
    files = {
        "report.json": json.dumps(doc, indent=2, allow_nan=False) + "\n",
        "report.md": render_markdown(blocks),
        "report.html": render_html(blocks, figs, f"hpsearch report: {doc['study']['name']}"),
        "reproduce.toml": doc["reproduce"]["study_file_text"],
        **{f"{name}.svg": svgplot.to_file(svg) for name, svg in figs.items()},
    }
    written = []
    for name, text in files.items():
        path = out_dir / name
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)  # a reader never sees half a report
        written.append(path)
    return written


def save_dashboard_note(study: optuna.Study, doc: dict) -> None:
    """The summary as the study's note in optuna-dashboard, where everyone watching will see it."""
    from optuna_dashboard import save_note

    body = render_markdown(
        [("h", 2, "Final test evaluation (hpsearch finalize)"), *summary_blocks(doc)], figure_files=False
    )
    save_note(study, body)

"""The report on synthetic studies built through Optuna's API (no training): a zero-loss winner,
47 classes, few trials and many. Real finalize on a real search is in test_finalize.py.

`synthetic_study` writes a real SQLite study whose trials carry what the objective records
(hparams, seed, per-epoch curves, stop reasons), and a finalize result with the fields finalize
stores, so `report.build_report` / `write_report` run exactly as after `hpsearch finalize`.
"""

from __future__ import annotations

import json
import math
import random
import re
import tomllib
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

from hpsearch import plots, report
from hpsearch.config import load_config
from hpsearch.dashboard import FINALIZE_HEADING, append_note_section
from hpsearch.model import ModelSpec, summarize
from hpsearch.study import ATTR

STUDY_TOML = """\
[study]
name = "{name}"

[data]
dataset = "idx"

[search]
lr = {{ low = 1e-4, high = 1e-1, log = true }}
weight_decay = {{ low = 1e-6, high = 1e-3, log = true }}
optimizer = {{ choices = ["adam", "sgd"] }}
momentum = {{ low = 0.5, high = 0.99 }}
conv1_channels = {{ low = 8, high = 32, log = true }}
conv2_channels = 32
dropout = {{ low = 0.0, high = 0.5 }}
batch_size = 128

[training]
max_epochs = 4

[pruner]
type = "median"

[budget]
n_trials = {n_trials}
"""

DISTRIBUTIONS = {
    "lr": FloatDistribution(1e-4, 1e-1, log=True),
    "weight_decay": FloatDistribution(1e-6, 1e-3, log=True),
    "optimizer": CategoricalDistribution(["adam", "sgd"]),
    "momentum": FloatDistribution(0.5, 0.99),
    "conv1_channels": IntDistribution(8, 32, log=True),
    "dropout": FloatDistribution(0.0, 0.5),
}


@dataclass
class Synthetic:
    study: optuna.Study
    cfg: object
    result: dict
    url: str
    out: Path


def _trial(number: int, rng: random.Random, value: float, state: TrialState, start: datetime,
           epochs: int = 4) -> FrozenTrial:
    opt = "sgd" if number % 3 == 1 else "adam"  # the winner, trial 3, uses Adam
    params = {"lr": 10 ** rng.uniform(-4, -1), "weight_decay": 10 ** rng.uniform(-6, -3), "optimizer": opt,
              "conv1_channels": rng.randint(8, 32), "dropout": rng.uniform(0, 0.5)}
    if opt == "sgd":
        params["momentum"] = rng.uniform(0.5, 0.99)
    hparams = {**params, "momentum": params.get("momentum", 0.0), "conv2_channels": 32, "batch_size": 128}
    if state == TrialState.PRUNED:
        epochs = 2
    # Validation loss falls towards `value`; training loss a little below it.
    curve = [[e, value * 0.8 + 0.5 / e, 0.9 - 0.3 / e, value + 0.4 / e * (e < epochs), 0.95 - 0.2 / e]
             for e in range(1, epochs + 1)]
    inter = {e: v for e, _, _, v, _ in curve} if state != TrialState.FAIL else {}
    attrs = {"hparams": hparams, "seed": 1000 + number, "epochs": epochs, "val_accuracy": 0.95,
             "worker": f"node{number % 2}:{100 + number % 2}", "host": f"node{number % 2}", "curve": curve,
             "stop_reason": {TrialState.PRUNED: "pruned after epoch 2", TrialState.FAIL: "out of memory on cuda"}
             .get(state, "reached max_epochs=4")}
    return FrozenTrial(
        number=number, state=state, value=value if state == TrialState.COMPLETE else None,
        datetime_start=start, datetime_complete=start + timedelta(seconds=40 + 5 * (number % 4)),
        params=params, distributions={k: DISTRIBUTIONS[k] for k in params}, user_attrs=attrs,
        system_attrs={}, intermediate_values=inter, trial_id=number,
    )


def synthetic_study(tmp: Path, *, n_complete: int, n_pruned: int = 0, n_failed: int = 0, classes: int = 10,
                    winner_value: float = 0.02, seeds: int = 0, name: str = "synthetic") -> Synthetic:
    study_file = tmp / f"{name}.toml"
    total = n_complete + n_pruned + n_failed
    study_file.write_text(STUDY_TOML.format(name=name, n_trials=total))
    cfg = load_config(study_file)
    url = f"sqlite:///{tmp}/{name}.db"
    study = optuna.create_study(study_name=name, storage=url)
    # What `hpsearch worker` records when it creates a study.
    study.set_user_attr(ATTR, {"config": cfg.model_dump(mode="json"), "source": str(study_file),
                               "fingerprint": cfg.fingerprint(), "created_at": "2026-11-25T08:59:00+00:00",
                               "created_by": "node0"})
    rng = random.Random(total * 31 + classes)
    t0 = datetime(2026, 11, 25, 9, 0, tzinfo=timezone.utc).replace(tzinfo=None)
    states = [TrialState.COMPLETE] * n_complete + [TrialState.PRUNED] * n_pruned + [TrialState.FAIL] * n_failed
    rng.shuffle(states)
    states.remove(TrialState.COMPLETE)
    states.insert(min(3, len(states)), TrialState.COMPLETE)  # the winner, trial 3 (or last)
    winner = min(3, total - 1)
    for n, state in enumerate(states):
        value = winner_value if n == winner else winner_value + 0.01 + rng.uniform(0, 1.5)
        study.add_trial(_trial(n, rng, value, state, t0 + timedelta(seconds=30 * n)))
    won = study.trials[winner]
    k = classes
    names = [f"c{i}" for i in range(k)]
    support = [20 if i != k - 1 else 0 for i in range(k)]  # the last class has no test images
    cm = [[(support[i] - 2 if i == j else (2 if j == (i + 1) % k else 0)) if support[i] else 0
           for j in range(k)] for i in range(k)]
    correct = sum(cm[i][i] for i in range(k))
    images = sum(support)
    candidates = []
    if seeds:
        for c, t in enumerate(sorted((t for t in study.trials if t.value is not None), key=lambda t: t.value)[:3]):
            runs = [{"seed": s, "val_loss": winner_value + 0.003 * s + 0.01 * c} for s in range(seeds)]
            losses = [r["val_loss"] for r in runs]
            mean = sum(losses) / seeds
            std = math.sqrt(sum((x - mean) ** 2 for x in losses) / (seeds - 1))
            candidates.append({"trial": t.number, "search_value": t.value, "hparams": t.user_attrs["hparams"],
                               "runs": runs, "mean_val_loss": mean, "std_val_loss": std,
                               "mean_val_accuracy": 0.95, "winner": c == 0})
    spec = ModelSpec(in_channels=1, num_classes=k, input_hw=(24, 24), conv1_channels=won.params["conv1_channels"],
                     conv2_channels=32, dropout=won.params["dropout"])
    result = {
        "use": 1, "trial": winner, "search_value": won.value, "params": won.params,
        "hparams": won.user_attrs["hparams"], "seed": 1000 + winner, "source": f"checkpoint of trial {winner}",
        "retrained": False, "weights_artifact": None,
        "validation": {"loss": won.value, "accuracy": 0.99, "best_epoch": 4, "epochs": 4,
                       "class_counts": [5] * (k - 2) + [0, 5]},
        "selection": {"method": "test", "top_k": len(candidates) or 1, "seeds": list(range(seeds)),
                      "candidates": candidates},
        "test": {"loss": 0.1, "accuracy": correct / images, "images": images, "correct": correct, "classes": names,
                 "per_class": [{"class": names[i], "precision": None, "recall": None, "support": support[i]}
                               for i in range(k)],
                 "confusion_matrix": cm, "fingerprint": "f" * 16},
        "model": summarize(spec), "device": "cpu", "host": "node0", "data_dir": str(tmp),
        "started_at": "2026-11-25T10:00:00+00:00", "finished_at": "2026-11-25T10:01:00+00:00", "seconds": 60.0,
        "code_version": "0.1.0", "forced": False, "data_warnings": [],
    }
    uses = [{"n": 1, "at": "2026-11-25T10:00:30+00:00", "trial": winner, "forced": False,
             "command": "hpsearch finalize --study synthetic | tee log", "test_accuracy": correct / images}]
    study.set_user_attr("hpsearch_test_uses", uses)
    return Synthetic(study, cfg, result, url, tmp / "reports" / name)


def write(s: Synthetic) -> dict:
    doc = report.build_report(s.study, s.cfg, s.url, s.out, s.result, s.study.user_attrs["hpsearch_test_uses"])
    report.write_report(s.study, doc, s.out)
    return doc


ALL_PLOTS = ("history", "intermediate", "curves", "parallel", "slice", "contour", "importance", "timeline",
             "confusion")


# --- scales -------------------------------------------------------------------------------------


@pytest.mark.parametrize("values, scale", [
    ([0.5, 0.6, 0.7], "linear"),
    ([0.001, 0.5, 2.3], "log"),
    ([0.0, 0.001, 0.5, 2.3], "symlog"),  # a zero-loss winner: log would drop it
    ([-1.0, 0.01, 3.0], "symlog"),
    ([0.0, 0.5, 0.7], "linear"),
    ([float("nan"), 0.2, 0.3], "linear"),
])
def test_value_scale_shows_every_point(values, scale):
    assert plots.value_scale(values)[0] == scale


def test_symlog_axis_keeps_zero_and_every_point_in_view():
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    values = [0.0, 0.0004, 0.3, 2.0]
    ax.plot(range(4), values, "o")
    assert plots.apply_scale(ax, values) == "symlog"
    lo, hi = ax.get_ylim()
    assert lo <= 0.0 and hi >= 2.0
    # Every point lands at a distinct, finite height on the axis (log would map 0 to -inf).
    ys = ax.transData.transform([(i, v) for i, v in enumerate(values)])[:, 1]
    assert all(math.isfinite(y) for y in ys) and len(set(ys.round(3))) == 4
    plt.close(fig)


def test_hand_drawn_figures_have_their_content():
    curve = [[1, 1.0, 0.6, 0.9, 0.7], [2, 0.5, 0.8, 0.4, 0.85], [3, 0.2, 0.9, 0.0, 1.0]]
    svg = plots.curves(curve, 7).svg
    assert svg is not None and "training loss" in svg and "validation accuracy" in svg
    # Two panels with two lines each, and the zero-loss epoch: a symlog axis (log would drop it).
    assert svg.count('id="line2d_') >= 4
    cm = plots.confusion(["a", "b"], [[3, 1], [0, 4]]).svg
    assert "predicted class" in cm and ">3<" in cm and ">4<" in cm
    missing = plots.curves([], 3)
    assert missing.svg is None and "no epochs" in missing.missing
    inline = plots.inline(svg)
    assert inline.startswith("<svg") and "http" not in inline


# --- whole reports ------------------------------------------------------------------------------


def _figures(md: str) -> set[str]:
    return set(re.findall(r"\]\((\w+)\.svg\)", md))


def test_zero_loss_winner_is_shown_and_stays_best(tmp_path):
    s = synthetic_study(tmp_path, n_complete=12, n_pruned=5, n_failed=1, winner_value=0.0)
    doc = write(s)
    md = (s.out / "report.md").read_text()
    assert _figures(md) == set(ALL_PLOTS)
    history = (s.out / "history.svg").read_text()
    assert "winner (trial 3)" in history
    # Not a log axis: it has no place for 0 (linear or symlog, depending on the spread).
    assert plots.value_scale([t["value"] for t in doc["trials"] if t["value"] is not None])[0] != "log"
    steps = [v for t in doc["trials"] for _, v in t["intermediate_values"]]
    assert 0.0 in steps and plots.value_scale(steps)[0] != "log"
    assert doc["result"]["trial"] == 3 and min(t["value"] for t in doc["trials"] if t["value"] is not None) == 0.0


def test_few_trials_report_cautions_and_measure_command(tmp_path):
    s = synthetic_study(tmp_path, n_complete=5, n_pruned=1)
    doc = write(s)
    md = (s.out / "report.md").read_text()
    assert "Only 5 complete trial(s)" in md and f"fewer than {report.MIN_TRIALS_FOR_IMPORTANCES}" in md
    assert "was not compared with seed noise" in md
    assert doc["why"]["measure_command"] in md and "--top-k 4 --seeds 3" in doc["why"]["measure_command"]
    # Momentum under Adam: flagged in the parameter table and the caution list.
    assert doc["result"]["hparams"]["optimizer"] == "adam"
    assert "momentum is not used by the winner's optimizer (adam)" in md
    assert re.search(r"\| momentum \| 0 \| \[0.5, 0.99\] \| unused by adam \|", md)
    # PED-ANOVA ranks the conditional momentum (0.000 here): its row says the winner does not use it.
    imp = doc["importances"]
    assert "momentum" in imp["values"] or "momentum" in imp["left_out"]
    if "momentum" in imp["values"]:
        assert re.search(r"\| momentum \| [0-9.]+ \| unused by the winner \(adam\) \|", md)
    # Classes without test or validation images.
    assert "class c9 has no test images" in md and "class c8 has no validation images" in md
    # The median pruner lists its own settings only.
    assert "pruner: type=median, n_startup_trials=" in md and "reduction_factor" not in md


def test_seed_noise_verdicts(tmp_path):
    s = synthetic_study(tmp_path, n_complete=25, seeds=3)
    doc = write(s)
    noise = doc["why"]["seed_noise"]
    assert noise["measured"] and noise["seeds"] == 3 and noise["std"] == pytest.approx(0.003)
    # Runs differ by 0.01 per rank with std 0.003: 0.01 / (0.003 * sqrt(2/3)) = 4.1 standard errors.
    first = noise["comparisons"][0]
    assert first["z"] == pytest.approx(0.01 / (0.003 * math.sqrt(2 / 3)))
    assert first["verdict"] == "larger than seed noise"
    md = (s.out / "report.md").read_text()
    assert "larger than seed noise" in md and "was not compared" not in md
    assert "Only 25" not in md
    assert report.seed_noise({"candidates": []})["measured"] is False
    assert report._verdict(0.5) == "within seed noise" and report._verdict(1.5) == "about the size of seed noise"


def test_many_trials_and_47_classes(tmp_path):
    s = synthetic_study(tmp_path, n_complete=80, n_pruned=30, n_failed=4, classes=47)
    doc = write(s)
    md = (s.out / "report.md").read_text()
    assert _figures(md) == set(ALL_PLOTS)
    assert "The full 47×47 matrix is in `report.json`" in md
    assert len(doc["result"]["test"]["confusion_matrix"]) == 47
    html = (s.out / "report.html").read_text()
    assert html.count("<svg") == len(ALL_PLOTS)
    # The intermediate-values legend would name 110 trials: it is dropped above LEGEND_MAX.
    assert "Trial57" not in (s.out / "intermediate.svg").read_text()


def test_one_template_makes_markdown_and_html_say_the_same(tmp_path):
    s = synthetic_study(tmp_path, n_complete=6)
    write(s)
    md = (s.out / "report.md").read_text()
    html = (s.out / "report.html").read_text()
    headings = re.findall(r"^## (.+)$", md, re.M)
    assert len(headings) > 8
    for h in headings:
        assert f"<h2>{h.replace('`', '')}" in re.sub(r"</?code>", "", html)
    # A pipe inside a cell (the recorded command) does not split the row, in either rendering.
    assert "`hpsearch finalize --study synthetic \\| tee log`" in md
    assert "<code>hpsearch finalize --study synthetic | tee log</code>" in html
    # reproduce.toml is TOML (written by tomli-w) and loads as a study file.
    text = (s.out / "reproduce.toml").read_text()
    conf = tomllib.loads(text)
    assert conf["budget"]["n_trials"] == 1 and conf["pruner"] == {"type": "none"}
    assert load_config(s.out / "reproduce.toml").search.lr == s.result["hparams"]["lr"]
    json.loads((s.out / "report.json").read_text())


def test_finalize_note_is_appended_below_the_workers(tmp_path):
    from optuna_dashboard import get_note, save_note

    s = synthetic_study(tmp_path, n_complete=4)
    save_note(s.study, "## synthetic\n\nWorker's note: search space, split sizes, budget.\n")
    doc = report.build_report(s.study, s.cfg, s.url, s.out, s.result, [])
    append_note_section(s.study, report.note_section(doc))
    first = get_note(s.study)
    assert first.startswith("## synthetic\n\nWorker's note") and FINALIZE_HEADING in first
    # A second finalize (--force) replaces its own section, keeps the worker's, adds no duplicate.
    append_note_section(s.study, report.note_section(doc))
    second = get_note(s.study)
    assert second == first and second.count(FINALIZE_HEADING) == 1
    with pytest.raises(ValueError, match="starts with"):
        append_note_section(s.study, "## something else")


def test_unused_momentum_is_flagged_only_when_searched():
    adam = {"optimizer": "adam", "momentum": 0.0}
    assert [u["param"] for u in report.unused_params(adam, {"lr", "momentum"})] == ["momentum"]
    assert report.unused_params(adam, {"lr"}) == []  # a fixed momentum: nothing to read into it
    assert report.unused_params({"optimizer": "sgd", "momentum": 0.9}, {"momentum"}) == []


@pytest.mark.fast
def test_html_escapes_what_the_study_brings():
    # Names, descriptions and commands come from users: none of it may become markup in the page.
    html = report.render_html("# study `<b>x</b>`\n\nrun <script>alert(1)</script> & go\n", [], "<script>t</script>")
    assert "<script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; go" in html
    assert "<title>&lt;script&gt;t&lt;/script&gt;</title>" in html
    assert "<code>&lt;b&gt;x&lt;/b&gt;</code>" in html

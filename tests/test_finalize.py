"""`hpsearch finalize` on the real MNIST test set: one short search per module, then finalize on copies.

Every test that finalizes works on its own copy of the searched study (the lock is per study), so
the tests do not depend on their order. The test split's reads are counted twice: by the module
counter `finalize.test_split_reads` (in-process) and by the uses the study records.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import sqlite3
import os
import statistics
import subprocess
import sys
import uuid
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState
from optuna_dashboard._note import get_note_from_system_attrs
from rich.console import Console

from conftest import run_cli, write_study
from hpsearch import cli, finalize, train
from hpsearch.checkpoint import BEST_WEIGHTS, load_checkpoint
from hpsearch.config import load_config
from hpsearch.data import load_test_data, read_idx, write_idx
from hpsearch.progress import Display
from hpsearch.report import edge_warnings
from hpsearch.storage import artifact_store, open_storage
from hpsearch.study import open_study
from hpsearch.worker import WorkerOptions, run_worker

pytestmark = pytest.mark.slow
# With 4 trials Optuna draws every plot (contour and slice included).
FIGURES = ("history", "intermediate", "curves", "parallel", "slice", "contour", "importance", "timeline", "confusion")

STUDY = "quick"
# A winner from these few short trials scores 97-98% on the test part; chance is 10%. The bar says
# "a trained model was evaluated", with room for the run-to-run spread of a 4-trial search.
LEARNED = 0.96
PG_URL = os.environ.get("HPSEARCH_TEST_POSTGRES", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")


@dataclass(frozen=True)
class Searched:
    root: Path
    study_file: Path

    @property
    def db(self) -> Path:
        return self.root / "hpsearch.db"


def _quiet() -> Display:
    return Display(Console(file=io.StringIO()), live=False)


@pytest.fixture(scope="module")
def searched(tmp_path_factory, mnist_dir) -> Searched:
    """One short real search (4 trials, up to 6 epochs: the winner reaches ~98% on validation)."""
    root = tmp_path_factory.mktemp("search")
    study_file = write_study(root / "quick.toml", name=STUDY, n_trials=4, max_epochs=6)
    cfg = load_config(study_file)
    run_worker(WorkerOptions(cfg=cfg, storage_url=f"sqlite:///{root}/hpsearch.db", data_dir=str(mnist_dir),
                             device="cpu"), _quiet())
    return Searched(root, study_file)


def copy_study(searched: Searched, dest: Path, artifacts: bool = True) -> Path:
    """A private copy of the searched study (SQLite's backup API: consistent despite WAL)."""
    dest.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(searched.db) as src, sqlite3.connect(dest / "hpsearch.db") as dst:
        src.backup(dst)
    if artifacts:
        shutil.copytree(searched.root / "hpsearch-artifacts", dest / "hpsearch-artifacts")
    return dest


def url(d: Path) -> str:
    return f"sqlite:///{d}/hpsearch.db"


def run_finalize(d: Path, mnist_dir: Path, *extra: str, data_dir: Path | None = None, study: str = STUDY,
                 storage: str | None = None) -> tuple[int, str, str]:
    """`hpsearch finalize` in this process (so `finalize.test_split_reads` sees its reads)."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = cli.main(["finalize", "--study", study, "--storage", storage or url(d), "--out", str(d / "reports"),
                       "--data-dir", str(data_dir or mnist_dir), "--device", "cpu", *extra])
    return rc, out.getvalue(), err.getvalue()


def load(d: Path) -> optuna.Study:
    return optuna.load_study(study_name=STUDY, storage=url(d))


def note_body(study: optuna.Study) -> str:
    note = get_note_from_system_attrs(study._storage.get_study_system_attrs(study._study_id), None)
    return note["body"]


@pytest.fixture(scope="module")
def finalized(searched, mnist_dir, tmp_path_factory) -> Path:
    d = copy_study(searched, tmp_path_factory.mktemp("finalized"))
    rc, out, err = run_finalize(d, mnist_dir)
    assert rc == 0, err
    assert "test: accuracy" in out
    return d


# --- the report ---------------------------------------------------------------------------------


def test_report_files_exist_and_match_the_database(finalized):
    report_dir = finalized / "reports" / STUDY
    for name in ("report.md", "report.html", "report.json", "reproduce.toml", "model.pt2",
                 *(f"{p}.svg" for p in FIGURES)):
        assert (report_dir / name).is_file(), name
    doc = json.loads((report_dir / "report.json").read_text())
    study = load(finalized)
    trials = study.get_trials()

    # The study's figures.
    assert doc["study"]["trials"] == len(trials) == 4
    for state in TrialState:
        n = sum(t.state == state for t in trials)
        assert doc["study"]["trials_by_state"].get(state.name.lower(), 0) == n
    assert doc["study"]["budget"]["finished"] == len(trials)
    by_number = {t.number: t for t in trials}
    for row in doc["trials"]:
        t = by_number[row["number"]]
        assert row["state"] == t.state.name.lower()
        assert row["value"] == t.value
        assert row["params"] == t.params
        assert dict((s, v) for s, v in row["intermediate_values"]) == t.intermediate_values
        # The objective's per-epoch training and validation figures: the validation loss is the
        # reported intermediate value, the training ones are real (a falling loss, an accuracy).
        curve = t.user_attrs["curve"]
        assert {e: vl for e, _, _, vl, _ in curve} == t.intermediate_values
        assert all(tl > 0 and 0 < ta <= 1 and 0 < va <= 1 for _, tl, ta, _, va in curve)

    best_curve = study.best_trial.user_attrs["curve"]
    assert len(best_curve) > 1 and best_curve[-1][1] < best_curve[0][1], "the winner's training loss fell"

    # The winner: the best trial, with its own checkpoint (nothing re-trained).
    result = study.user_attrs[finalize.RESULT_ATTR]
    assert doc["result"] == result
    assert result["trial"] == study.best_trial.number
    assert result["validation"]["loss"] == study.best_value
    assert result["retrained"] is False
    ckpt = load_checkpoint(artifact_store(url(finalized)), study.best_trial.user_attrs[BEST_WEIGHTS])
    assert result["model"]["parameters"] == sum(t.numel() for t in ckpt.state_dict.values())
    assert result["hparams"] == study.best_trial.user_attrs["hparams"]

    # The test figures are consistent with each other and good enough.
    test = result["test"]
    cm = np.array(test["confusion_matrix"])
    assert cm.shape == (10, 10) and cm.sum() == test["images"] > 1000
    assert np.trace(cm) == test["correct"]
    assert test["accuracy"] == pytest.approx(test["correct"] / test["images"])
    for c, row in enumerate(test["per_class"]):
        assert row["recall"] == pytest.approx(cm[c, c] / cm[c].sum())
        assert row["precision"] == pytest.approx(cm[c, c] / cm[:, c].sum())
    assert test["accuracy"] >= LEARNED

    # One use, recorded with its figures, and the same numbers in every rendering.
    uses = study.user_attrs[finalize.USES_ATTR]
    assert [u["n"] for u in uses] == [1] and uses[0]["test_accuracy"] == test["accuracy"]
    acc = f"{test['accuracy']:.2%}"
    md = (report_dir / "report.md").read_text()
    html = (report_dir / "report.html").read_text()
    for text in (md, html, note_body(study)):
        assert acc in text
        assert f"trial {result['trial']}" in text
    assert f"{study.best_value:.4f}" in md
    assert "![" in md and "history.svg" in md


def test_finalize_appends_to_the_workers_note(finalized):
    body = note_body(load(finalized))
    # The worker's note (search space, split sizes, budget) is still there, above finalize's section.
    for kept in ("### Search space", "### Data", "### Budget"):
        assert kept in body
    assert body.index("### Budget") < body.index("## Final test evaluation (hpsearch finalize)")


EXPORT_CHECK = """
import json, sys
sys.modules["hpsearch"] = None  # any import of hpsearch now fails: the model must not need it
import torch
meta = {"hpsearch.json": ""}
model = torch.export.load(sys.argv[1], extra_files=meta).module()
data = torch.load(sys.argv[2])
images, labels = data["images"], data["labels"]
with torch.inference_mode():
    pred = torch.cat([model(images[i:i + 1000]).argmax(dim=1) for i in range(0, len(labels), 1000)])
print(json.dumps({"correct": int((pred == labels).sum()), "images": len(labels),
                  "classes": json.loads(meta["hpsearch.json"])["classes"],
                  "hpsearch_modules": [m for m in sys.modules if m.startswith("hpsearch") and sys.modules[m]]}))
"""


def test_exported_model_reproduces_the_test_accuracy_without_hpsearch(finalized, searched, mnist_dir, tmp_path):
    """model.pt2 in a fresh `python -I` that cannot import hpsearch: the same test accuracy."""
    result = load(finalized).user_attrs[finalize.RESULT_ATTR]
    model = finalized / "reports" / STUDY / result["export"]["file"]
    # The test images as stored (uint8, uncropped): the exported program crops and normalises itself.
    test = load_test_data(load_config(searched.study_file).data, mnist_dir, torch.device("cpu"))
    torch.save({"images": test.test.images, "labels": test.test.labels}, tmp_path / "test.pt")
    r = subprocess.run([sys.executable, "-I", "-c", EXPORT_CHECK, str(model), str(tmp_path / "test.pt")],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["hpsearch_modules"] == [] and out["classes"] == result["test"]["classes"]
    assert out["images"] == result["test"]["images"]
    assert out["correct"] / out["images"] == result["export"]["test_accuracy"]
    if result["precision"]["bf16"]:  # finalize evaluated in bf16; the program runs in fp32
        assert abs(out["correct"] - result["test"]["correct"]) <= 0.003 * out["images"]
    else:
        assert out["correct"] == result["test"]["correct"]
    md = (finalized / "reports" / STUDY / "report.md").read_text()
    assert "## Use the model" in md and "torch.export.load" in md


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.refs += [v or "" for k, v in attrs if k in {"src", "href", "xlink:href", "srcset", "action", "data"}]


def test_report_html_opens_offline(finalized):
    html = (finalized / "reports" / STUDY / "report.html").read_text()
    parser = _Refs()
    parser.feed(html)
    assert parser.tags.count("svg") == len(FIGURES), "every plot is inline"
    assert "link" not in parser.tags and "script" not in parser.tags and "img" not in parser.tags
    # Nothing to fetch: no attribute points anywhere but inside the page, no URL in the text or CSS.
    assert all(r.startswith(("#", "data:")) for r in parser.refs), parser.refs
    # (matplotlib clips with url(#id): a reference inside the page.)
    assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/|url\((?!#)|@import", html, re.IGNORECASE)


def test_reproduce_command_retrains_the_winner(finalized, mnist_dir, tmp_path):
    doc = json.loads((finalized / "reports" / STUDY / "report.json").read_text())
    rep = doc["reproduce"]
    args = rep["command"].split()
    assert args[:3] == ["hpsearch", "worker", "--study"] and args[3] == rep["study_file"]
    cfg = load_config(rep["study_file"])
    assert cfg.budget.n_trials == 1 and cfg.pruner.type == "none"
    storage = f"sqlite:///{tmp_path}/again.db"
    run_worker(WorkerOptions(cfg=cfg, storage_url=storage, device="cpu"), _quiet())
    again = optuna.load_study(study_name=cfg.study.name, storage=storage).best_trial
    assert again.user_attrs["seed"] == doc["result"]["seed"]
    assert again.value == pytest.approx(doc["result"]["validation"]["loss"], rel=1e-4)


def test_edge_warnings_name_every_best_parameter_at_an_end_of_its_range():
    trial = optuna.trial.create_trial(
        params={"lr": 0.0099, "dropout": 0.15, "conv1_channels": 8, "batch_size": 256, "optimizer": "adam",
                "weight_decay": 1.1e-6},
        distributions={
            "lr": FloatDistribution(1e-3, 1e-2, log=True),
            "dropout": FloatDistribution(0.0, 0.3),
            "conv1_channels": IntDistribution(8, 32, log=True),
            "batch_size": CategoricalDistribution([64, 128, 256]),
            "optimizer": CategoricalDistribution(["adam", "adamw", "sgd"]),
            "weight_decay": FloatDistribution(1e-6, 1e-4, log=True),
        },
        value=0.05,
    )
    found = {w["param"]: w["edge"] for w in edge_warnings(trial)}
    # weight_decay 1.1e-6 is 2% of the way along its log range: an edge; dropout is mid-range.
    assert found == {"lr": "upper", "conv1_channels": "lower", "batch_size": "upper", "weight_decay": "lower"}


# --- the lock -----------------------------------------------------------------------------------


def test_test_split_is_read_once_then_locked_and_force_is_recorded(searched, mnist_dir, tmp_path):
    d = copy_study(searched, tmp_path / "lock")
    reads = finalize.test_split_reads

    rc, out, _ = run_finalize(d, mnist_dir)
    assert rc == 0 and finalize.test_split_reads == reads + 1
    first = load(d).user_attrs[finalize.RESULT_ATTR]

    rc, out, _ = run_finalize(d, mnist_dir)
    assert rc == 0 and finalize.test_split_reads == reads + 1, "a second finalize must not read it"
    assert "already finalized" in out and f"{first['test']['accuracy']:.2%}" in out
    study = load(d)
    assert len(study.user_attrs[finalize.USES_ATTR]) == 1
    assert study.user_attrs[finalize.RESULT_ATTR] == first

    rc, out, _ = run_finalize(d, mnist_dir, "--force")
    assert rc == 0 and finalize.test_split_reads == reads + 2
    study = load(d)
    uses = study.user_attrs[finalize.USES_ATTR]
    assert [u["n"] for u in uses] == [1, 2]
    assert [u["forced"] for u in uses] == [False, True]
    assert all(u["test_accuracy"] is not None and u["at"] and u["code_version"] for u in uses)
    assert "--force" in uses[1]["command"]
    assert study.user_attrs[finalize.RESULT_ATTR]["use"] == 2

    md = (d / "reports" / STUDY / "report.md").read_text()
    table = md.split("## Test split uses", 1)[1].split("\n## ", 1)[0]
    assert len([line for line in table.splitlines() if re.match(r"\| \d+ \|", line)]) == 2
    assert "used 2 times" in md
    assert "used 2 times" in note_body(study)


def test_a_read_without_a_stored_result_still_locks(searched, mnist_dir, tmp_path):
    """A run that read the test split and then died leaves a use but no result: that is a look too."""
    d = copy_study(searched, tmp_path / "interrupted")
    study = load(d)
    interrupted = {"n": 1, "at": "2026-01-01T00:00:00+00:00", "trial": study.best_trial.number, "forced": False}
    study.set_user_attr(finalize.USES_ATTR, [interrupted])
    reads = finalize.test_split_reads

    rc, out, err = run_finalize(d, mnist_dir)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "--force" in err and "interrupted" in err
    # The same check guards the moment of reading, for a finalize that started before the other read.
    cfg = load_config(searched.study_file)
    with pytest.raises(finalize.HpsearchError, match="another finalize"):
        finalize.read_test_split(study, open_storage(url(d)), cfg, mnist_dir, torch.device("cpu"), {"trial": 0},
                                 force=False)
    assert finalize.test_split_reads == reads
    assert load(d).user_attrs[finalize.USES_ATTR] == [interrupted]

    rc, out, err = run_finalize(d, mnist_dir, "--force")
    assert rc == 0, err
    assert finalize.test_split_reads == reads + 1
    uses = load(d).user_attrs[finalize.USES_ATTR]
    assert [u["n"] for u in uses] == [1, 2] and uses[1]["forced"] and "test_accuracy" in uses[1]


# --- selection by re-training -------------------------------------------------------------------


def test_top_k_seeds_trains_four_runs_and_picks_by_mean_validation_loss(searched, mnist_dir, tmp_path,
                                                                        monkeypatch):
    d = copy_study(searched, tmp_path / "topk")
    calls = []
    real_fit = train.fit

    def counting_fit(*args, **kwargs):
        calls.append(kwargs["seed"])
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(train, "fit", counting_fit)
    reads = finalize.test_split_reads
    rc, out, err = run_finalize(d, mnist_dir, "--top-k", "2", "--seeds", "2")
    assert rc == 0, err
    assert len(calls) == 4
    assert finalize.test_split_reads == reads + 1

    study = load(d)
    result = study.user_attrs[finalize.RESULT_ATTR]
    sel = result["selection"]
    best_two = sorted((t for t in study.get_trials() if t.state == TrialState.COMPLETE),
                      key=lambda t: t.value)[:2]
    assert [c["trial"] for c in sel["candidates"]] == [t.number for t in best_two]
    means = []
    for c in sel["candidates"]:
        losses = [r["val_loss"] for r in c["runs"]]
        assert [r["seed"] for r in c["runs"]] == sel["seeds"] and len(set(sel["seeds"])) == 2
        assert c["mean_val_loss"] == pytest.approx(statistics.fmean(losses))
        assert c["std_val_loss"] == pytest.approx(statistics.stdev(losses))
        means.append(c["mean_val_loss"])
    winner = sel["candidates"][int(np.argmin(means))]
    assert winner["winner"] and result["trial"] == winner["trial"]
    assert result["retrained"] and result["validation"]["loss"] == min(r["val_loss"] for r in winner["runs"])
    assert result["test"]["accuracy"] >= LEARNED
    # The tested (re-trained) model is kept as a study artifact.
    assert (d / "hpsearch-artifacts" / result["weights_artifact"]).is_file()
    md = (d / "reports" / STUDY / "report.md").read_text()
    assert "## Selection on validation" in md and f"{winner['mean_val_loss']:.4g} ±" in md


def test_pick_by_mean_is_the_mean_not_the_best_single_run():
    table = [
        {"trial": 3, "mean_val_loss": 0.060},  # runs 0.030 and 0.090: the best single run, worse mean
        {"trial": 5, "mean_val_loss": 0.050},  # runs 0.049 and 0.051
        {"trial": 7, "mean_val_loss": None},  # a seed diverged
    ]
    assert finalize.pick_by_mean(table) == 1
    assert finalize.pick_by_mean([{"trial": 1, "mean_val_loss": None}]) is None
    assert finalize.pick_by_mean([{"trial": 1, "mean_val_loss": 0.05}, {"trial": 2, "mean_val_loss": 0.05}]) == 0


def test_missing_checkpoint_is_retrained_and_said_so(searched, mnist_dir, tmp_path):
    d = copy_study(searched, tmp_path / "nockpt", artifacts=False)
    rc, out, err = run_finalize(d, mnist_dir)
    assert rc == 0, err
    assert "missing" in out and "re-training" in out
    study = load(d)
    result = study.user_attrs[finalize.RESULT_ATTR]
    assert result["retrained"] and "missing" in result["source"]
    # Same parameters, same seed, same machine: the lost checkpoint's validation loss again.
    assert result["validation"]["loss"] == pytest.approx(study.best_value, rel=1e-4)
    assert result["test"]["accuracy"] >= LEARNED
    assert "missing" in (d / "reports" / STUDY / "report.md").read_text()


# --- errors: one line, exit 2, nothing written --------------------------------------------------


def snapshot(d: Path) -> tuple:
    """The files under `d` with their bytes, and the studies' attributes."""
    files = {p.relative_to(d): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()
             and not p.name.endswith(("-wal", "-shm"))}
    storage = optuna.storages.RDBStorage(url(d))
    attrs = [(s._study_id, storage.get_study_user_attrs(s._study_id), storage.get_study_system_attrs(s._study_id))
             for s in optuna.get_all_study_summaries(storage)]
    storage.remove_session()
    storage.engine.dispose()
    return sorted(files), attrs


def test_unknown_study_lists_the_existing_ones(searched, mnist_dir, tmp_path):
    d = copy_study(searched, tmp_path / "unknown")
    before = snapshot(d)
    r = run_cli("finalize", "--study", "nope", "--storage", url(d), "--out", str(d / "reports"),
                "--data-dir", str(mnist_dir), cwd=tmp_path)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert "'nope'" in r.stderr and STUDY in r.stderr
    assert snapshot(d) == before


def test_no_completed_trial_is_an_error(searched, mnist_dir, tmp_path, capsys):
    d = tmp_path / "empty"
    d.mkdir()
    cfg = load_config(searched.study_file)
    storage = open_storage(url(d), cfg.storage)
    open_study(cfg, storage)
    storage.close()
    before = snapshot(d)
    rc, out, err = run_finalize(d, mnist_dir)
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "no completed trial" in err and "hpsearch worker" in err
    assert snapshot(d) == before


def test_missing_data_is_an_error_and_nothing_is_written(searched, mnist_dir, tmp_path):
    d = copy_study(searched, tmp_path / "nodata")
    before = snapshot(d)
    reads = finalize.test_split_reads
    rc, out, err = run_finalize(d, mnist_dir, data_dir=tmp_path / "no-such-dir")
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "no-such-dir" in err and "--data-dir" in err
    assert finalize.test_split_reads == reads
    assert snapshot(d) == before


def test_other_data_than_the_search_used_is_refused(searched, mnist_dir, tmp_path):
    """A different pool gives a different test part: finalize must not evaluate on it."""
    other = tmp_path / "other-data"
    other.mkdir()
    images = read_idx(mnist_dir / "t10k-images-idx3-ubyte.gz")[:6000]
    labels = read_idx(mnist_dir / "t10k-labels-idx1-ubyte.gz")[:6000]
    write_idx(other / "part-images-idx3-ubyte.gz", images)
    write_idx(other / "part-labels-idx1-ubyte.gz", labels)
    d = copy_study(searched, tmp_path / "otherdata")
    before = snapshot(d)
    reads = finalize.test_split_reads
    rc, out, err = run_finalize(d, mnist_dir, data_dir=other)
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "not what study" in err and "--data-dir" in err
    assert finalize.test_split_reads == reads
    assert snapshot(d) == before


def test_missing_storage_is_an_error_and_creates_nothing(mnist_dir, tmp_path):
    rc, out, err = run_finalize(tmp_path, mnist_dir)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "no study storage" in err
    assert list(tmp_path.iterdir()) == []


# --- PostgreSQL ---------------------------------------------------------------------------------


@pytest.mark.postgres
def test_finalize_and_lock_on_postgresql(searched, mnist_dir, tmp_path):
    """The same study on the shared PostgreSQL server: result, uses and note stored there."""
    name = f"finalize-test-{uuid.uuid4().hex[:10]}"
    optuna.copy_study(from_study_name=STUDY, from_storage=url(searched.root), to_storage=PG_URL,
                      to_study_name=name)
    try:
        artifacts = ("--artifacts", str(searched.root / "hpsearch-artifacts"))
        reads = finalize.test_split_reads
        rc, out, err = run_finalize(tmp_path, mnist_dir, *artifacts, study=name, storage=PG_URL)
        assert rc == 0, err
        rc, out, err = run_finalize(tmp_path, mnist_dir, *artifacts, study=name, storage=PG_URL)
        assert rc == 0 and "already finalized" in out
        assert finalize.test_split_reads == reads + 1
        study = optuna.load_study(study_name=name, storage=PG_URL)
        result = study.user_attrs[finalize.RESULT_ATTR]
        assert len(study.user_attrs[finalize.USES_ATTR]) == 1
        assert result["trial"] == study.best_trial.number and result["test"]["accuracy"] >= LEARNED
        assert f"{result['test']['accuracy']:.2%}" in note_body(study)
        doc = json.loads((tmp_path / "reports" / name / "report.json").read_text())
        assert doc["result"] == result and doc["study"]["storage"].startswith("postgresql")
    finally:
        optuna.delete_study(study_name=name, storage=PG_URL)

"""`hpsearch finalize`: choose the winner on validation, evaluate it ONCE on the test split, record it.

The test split is the one figure nobody may tune against, so this module is the only place that
reads it (`read_test_split`), and every read is recorded in the study before the data is loaded:
a second `finalize` shows the stored result instead of looking again, and `--force` looks again
but leaves a trace that everyone sees (study user attributes, the dashboard note, the report).

Selection happens on the train/validation parts only: the best trial by its value, or, with
`--top-k/--seeds`, the configuration with the lowest mean validation loss over several seeds.
"""

from __future__ import annotations

import math
import os
import shlex
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import optuna
import torch
from optuna.artifacts import FileSystemArtifactStore, upload_artifact
from optuna.artifacts.exceptions import ArtifactNotFound
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState
from pydantic import ValidationError

from hpsearch import __version__, claims, export, provenance, report, train
from hpsearch.checkpoint import BEST_WEIGHTS, Checkpoint, load_checkpoint
from hpsearch.config import StudyConfig, study_name_of
from hpsearch.dashboard import append_note_section
from hpsearch.data import DeviceSplit, Normalizer, SearchData, TestData, crop_size, load_search_data, load_test_data
from hpsearch.errors import DataError, HpsearchError, StorageError
from hpsearch.model import CNN, ModelSpec, summarize
from hpsearch.objective import trial_seed
from hpsearch.storage import artifacts_dir, open_storage
from hpsearch.study import ATTR, load_study
from hpsearch.train import Diverged, HParams, Precision
from hpsearch.worker import resolve_data_dir, resolve_device

RESULT_ATTR = "hpsearch_finalize"  # study user attribute: the latest test evaluation
USES_ATTR = "hpsearch_test_uses"  # study user attribute: every read of the test split, in order

# Reads of the test split by this process. The stored list (USES_ATTR) is the record that counts;
# this counter lets a test check in-process that nothing reads the split behind the record's back.
test_split_reads = 0


@dataclass(frozen=True)
class FinalizeOptions:
    study: str
    storage_url: str
    artifacts: str | None = None
    data_dir: str | None = None
    device: str = "auto"
    top_k: int | None = None
    seeds: int | None = None
    force: bool = False
    out: str = "reports"
    command: str = ""  # the command line, recorded with each use of the test split

    def __post_init__(self) -> None:
        for name in ("top_k", "seeds"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise HpsearchError(f"--{name.replace('_', '-')} must be at least 1, but got {value}")

    @property
    def retrain(self) -> bool:
        return self.top_k is not None or self.seeds is not None


@dataclass
class Outcome:
    study: str
    result: dict
    uses: list[dict]
    evaluated: bool  # False: the stored result was shown and the test split was not read
    report_dir: Path
    report_files: list[Path] = field(default_factory=list)


# --- the study and its config -------------------------------------------------------------------


def study_config(study: optuna.Study, file_cfg: StudyConfig | None) -> StudyConfig:
    """The config the search ran with, as the study recorded it (the file may have moved on)."""
    meta = study.user_attrs.get(ATTR) or {}
    if "config" not in meta:
        if file_cfg is None:
            raise StorageError(
                f"study {study.study_name!r} has no hpsearch config recorded (was it made by "
                f"`hpsearch worker`?); pass its study file with --study path/to/file.toml"
            )
        return file_cfg
    try:
        cfg = StudyConfig.model_validate(meta["config"], context={"recorded": True})
    except ValidationError as e:
        raise StorageError(
            f"the config recorded in study {study.study_name!r} does not validate with hpsearch "
            f"{__version__} ({e.error_count()} problems); finalize it with the hpsearch version that "
            f"made it ({meta.get('version', 'unknown')})"
        ) from None
    return cfg.model_copy(update={"source": meta.get("source", "")})


def completed_trials(study: optuna.Study) -> list[FrozenTrial]:
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    return sorted(done, key=lambda t: (t.value, t.number))


def trial_hparams(trial: FrozenTrial, cfg: StudyConfig) -> HParams:
    """The full hyperparameters of a trial: its `hparams` attribute, else params + fixed knobs."""
    stored = trial.user_attrs.get("hparams")
    if stored:
        return HParams(**stored)
    values = {}
    for name in HParams.__dataclass_fields__:
        knob = getattr(cfg.search, name)
        if name in trial.params:
            values[name] = trial.params[name]
        elif not hasattr(knob, "model_fields"):  # a fixed knob is a plain value
            values[name] = knob
        elif name == "momentum":  # suggested for SGD only, as in objective.suggest_hparams
            values[name] = 0.0
        else:
            raise StorageError(
                f"trial {trial.number} has no 'hparams' attribute and no value for {name!r}; "
                f"it cannot be re-trained"
            )
    if values["optimizer"] != "sgd":
        values["momentum"] = 0.0
    return HParams(**values)


def trial_seed_of(trial: FrozenTrial, cfg: StudyConfig) -> int:
    seed = trial.user_attrs.get("seed")
    if seed is not None:
        return int(seed)
    # Older trials: the objective derives it from the sampler seed; without one, any seed will do.
    return trial_seed(cfg.sampler.seed, trial.number) if cfg.sampler.seed is not None else 0


def code_version() -> str:
    """The same code version trials record: git commit from the checkout, or from
    `HPSEARCH_GIT_COMMIT` where there is no `.git` (a container image)."""
    return provenance.code_version()


# --- training and evaluation --------------------------------------------------------------------


@dataclass
class Run:
    """One training run of a configuration on one seed."""

    trial: int
    seed: int
    val_loss: float
    val_accuracy: float
    best_epoch: int
    epochs: int
    stop_reason: str
    seconds: float

    def to_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in vars(self).items()}


@dataclass
class Winner:
    trial: FrozenTrial
    hparams: HParams
    seed: int
    spec: ModelSpec
    state_dict: dict[str, torch.Tensor]
    normalizer: Normalizer
    crop: tuple[int, int]
    val_loss: float
    val_accuracy: float
    best_epoch: int | None
    epochs: int | None
    source: str  # how the weights were obtained, in words
    retrained: bool


def model_spec(hp: HParams, search: SearchData, crop: tuple[int, int]) -> ModelSpec:
    return ModelSpec(
        in_channels=search.image_shape[0], num_classes=search.num_classes, input_hw=crop,
        conv1_channels=hp.conv1_channels, conv2_channels=hp.conv2_channels, dropout=hp.dropout,
    )


def retrain(
    trial: FrozenTrial, hp: HParams, seed: int, cfg: StudyConfig, search: SearchData,
    device: torch.device, precision: Precision, crop: tuple[int, int],
) -> tuple[Run, ModelSpec, dict[str, torch.Tensor]]:
    """Train one configuration on the train split exactly as the objective does (same seeding)."""
    t = cfg.training
    spec = model_spec(hp, search, crop)
    torch.manual_seed(seed)  # the initial weights, as in Objective.__call__
    model = CNN(spec).to(device)
    if precision.channels_last:
        model = model.to(memory_format=torch.channels_last)
    start = time.perf_counter()
    try:
        r = train.fit(
            model, hp, search.train, search.val, search.normalizer, crop,
            max_epochs=t.max_epochs, patience=t.patience, plateau_factor=t.plateau_factor,
            plateau_patience=t.plateau_patience, eval_batch_size=t.eval_batch_size,
            precision=precision, seed=seed,
        )
    except Diverged as e:
        # A diverged seed counts against its configuration (an infinite mean), it does not stop the run.
        return Run(trial.number, seed, math.inf, 0.0, 0, 0, f"diverged: {e}", time.perf_counter() - start), spec, {}
    run = Run(trial.number, seed, r.best_val_loss, r.best_val_accuracy, r.best_epoch, r.epochs,
              r.stop_reason, time.perf_counter() - start)
    return run, spec, r.best_state


def select_best_trial(
    best: FrozenTrial, cfg: StudyConfig, store: FileSystemArtifactStore | None, search: SearchData,
    device: torch.device, precision: Precision, crop: tuple[int, int], say: Callable[[str], None],
) -> Winner:
    """The best trial's own checkpoint, or the same run again when the checkpoint is gone."""
    hp = trial_hparams(best, cfg)
    seed = trial_seed_of(best, cfg)
    artifact_id = best.user_attrs.get(BEST_WEIGHTS)
    missing = "the trial records no checkpoint"
    if artifact_id and store is not None:
        try:
            ckpt = load_checkpoint(store, artifact_id)
        except (ArtifactNotFound, FileNotFoundError):
            missing = f"its checkpoint artifact {artifact_id} is missing from the artifact store"
        else:
            return Winner(
                best, ckpt.hparams, seed, ckpt.spec, ckpt.state_dict, ckpt.normalizer, ckpt.crop,
                ckpt.val_loss, ckpt.val_accuracy, ckpt.epoch, best.user_attrs.get("epochs"),
                source=f"checkpoint artifact {artifact_id} of trial {best.number}", retrained=False,
            )
    elif artifact_id:
        missing = f"its checkpoint artifact {artifact_id} is missing (no artifact store at the given path)"
    say(f"trial {best.number}: {missing}; re-training it from its parameters (seed {seed})")
    run, spec, state = retrain(best, hp, seed, cfg, search, device, precision, crop)
    if not state:
        raise HpsearchError(f"re-training trial {best.number} failed ({run.stop_reason}); pass --top-k 2 "
                            f"to choose among more trials")
    return Winner(
        best, hp, seed, spec, state, search.normalizer, crop, run.val_loss, run.val_accuracy,
        run.best_epoch, run.epochs,
        source=f"re-trained from trial {best.number}'s parameters (seed {seed}) because {missing}",
        retrained=True,
    )


def select_by_seeds(
    candidates: list[FrozenTrial], seeds: list[int], cfg: StudyConfig, search: SearchData,
    device: torch.device, precision: Precision, crop: tuple[int, int], say: Callable[[str], None],
) -> tuple[Winner, list[dict]]:
    """Re-train each candidate on every seed; the winner has the lowest mean validation loss.

    Every candidate gets the same seeds, so they are compared on equal footing. The model that is
    then tested is the winner's run with the lowest validation loss.
    """
    table: list[dict] = []
    kept: dict[int, tuple[FrozenTrial, HParams, Run, ModelSpec, dict]] = {}
    for trial in candidates:
        hp = trial_hparams(trial, cfg)
        runs: list[Run] = []
        for seed in seeds:
            run, spec, state = retrain(trial, hp, seed, cfg, search, device, precision, crop)
            say(f"trial {trial.number} seed {seed}: validation loss {run.val_loss:.4f}, accuracy "
                f"{run.val_accuracy:.2%} ({run.epochs} epochs, {run.seconds:.0f}s)")
            runs.append(run)
            # Of each configuration, keep only the weights of its best seed: the one tested if it wins.
            if state and (trial.number not in kept or run.val_loss < kept[trial.number][2].val_loss):
                kept[trial.number] = (trial, hp, run, spec, state)
        losses = [r.val_loss for r in runs]
        mean = statistics.fmean(losses) if all(math.isfinite(x) for x in losses) else math.inf
        std = statistics.stdev(losses) if len(losses) > 1 and math.isfinite(mean) else 0.0
        table.append({
            "trial": trial.number, "search_value": trial.value, "hparams": hp.to_dict(),
            "runs": [r.to_dict() for r in runs],
            "mean_val_loss": mean if math.isfinite(mean) else None, "std_val_loss": std,
            "mean_val_accuracy": statistics.fmean(r.val_accuracy for r in runs),
        })
    best = pick_by_mean(table)
    if best is None:
        raise HpsearchError("every re-trained configuration diverged on some seed; check the study's "
                            "learning-rate range, or re-train more configurations with --top-k")
    for i, row in enumerate(table):
        row["winner"] = i == best
    trial, hp, run, spec, state = kept[table[best]["trial"]]
    return Winner(
        trial, hp, run.seed, spec, state, search.normalizer, crop, run.val_loss, run.val_accuracy,
        run.best_epoch, run.epochs,
        source=(f"re-trained: trial {trial.number}'s configuration had the lowest mean validation loss "
                f"over {len(seeds)} seed(s) among the top {len(candidates)}; its seed-{run.seed} run "
                f"(lowest validation loss of its seeds) is the model tested"),
        retrained=True,
    ), table


def pick_by_mean(table: list[dict]) -> int | None:
    """The row with the lowest mean validation loss (None: no row has a finite mean).

    Rows come in the search's order, so a tie goes to the configuration the search ranked higher.
    """
    finite = [i for i, row in enumerate(table) if row["mean_val_loss"] is not None]
    return min(finite, key=lambda i: table[i]["mean_val_loss"]) if finite else None


def read_test_split(study: optuna.Study, storage: BaseStorage, cfg: StudyConfig, data_dir: Path,
                    device: torch.device, use: dict, force: bool) -> TestData:
    """The only way hpsearch reads the test split: the use is claimed first, then the data loaded.

    The claim is one atomic create in the storage (claims.py), so of two finalize runs at the same
    instant exactly one reads the split; without `force` a use claimed since this run started
    (another finalize finished its selection first) stops this one, the moment before reading.
    Claiming first means a crash during evaluation still counts as a look at the test split.
    """
    global test_split_reads
    key = claims.StudyKey.of(storage, study.study_name)
    recorded = len(study.user_attrs.get(USES_ATTR, []))  # uses recorded before the claims existed
    if claims.claim_next(storage, key, claims.TEST_SPLIT, use, again=force, after=recorded) is None:
        first = (claims.claims(storage, key, claims.TEST_SPLIT) or [None])[-1]
        when = f" at {first.claimed_at} on {first.data.get('host', '?')}" if first else ""
        raise HpsearchError(
            f"study {study.study_name!r}: another finalize claimed the test split first{when}; this run "
            f"did not read it. Its result: `hpsearch finalize --study {study.study_name}` once it has finished"
        )
    study.set_user_attr(USES_ATTR, recorded_uses(study, storage, key))
    test_split_reads += 1
    return load_test_data(cfg.data, data_dir, device)


def recorded_uses(study: optuna.Study, storage: BaseStorage, key: claims.StudyKey) -> list[dict]:
    """Every use of the test split: the claims, plus any recorded only in the study attribute
    (studies finalized before the claims existed). The study attribute is rewritten from this."""
    uses = {u.get("n"): u for u in study.user_attrs.get(USES_ATTR, [])}
    uses.update({c.number: c.data for c in claims.claims(storage, key, claims.TEST_SPLIT)})
    return [uses[n] for n in sorted(uses, key=lambda n: (n is None, n or 0))]


def test_metrics(model: CNN, test: DeviceSplit, normalizer: Normalizer, crop: tuple[int, int],
                 precision: Precision, eval_batch_size: int, classes: tuple[str, ...]) -> dict:
    ev = train.evaluate(model, test, normalizer, eval_batch_size, crop, precision, keep_predictions=True)
    y = test.labels.cpu()
    p = ev.predictions
    k = len(classes)
    cm = torch.bincount(y * k + p, minlength=k * k).view(k, k)  # rows: true class, columns: predicted
    per_class = []
    for c in range(k):
        tp, predicted, actual = int(cm[c, c]), int(cm[:, c].sum()), int(cm[c, :].sum())
        per_class.append({
            "class": classes[c],
            "precision": tp / predicted if predicted else None,  # never predicted: undefined
            "recall": tp / actual if actual else None,
            "support": actual,
        })
    return {
        "loss": ev.loss,
        "accuracy": ev.accuracy,
        "images": len(test),
        "correct": int(cm.diag().sum()),
        "classes": list(classes),
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
    }


# --- the command --------------------------------------------------------------------------------


# A use of the test split claimed less than this long ago, with no result stored yet, may be a
# finalize still evaluating (loading the data and one pass over the test split take minutes at
# most): a second finalize waits for its result rather than calling it interrupted.
EVALUATING_S = 900.0


def wait_for_result(study: optuna.Study, last_use: dict, say: Callable[[str], None],
                    poll_s: float = 2.0) -> dict | None:
    """The result of the finalize that claimed `last_use`, once it is stored; None when the claim
    is older than EVALUATING_S without one (that run was interrupted)."""
    try:
        claimed = datetime.fromisoformat(str(last_use.get("at"))).timestamp()
    except ValueError:
        return None
    deadline = claimed + EVALUATING_S
    if last_use.get("host") == socket.gethostname() and not _alive(last_use.get("pid")):
        return study.user_attrs.get(RESULT_ATTR)  # that run ended here without a result
    if time.time() < deadline:
        say(f"another finalize claimed the test split at {last_use.get('at')} and is evaluating; "
            f"waiting for its result")
    while time.time() < deadline:
        stored = study.user_attrs.get(RESULT_ATTR)
        if stored is not None:
            return stored
        time.sleep(poll_s)
    return study.user_attrs.get(RESULT_ATTR)


def _alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return True  # not recorded: assume it may be running
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def finalize(opts: FinalizeOptions, say: Callable[[str], None] = print) -> Outcome:
    # Everything that can be wrong is checked before anything is written: the study, its trials,
    # the data. Only then is the test split read.
    name, file_cfg = study_name_of(opts.study)
    storage = open_storage(opts.storage_url, must_exist=True)
    study = load_study(name, storage)
    cfg = study_config(study, file_cfg)
    out_dir = Path(opts.out) / safe_name(study.study_name)

    stored = study.user_attrs.get(RESULT_ATTR)
    uses = recorded_uses(study, storage, claims.StudyKey.of(storage, study.study_name))
    if uses and stored is None and not opts.force:
        # Another finalize may be evaluating right now: its result is then worth waiting for.
        stored = wait_for_result(study, uses[-1], say)
        uses = recorded_uses(study, storage, claims.StudyKey.of(storage, study.study_name))
    if uses and stored is None and not opts.force:
        # The split was read but the run stopped before storing a result: looking again is a second use.
        raise HpsearchError(
            f"study {study.study_name!r}: the test split was read at {uses[-1].get('at')} (use "
            f"#{len(uses)}) but no result was stored (that run was interrupted); run again with --force "
            f"to evaluate once more, recorded as use #{len(uses) + 1}"
        )
    if stored is not None and not opts.force:
        say(locked_message(study.study_name, stored, uses))
        doc = report.build_report(study, cfg, opts.storage_url, out_dir, stored, uses)
        files = report.write_report(study, doc, out_dir)
        say(f"report (from the stored result): {out_dir}/report.md, report.html, report.json")
        return Outcome(study.study_name, stored, uses, False, out_dir, files)

    done = completed_trials(study)
    if not done:
        raise HpsearchError(
            f"study {study.study_name!r} has no completed trial yet; run `hpsearch worker --study "
            f"{opts.study}` until one completes"
        )
    device = resolve_device(opts.device)
    data_dir = resolve_data_dir(opts.data_dir, cfg).resolve()
    search = load_search_data(cfg.data, data_dir, device)
    stored_split = study.user_attrs.get("split_fingerprint")
    if stored_split is not None and stored_split != search.fingerprint:
        raise DataError(
            f"the data in {data_dir} is not what study {study.study_name!r} searched on (split "
            f"fingerprint {search.fingerprint}, study {stored_split}), so its test part would not be "
            f"the held-out one; point --data-dir at the files the workers used"
        )
    precision = Precision.choose(device, cfg.training.channels_last, cfg.training.bf16)
    crop = crop_size(search.image_shape, cfg.training.crop_margin)
    adir = artifacts_dir(opts.storage_url, opts.artifacts)
    store = FileSystemArtifactStore(str(adir)) if adir.is_dir() else None

    started = datetime.now(timezone.utc)
    t0 = time.perf_counter()
    if opts.retrain:
        top_k, n_seeds = opts.top_k or 1, opts.seeds or 1
        candidates = _distinct_configs(done, cfg)[:top_k]
        if len(candidates) < top_k:
            say(f"--top-k {top_k}: the study has only {len(candidates)} completed configuration(s); "
                f"re-training those")
        seeds = list(range(n_seeds))
        say(f"re-training the top {len(candidates)} configuration(s) on {n_seeds} seed(s) each "
            f"({len(candidates) * n_seeds} runs, train split; validation picks the winner)")
        winner, table = select_by_seeds(candidates, seeds, cfg, search, device, precision, crop, say)
        selection = {
            "method": f"top-{len(candidates)} configurations re-trained on {n_seeds} seed(s); "
                      f"lowest mean validation loss wins",
            "top_k": len(candidates), "seeds": seeds, "candidates": table,
        }
    else:
        winner = select_best_trial(done[0], cfg, store, search, device, precision, crop, say)
        selection = {"method": "the completed trial with the lowest validation loss", "top_k": 1,
                     "seeds": [], "candidates": []}
    say(f"winner: trial {winner.trial.number} ({winner.source})")

    model = CNN(winner.spec)
    model.load_state_dict(winner.state_dict)
    model = model.to(device)
    if precision.channels_last:
        model = model.to(memory_format=torch.channels_last)
    val_counts = torch.bincount(search.val.labels, minlength=search.num_classes).tolist()
    # The data loader's own warnings: classes too small for every part of the split.
    data_warnings = list(search.class_counts.warnings)
    del search  # the train/validation tensors are done with; free them before the test split

    uses_before = recorded_uses(study, storage, claims.StudyKey.of(storage, study.study_name))
    use = {
        "n": len(uses_before) + 1,
        "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "trial": winner.trial.number,
        "forced": bool(opts.force),
        "host": socket.gethostname(),
        "pid": os.getpid(),  # on this host, whether that run is still evaluating (wait_for_result)
        "user": _user(),
        "code_version": code_version(),
        "command": opts.command,
    }
    if uses_before and opts.force:
        say(f"--force: the test split has been used {len(uses_before)} time(s) already; this use "
            f"(#{use['n']}) is recorded")
    test = read_test_split(study, storage, cfg, data_dir, device, use, force=opts.force)
    metrics = test_metrics(model, test.test, winner.normalizer, winner.crop, precision,
                           cfg.training.eval_batch_size, test.classes)
    metrics["fingerprint"] = test.fingerprint
    exported = export.export_winner(winner.spec, winner.state_dict, winner.normalizer, winner.crop, test,
                                    out_dir)
    finished = datetime.now(timezone.utc)

    weights_artifact = None
    if winner.retrained:
        weights_artifact = _upload_final(study, winner, precision, opts, test.classes)
    result = {
        "use": use["n"],
        "trial": winner.trial.number,
        "search_value": winner.trial.value,
        "params": dict(winner.trial.params),
        "hparams": winner.hparams.to_dict(),
        "seed": winner.seed,
        "source": winner.source,
        "retrained": winner.retrained,
        "weights_artifact": weights_artifact or winner.trial.user_attrs.get(BEST_WEIGHTS),
        "validation": {"loss": winner.val_loss, "accuracy": winner.val_accuracy,
                       "best_epoch": winner.best_epoch, "epochs": winner.epochs, "class_counts": val_counts},
        "data_warnings": data_warnings,
        "export": exported,
        "selection": selection,
        "test": metrics,
        # Classes with their original labels, images per class in each part, and warnings
        # (a class missing from a part).
        "data": test.class_counts.to_dict(),
        "model": summarize(winner.spec),
        "device": str(device),
        "precision": {"channels_last": precision.channels_last, "bf16": precision.bf16},
        "host": use["host"],
        "data_dir": str(data_dir),
        "started_at": started.isoformat(timespec="seconds"),
        "finished_at": finished.isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - t0, 2),
        "code_version": use["code_version"],
        "forced": bool(opts.force),
    }
    study.set_user_attr(RESULT_ATTR, result)
    # The figures go with this use's claim, so every use keeps its own result.
    use.update(test_accuracy=metrics["accuracy"], test_loss=metrics["loss"])
    key = claims.StudyKey.of(storage, study.study_name)
    claims.update(storage, key, claims.TEST_SPLIT, use["n"], use)
    uses = recorded_uses(study, storage, key)
    study.set_user_attr(USES_ATTR, uses)

    say(f"test: accuracy {metrics['accuracy']:.2%}, loss {metrics['loss']:.4f} on {metrics['images']:,} "
        f"images (use #{use['n']} of the test split)")
    doc = report.build_report(study, cfg, opts.storage_url, out_dir, result, uses)
    append_note_section(study, report.note_section(doc))  # below the worker's note, never over it
    files = report.write_report(study, doc, out_dir)
    say(f"report: {out_dir}/report.md, report.html, report.json; model: {out_dir}/{exported['file']}")
    return Outcome(study.study_name, result, uses, True, out_dir, files)


def _distinct_configs(done: list[FrozenTrial], cfg: StudyConfig) -> list[FrozenTrial]:
    """Completed trials by value, one per distinct configuration (a re-run adds no candidate)."""
    seen, out = set(), []
    for t in done:
        key = tuple(sorted(trial_hparams(t, cfg).to_dict().items()))
        if key not in seen:
            seen.add(key)
            out.append(t)
    return out


def _upload_final(study: optuna.Study, winner: Winner, precision: Precision, opts: FinalizeOptions,
                  classes: tuple[str, ...]) -> str:
    """Keep the re-trained model that was tested, as an artifact of the study."""
    adir = artifacts_dir(opts.storage_url, opts.artifacts)
    adir.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpoint(winner.spec, winner.hparams, winner.state_dict, winner.normalizer, winner.crop,
                      precision, winner.best_epoch or 0, winner.val_loss, winner.val_accuracy, classes)
    with tempfile.TemporaryDirectory(prefix="hpsearch-") as tmp:
        path = Path(tmp) / f"final-trial-{winner.trial.number}-seed-{winner.seed}.pt"
        torch.save(ckpt.to_payload(), path)
        return upload_artifact(artifact_store=FileSystemArtifactStore(str(adir)), file_path=str(path),
                               study_or_trial=study, mimetype="application/octet-stream")


def _user() -> str:
    try:
        return os.getlogin()
    except OSError:
        return os.environ.get("USER", "")


def safe_name(name: str) -> str:
    """A study name as one folder name."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "study"


def locked_message(name: str, result: dict, uses: list[dict]) -> str:
    t = result["test"]
    return (
        f"study {name!r} was already finalized at {result['finished_at']}: trial {result['trial']}, "
        f"test accuracy {t['accuracy']:.2%}, loss {t['loss']:.4f} on {t['images']:,} images. The test "
        f"split has been used {len(uses)} time(s) and was not read now; `--force` evaluates again "
        f"and records use #{len(uses) + 1}."
    )


def command_line(argv: list[str] | None) -> str:
    args = sys.argv[1:] if argv is None else argv
    return shlex.join(["hpsearch", *args])


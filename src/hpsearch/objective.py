"""The Optuna objective: suggest, build, train, report, prune, checkpoint, resume.

The search space is read in one place (`suggest_hparams`); everything else is the shared training
loop (`train.fit`) with a per-epoch hook that reports the validation loss to Optuna and prunes,
and a per-epoch checkpoint hook. A re-queued trial (a copy of one whose worker died or was
stopped) continues from the latest epoch checkpoint of the trial it re-runs.
"""

from __future__ import annotations

import os
import pickle
import secrets
import socket
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optuna
import torch
from optuna.artifacts import FileSystemArtifactStore
from optuna.artifacts.exceptions import ArtifactNotFound

from hpsearch.checkpoint import (
    EPOCH_CHECKPOINT,
    Checkpoint,
    EpochCheckpoints,
    ResumePoint,
    load_resume_point,
    save_best,
)
from hpsearch.config import (
    BatchChoice,
    FloatRange,
    IntRange,
    OptimizerChoice,
    SearchSpace,
    StudyConfig,
)
from hpsearch.data import SearchData, crop_size
from hpsearch.errors import StorageError
from hpsearch.memory import check_fits
from hpsearch.model import CNN, ModelSpec
from hpsearch.provenance import code_version, library_versions
from hpsearch.pruning import prefetch
from hpsearch.recovery import retry_source, trial_id
from hpsearch.storage import set_user_attrs
from hpsearch.train import Diverged, EpochResult, HParams, Interrupted, Precision, fit
from hpsearch.window import sample_ahead


CURVE_ATTR = "curve"  # trial user attribute: [epoch, train loss, train acc, val loss, val acc] rows


class TrialFailed(Exception):
    """A trial that failed for a reason of its own (out of memory, too big to fit, any error in its
    training): failed with the reason in `stop_reason`, and the worker goes on."""


def is_out_of_memory(e: BaseException) -> bool:
    """CUDA's `OutOfMemoryError`, and the CPU allocator's, which is a plain `RuntimeError`
    ("DefaultCPUAllocator: can't allocate memory: you tried to allocate ...")."""
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and (
        "can't allocate memory" in text or "DefaultCPUAllocator" in text or "out of memory" in text
    )


def failure_reason(e: BaseException, device: torch.device, batch_size: int | None) -> str:
    """One line for `stop_reason`: what went wrong, in the words of the error itself."""
    first = (str(e).strip().splitlines() or [""])[0][:300]
    if is_out_of_memory(e):
        batch = f" (batch_size={batch_size})" if batch_size is not None else ""
        return f"out of memory on {device}{batch}: {first}"
    return f"failed: {type(e).__name__}: {first}" if first else f"failed: {type(e).__name__}"


class TakenOver(Exception):
    """Another worker failed this trial while it was still training here (its heartbeat was late,
    say after a long database outage) and queued a copy. This worker drops it and goes on."""


def suggest(trial: optuna.Trial, name: str, knob: Any) -> Any:
    """A searched knob is suggested; a fixed one is returned as it is."""
    if isinstance(knob, FloatRange):
        return trial.suggest_float(name, knob.low, knob.high, log=knob.log)
    if isinstance(knob, IntRange):
        return trial.suggest_int(name, knob.low, knob.high, log=knob.log)
    if isinstance(knob, (OptimizerChoice, BatchChoice)):
        return trial.suggest_categorical(name, list(knob.choices))
    return knob


def suggest_hparams(trial: optuna.Trial, space: SearchSpace) -> HParams:
    """The whole search space, in one place."""
    optimizer = suggest(trial, "optimizer", space.optimizer)
    return HParams(
        lr=suggest(trial, "lr", space.lr),
        weight_decay=suggest(trial, "weight_decay", space.weight_decay),
        optimizer=optimizer,
        # Momentum exists only for SGD; Adam's betas stay at their defaults.
        momentum=suggest(trial, "momentum", space.momentum) if optimizer == "sgd" else 0.0,
        conv1_channels=suggest(trial, "conv1_channels", space.conv1_channels),
        conv2_channels=suggest(trial, "conv2_channels", space.conv2_channels),
        dropout=suggest(trial, "dropout", space.dropout),
        batch_size=suggest(trial, "batch_size", space.batch_size),
    )


def work_ahead(trial: optuna.Trial, epoch: int) -> None:
    """What the search does while an epoch trains: the pruner reads the trials for this epoch's
    report, and the sampler samples this worker's next trial (once a trial, window.py)."""
    prefetch(trial, epoch)
    sample_ahead(trial)


@dataclass(frozen=True)
class Progress:
    """One line of news for the worker's display."""

    trial: int
    epoch: int
    max_epochs: int
    val_loss: float
    val_accuracy: float
    samples_per_s: float
    trial_best: float


def trial_seed(base: int | None, number: int) -> int:
    if base is None:
        return secrets.randbits(31)
    return (base * 1_000_003 + number) % 2**31


class Objective:
    def __init__(
        self,
        cfg: StudyConfig,
        data: SearchData,
        device: torch.device,
        store: FileSystemArtifactStore,
        on_progress: Callable[[Progress], None] = lambda p: None,
        *,
        should_stop: Callable[[], bool] = lambda: False,
        note: Callable[[str], None] = lambda m: None,
        worker_index: int = 0,
    ) -> None:
        self.cfg = cfg
        self.data = data
        self.device = device
        self.store = store
        self.on_progress = on_progress
        self.should_stop = should_stop
        self.note = note
        self.worker_index = worker_index
        self.crop = crop_size(data.image_shape, cfg.training.crop_margin)
        self.precision = Precision.choose(device, cfg.training.channels_last, cfg.training.bf16)
        self.taken_over: int | None = None  # number of the last trial lost to another worker
        self.interrupted: int | None = None  # number of the last trial stopped by a signal
        self.current: int | None = None  # number of the trial this objective ran last
        self._batch_size: int | None = None

    def _resume_point(self, trial: optuna.Trial, hp: HParams) -> ResumePoint | None:
        """The checkpoint a re-queued trial continues from, if its predecessor left one."""
        # Optuna has no public accessor for a live trial's system attrs: ask the storage, by the
        # trial's id from its public lookups.
        source = retry_source(trial.storage.get_trial_system_attrs(trial_id(trial.storage, trial.study, trial.number)))
        pointer = trial.user_attrs.get(EPOCH_CHECKPOINT) if source is not None else None
        if not pointer:
            return None
        try:
            point = load_resume_point(self.store, pointer["artifact_id"])
        except (ArtifactNotFound, OSError, ValueError, RuntimeError, KeyError, TypeError,
                pickle.UnpicklingError) as e:  # gone, truncated, another format: start over
            why = f"checkpoint {pointer['artifact_id']} of trial {pointer.get('trial')} unusable ({e})"
            self.note(f"trial {trial.number}: {why}; starting from epoch 1")
            trial.set_user_attr("resume_skipped", why)
            return None
        if point.hparams != hp:
            why = f"checkpoint of trial {pointer.get('trial')} has other hyperparameters"
            self.note(f"trial {trial.number}: {why}; starting from epoch 1")
            trial.set_user_attr("resume_skipped", why)
            return None
        return point

    def __call__(self, trial: optuna.Trial) -> float:
        self.current, self._batch_size = trial.number, None
        try:
            return self._run(trial)
        except Interrupted:
            self.interrupted = trial.number
            raise
        except optuna.exceptions.UpdateFinishedTrialError:
            self.taken_over = trial.number
            raise TakenOver(f"trial {trial.number} was failed by another worker while running here") from None
        except (optuna.TrialPruned, TrialFailed, StorageError):
            raise  # a storage gone for longer than reconnect_timeout stops the worker, not the trial
        except Exception as e:
            # Anything else is this trial's own problem: it fails alone, with the reason stored
            # where the dashboard and `status` show it, and the worker takes the next trial.
            # Only text is kept: the traceback's frames hold the trial's tensors.
            reason = failure_reason(e, self.device, self._batch_size)
            details = "".join(traceback.format_exception(e, limit=-8))[-4000:]
            oom = is_out_of_memory(e)
        if oom and self.device.type == "cuda":
            torch.cuda.empty_cache()
        set_user_attrs(trial, {"stop_reason": reason, "error": details})
        raise TrialFailed(reason)

    def _run(self, trial: optuna.Trial) -> float:
        cfg, data, t = self.cfg, self.data, self.cfg.training
        hp = suggest_hparams(trial, cfg.search)
        self._batch_size = hp.batch_size
        resume = self._resume_point(trial, hp)
        if resume is not None:
            seed = resume.seed
        elif "seed" in trial.user_attrs:  # a re-queued trial with no checkpoint: the same run again
            seed = int(trial.user_attrs["seed"])
        else:
            seed = trial_seed(cfg.sampler.seed, trial.number)
        attrs: dict[str, Any] = {
            "hparams": hp.to_dict(),
            "seed": seed,
            "device": str(self.device),
            "host": socket.gethostname(),
            "worker": f"{socket.gethostname()}:{os.getpid()}",
            "worker_index": self.worker_index,
            "threads": torch.get_num_threads(),
            "split_fingerprint": data.fingerprint,
            "code_version": code_version(),
            "versions": library_versions(),
            EPOCH_CHECKPOINT: None if resume is None else trial.user_attrs.get(EPOCH_CHECKPOINT),
        }
        if resume is not None:
            attrs["resumed_from_trial"] = trial.user_attrs[EPOCH_CHECKPOINT]["trial"]
            attrs["resumed_from_epoch"] = resume.state.epoch
            self.note(f"trial {trial.number}: resuming trial {attrs['resumed_from_trial']} "
                      f"after epoch {resume.state.epoch}")
        set_user_attrs(trial, attrs)

        spec = ModelSpec(
            in_channels=data.image_shape[0],
            num_classes=data.num_classes,
            input_hw=self.crop,
            conv1_channels=hp.conv1_channels,
            conv2_channels=hp.conv2_channels,
            dropout=hp.dropout,
        )
        # Before the first allocation: a network that cannot fit fails here, with the estimate,
        # instead of taking the worker down with it (memory.py).
        too_big = check_fits(spec, hp.batch_size, t.eval_batch_size, hp.optimizer, hp.momentum, self.device)
        if too_big is not None:
            trial.set_user_attr("stop_reason", too_big)
            raise TrialFailed(too_big)
        torch.manual_seed(seed)  # the initial weights (replaced by the checkpoint's on resume)
        model = CNN(spec).to(self.device)
        if self.precision.channels_last:
            model = model.to(memory_format=torch.channels_last)
        checkpoints = EpochCheckpoints(self.store, trial, hp, seed, previous=resume)
        first_epoch = resume.state.epoch + 1 if resume else 1

        def finished(epochs: int, trained: int, samples_per_s: float, stop_reason: str, **more: Any) -> None:
            set_user_attrs(trial, {
                "epochs": epochs,
                "epochs_trained": trained,  # here, not counting a resumed part
                "samples_per_s": round(samples_per_s, 1),
                "stop_reason": stop_reason,
                **more,
            })

        # Training and validation loss/accuracy per epoch, for the report's learning curves (Optuna
        # keeps only the reported validation loss). A resumed trial continues its predecessor's.
        curve: list[list[float]] = [row for row in trial.user_attrs.get(CURVE_ATTR) or []
                                    if resume and row[0] <= resume.state.epoch]

        def report(r: EpochResult) -> None:
            trial.report(r.val.loss, r.epoch)
            curve.append([r.epoch, r.train.loss, r.train.accuracy, r.val.loss, r.val.accuracy])
            trial.set_user_attr(CURVE_ATTR, curve)
            self.on_progress(
                Progress(trial.number, r.epoch, t.max_epochs, r.val.loss, r.val.accuracy,
                         r.train.samples_per_s, r.best_val_loss)
            )
            if trial.should_prune():
                finished(r.epoch, r.epoch - first_epoch + 1, r.train.samples_per_s, f"pruned after epoch {r.epoch}",
                         val_accuracy=r.best_val_accuracy, best_epoch=r.best_epoch)
                raise optuna.TrialPruned(f"pruned after epoch {r.epoch}")

        try:
            result = fit(
                model, hp, data.train, data.val, data.normalizer, self.crop,
                max_epochs=t.max_epochs, patience=t.patience,
                plateau_factor=t.plateau_factor, plateau_patience=t.plateau_patience,
                eval_batch_size=t.eval_batch_size, precision=self.precision, seed=seed,
                on_epoch=report, on_epoch_start=lambda epoch: work_ahead(trial, epoch),
                start=resume.state if resume else None,
                on_checkpoint=checkpoints.save, should_stop=self.should_stop,
                num_classes=data.num_classes,
            )
        except Interrupted as e:
            # The checkpoint stays: the worker re-queues the trial and the copy resumes from it.
            after = f"after epoch {checkpoints.epoch}" if checkpoints.epoch else "before its first epoch ended"
            trial.set_user_attr("stop_reason", f"stopped by a signal {after} ({e})")
            raise
        except optuna.TrialPruned:
            checkpoints.discard()
            raise
        except Diverged as e:
            # A diverging learning rate is a real (bad) result for the sampler to learn from, so the
            # trial is pruned, not failed: TPE ranks pruned trials below every completed one.
            checkpoints.discard()
            trial.set_user_attr("stop_reason", f"diverged: {e}")
            raise optuna.TrialPruned(f"diverged: {e}") from None
        except (optuna.exceptions.UpdateFinishedTrialError, StorageError):
            raise  # the trial lives on elsewhere (taken over, or re-queued later): keep its checkpoint
        except Exception:
            # Failed for good (out of memory, or any error; `__call__` records why): nothing will
            # resume from the epoch checkpoint. The weights go before the reason is written.
            del model
            checkpoints.discard()
            raise

        finished(result.epochs, result.epochs_trained, result.samples_per_s, result.stop_reason,
                 val_accuracy=result.best_val_accuracy, best_epoch=result.best_epoch)
        save_best(
            Checkpoint(spec, hp, result.best_state, data.normalizer, self.crop, self.precision,
                       result.best_epoch, result.best_val_loss, result.best_val_accuracy, data.classes),
            trial, self.store,
        )
        checkpoints.discard()
        return result.best_val_loss

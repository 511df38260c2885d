"""Checkpoints as Optuna artifacts: a trial's best weights, and its latest epoch to resume from.

One file per checkpoint (`torch.save` of plain data, loadable with `weights_only=True`).
- Best weights: the model spec, the hyperparameters, the normaliser, the crop, the precision and
  the validation figures. The artifact id is kept in the trial's user attribute
  `best_weights_artifact`.
- Epoch checkpoints (`EpochCheckpoints`): the full `TrainState` after each epoch, so a trial whose
  worker died or was stopped continues from its last epoch in a re-queued copy. Only the latest
  one per trial is kept, and it is removed when the trial ends.
"""

from __future__ import annotations

import functools
import io
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import optuna
import torch
from optuna.artifacts import FileSystemArtifactStore, download_artifact, upload_artifact
from optuna.artifacts.exceptions import ArtifactNotFound

from hpsearch.data import Normalizer
from hpsearch.model import CNN, ModelSpec
from hpsearch.recovery import trial_id
from hpsearch.train import HParams, Precision, TrainState
from hpsearch.writebehind import then

if TYPE_CHECKING:
    # Optuna's artifact-store protocol lives in a private module; any store with its methods works.
    ArtifactStore = FileSystemArtifactStore

FORMAT = 1
BEST_WEIGHTS = "best_weights_artifact"


@dataclass(frozen=True)
class Checkpoint:
    spec: ModelSpec
    hparams: HParams
    state_dict: dict[str, torch.Tensor]
    normalizer: Normalizer
    crop: tuple[int, int]
    precision: Precision
    epoch: int
    val_loss: float
    val_accuracy: float
    # Class k's name: the original label value (IDX), folder or torchvision name. Older
    # checkpoints lack it (their labels were 0..9 as stored).
    classes: tuple[str, ...] = ()

    def to_payload(self) -> dict:
        return {
            "format": FORMAT,
            "spec": self.spec.to_dict(),
            "hparams": self.hparams.to_dict(),
            "state_dict": self.state_dict,
            "normalizer": {"mean": list(self.normalizer.mean), "std": list(self.normalizer.std)},
            "crop": list(self.crop),
            "precision": {"channels_last": self.precision.channels_last, "bf16": self.precision.bf16},
            "epoch": self.epoch,
            "val_loss": self.val_loss,
            "val_accuracy": self.val_accuracy,
            "classes": list(self.classes),
        }

    @staticmethod
    def from_payload(p: dict) -> "Checkpoint":
        if p.get("format") != FORMAT:
            raise ValueError(f"unknown checkpoint format, but got {p.get('format')=}")
        return Checkpoint(
            spec=ModelSpec.from_dict(p["spec"]),
            hparams=HParams(**p["hparams"]),
            state_dict=p["state_dict"],
            normalizer=Normalizer(tuple(p["normalizer"]["mean"]), tuple(p["normalizer"]["std"])),
            crop=tuple(p["crop"]),
            precision=Precision(**p["precision"]),
            epoch=p["epoch"],
            val_loss=p["val_loss"],
            val_accuracy=p["val_accuracy"],
            classes=tuple(p.get("classes", ())),
        )

    def build_model(self, device: torch.device) -> CNN:
        model = CNN(self.spec)
        model.load_state_dict(self.state_dict)
        model = model.to(device)
        if self.precision.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model.eval()


def save_best(
    ckpt: Checkpoint, trial: optuna.trial.Trial, store: FileSystemArtifactStore
) -> str:
    """Upload the checkpoint as an artifact of `trial` and record its id on the trial."""
    with tempfile.TemporaryDirectory(prefix="hpsearch-") as tmp:
        path = Path(tmp) / f"trial-{trial.number}-best.pt"
        torch.save(ckpt.to_payload(), path)
        artifact_id = upload_artifact(
            artifact_store=store, file_path=str(path), study_or_trial=trial,
            mimetype="application/octet-stream",
        )
    trial.set_user_attr(BEST_WEIGHTS, artifact_id)
    return artifact_id


def load_checkpoint(store: FileSystemArtifactStore, artifact_id: str) -> Checkpoint:
    with tempfile.TemporaryDirectory(prefix="hpsearch-") as tmp:
        path = Path(tmp) / "ckpt.pt"
        download_artifact(artifact_store=store, file_path=str(path), artifact_id=artifact_id)
        return Checkpoint.from_payload(torch.load(path, map_location="cpu", weights_only=True))


# --- epoch checkpoints: where a re-queued trial resumes -----------------------------------------

RESUME_FORMAT = 1
# Trial user attribute: {"artifact_id", "epoch", "trial"} of the trial's latest epoch checkpoint,
# or None once the trial has ended and the checkpoint was removed. A re-queued trial inherits its
# failed predecessor's user attributes, so the pointer travels with the retry chain.
EPOCH_CHECKPOINT = "epoch_checkpoint"


@dataclass(frozen=True)
class ResumePoint:
    """A run stopped after `state.epoch`, with the hyperparameters and seed it ran with."""

    hparams: HParams
    seed: int
    state: TrainState
    artifact_id: str


def _write(store: ArtifactStore, artifact_id: str, payload: dict) -> None:
    buf = io.BytesIO()
    torch.save(payload, buf)
    buf.seek(0)
    store.write(artifact_id, buf)


def load_resume_point(store: ArtifactStore, artifact_id: str) -> ResumePoint:
    """Raises `ArtifactNotFound` when the file is gone, `ValueError` when it is not a checkpoint."""
    with store.open_reader(artifact_id) as f:
        p = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
    if not isinstance(p, dict) or p.get("format") != RESUME_FORMAT or p.get("kind") != "resume":
        raise ValueError(f"not an epoch checkpoint of format {RESUME_FORMAT}: {artifact_id}")
    return ResumePoint(HParams(**p["hparams"]), int(p["seed"]), TrainState.from_dict(p["state"]), artifact_id)


def remove_artifact(store: ArtifactStore, artifact_id: str) -> None:
    """Remove a file from the store; one already gone is fine (another worker cleaned it)."""
    try:
        store.remove(artifact_id)
    except ArtifactNotFound:
        pass


class EpochCheckpoints:
    """The latest epoch checkpoint of one trial; each new one replaces the one before on disk.

    They are written through the artifact store (a shared folder, S3 or GCS alike) but not
    registered with `upload_artifact`: Optuna cannot unregister an artifact, so every replaced
    epoch would stay listed in the dashboard as a dead link. The trial's `epoch_checkpoint` user
    attribute points at the live one. Order matters for crash safety: the new file is complete
    before the pointer moves, and the old file is removed only after.
    """

    def __init__(
        self, store: ArtifactStore, trial: optuna.trial.Trial, hparams: HParams, seed: int,
        previous: ResumePoint | None = None,
    ) -> None:
        self.store = store
        self.trial = trial
        self.hparams = hparams
        self.seed = seed
        # The checkpoint this trial resumed from (a predecessor's): replaced by our first one.
        self.current = previous.artifact_id if previous else None
        self.epoch = previous.state.epoch if previous else 0  # the epoch `current` was saved after
        self._id: int | None = None  # the trial's storage id, looked up once

    def save(self, state: TrainState) -> None:
        artifact_id = f"resume-trial{self.trial.number}-epoch{state.epoch}-{uuid.uuid4().hex[:12]}.pt"
        _write(self.store, artifact_id, {
            "format": RESUME_FORMAT, "kind": "resume", "hparams": self.hparams.to_dict(),
            "seed": self.seed, "state": state.to_dict(),
        })
        self.trial.set_user_attr(
            EPOCH_CHECKPOINT, {"artifact_id": artifact_id, "epoch": state.epoch, "trial": self.trial.number}
        )
        old, self.current, self.epoch = self.current, artifact_id, state.epoch
        if old is not None:  # once the pointer has landed (writebehind.py): never a pointer to nothing
            then(self.trial.storage, functools.partial(remove_artifact, self.store, old), self._storage_id())

    def _storage_id(self) -> int:
        if self._id is None:
            self._id = trial_id(self.trial.storage, self.trial.study, self.trial.number)
        return self._id

    def discard(self) -> None:
        """The trial ended (complete, pruned, failed for good): nothing will resume from it."""
        if self.current is not None:
            remove_artifact(self.store, self.current)
            self.current = None
            self.trial.set_user_attr(EPOCH_CHECKPOINT, None)

"""Checkpoints as Optuna artifacts: a trial's best weights, with what is needed to rebuild them.

One file per checkpoint (`torch.save` of plain data, loadable with `weights_only=True`): the model
spec, the hyperparameters, the normaliser, the crop, the precision and the validation figures.
The artifact id is kept in the trial's user attribute `best_weights_artifact`.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import optuna
import torch
from optuna.artifacts import FileSystemArtifactStore, download_artifact, upload_artifact

from hpsearch.data import Normalizer
from hpsearch.model import CNN, ModelSpec
from hpsearch.train import HParams, Precision

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

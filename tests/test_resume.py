"""A run stopped after an epoch and resumed from its checkpoint trains exactly like one that never
stopped: same validation losses, same best weights (real MNIST, a tiny CNN, on the CPU)."""

from __future__ import annotations

import pytest
import torch
from optuna.artifacts import FileSystemArtifactStore
from optuna.artifacts.exceptions import ArtifactNotFound

from hpsearch.checkpoint import load_resume_point, remove_artifact
from hpsearch.checkpoint import _write as write_payload
from hpsearch.config import DataConfig
from hpsearch.data import DeviceSplit, crop_size, load_search_data
from hpsearch.model import CNN, ModelSpec
from hpsearch.train import HParams, Interrupted, Precision, TrainState, fit

pytestmark = pytest.mark.fast  # the quick unit tier: uv run pytest -m fast

HP = HParams(lr=3e-3, weight_decay=1e-5, optimizer="adamw", momentum=0.0,
             conv1_channels=4, conv2_channels=8, dropout=0.2, batch_size=256)


@pytest.fixture(scope="module")
def setup(mnist_dir):
    data = load_search_data(DataConfig(dataset="idx"), mnist_dir, torch.device("cpu"))
    crop = crop_size(data.image_shape, 4)
    spec = ModelSpec(1, data.num_classes, crop, HP.conv1_channels, HP.conv2_channels, HP.dropout)
    # A slice of the real images keeps nine epochs in a few seconds; the property is size-free.
    small = dict(train=DeviceSplit(data.train.images[:1500], data.train.labels[:1500]),
                 val=DeviceSplit(data.val.images[:500], data.val.labels[:500]))
    return small, data.normalizer, crop, spec


def _run(setup, *, max_epochs=3, start=None, on_checkpoint=None, should_stop=lambda: False):
    data, normalizer, crop, spec = setup
    torch.manual_seed(11)
    model = CNN(spec)
    return fit(model, HP, data["train"], data["val"], normalizer, crop, max_epochs=max_epochs,
               patience=5, plateau_factor=0.5, plateau_patience=0, eval_batch_size=2048,
               precision=Precision(channels_last=False, bf16=False), seed=11,
               start=start, on_checkpoint=on_checkpoint, should_stop=should_stop)


def test_resume_continues_exactly(setup, tmp_path):
    straight = _run(setup)
    assert straight.epochs == straight.epochs_trained == 3

    saved: list[TrainState] = []
    stop_after = {"batches": None}

    def stop() -> bool:
        # Stop a few batches into epoch 3, as a signal would.
        if len(saved) == 2:
            stop_after["batches"] = (stop_after["batches"] or 0) + 1
            return stop_after["batches"] > 3
        return False

    with pytest.raises(Interrupted, match="during an epoch"):
        _run(setup, on_checkpoint=saved.append, should_stop=stop)
    assert [s.epoch for s in saved] == [1, 2]

    # Through the artifact store and back, as a re-queued trial on another worker would read it.
    store = FileSystemArtifactStore(tmp_path)
    write_payload(store, "ckpt.pt", {"format": 1, "kind": "resume", "hparams": HP.to_dict(), "seed": 11,
                                     "state": saved[-1].to_dict()})
    point = load_resume_point(store, "ckpt.pt")
    assert point.hparams == HP and point.seed == 11 and point.state.epoch == 2

    resumed = _run(setup, start=point.state)
    assert resumed.epochs_trained == 1 and resumed.epochs == 3
    assert resumed.history == straight.history  # bit for bit: same RNG, optimiser and LR state
    assert resumed.best_epoch == straight.best_epoch
    for k, v in straight.best_state.items():
        assert torch.equal(v, resumed.best_state[k]), k

    remove_artifact(store, "ckpt.pt")
    remove_artifact(store, "ckpt.pt")  # already gone: fine
    with pytest.raises(ArtifactNotFound):
        load_resume_point(store, "ckpt.pt")


def test_no_checkpoint_after_the_last_epoch(setup):
    saved: list[TrainState] = []
    _run(setup, max_epochs=2, on_checkpoint=saved.append)
    assert [s.epoch for s in saved] == [1]

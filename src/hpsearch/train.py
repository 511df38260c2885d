"""One training epoch and one evaluation, shared by the objective and `finalize`.

Read top to bottom: batches are sliced from device-resident uint8 tensors, cropped and normalised
on the device, and the loss is summed on the device so the host waits once per epoch, not once per
batch.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hpsearch.data import DeviceSplit, Normalizer, center_crop, random_crop


@dataclass(frozen=True)
class Precision:
    """How the hot loop runs: memory format and bf16 autocast."""

    channels_last: bool
    bf16: bool

    @staticmethod
    def choose(device: torch.device, channels_last: bool, bf16: str) -> "Precision":
        if bf16 == "auto":
            # bf16 autocast pays off on GPUs. On the CPU it measured slower than fp32 with
            # channels_last for this small CNN (BENCHMARKS.md), so "auto" keeps fp32 there.
            use = device.type == "cuda"
        else:
            use = bf16 == "on"
        return Precision(channels_last=channels_last, bf16=use)

    def autocast(self, device: torch.device):
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


@dataclass(frozen=True)
class EpochStats:
    loss: float  # mean training loss
    samples: int
    seconds: float

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class EvalStats:
    loss: float
    accuracy: float
    predictions: torch.Tensor | None = None  # on the CPU, when asked for


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: DeviceSplit,
    normalizer: Normalizer,
    batch_size: int,
    crop: tuple[int, int],
    generator: torch.Generator,
    precision: Precision,
) -> EpochStats:
    model.train()
    device = data.labels.device
    start = time.perf_counter()
    n = len(data)
    order = torch.randperm(n, device=device, generator=generator)
    loss_sum = torch.zeros((), device=device)
    for i in range(0, n, batch_size):
        idx = order[i : i + batch_size]
        x = random_crop(data.images[idx], crop, generator)
        x = precision.prepare(normalizer(x))
        y = data.labels[idx]
        with precision.autocast(device):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach() * len(idx)
    mean_loss = loss_sum.item() / n  # the epoch's one host sync
    return EpochStats(loss=mean_loss, samples=n, seconds=time.perf_counter() - start)


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    data: DeviceSplit,
    normalizer: Normalizer,
    batch_size: int,
    crop: tuple[int, int],
    precision: Precision,
    keep_predictions: bool = False,
) -> EvalStats:
    model.eval()
    device = data.labels.device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    preds = []
    for i in range(0, len(data), batch_size):
        x = precision.prepare(normalizer(center_crop(data.images[i : i + batch_size], crop)))
        y = data.labels[i : i + batch_size]
        with precision.autocast(device):
            logits = model(x)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        pred = logits.argmax(dim=1)
        correct += (pred == y).sum()
        if keep_predictions:
            preds.append(pred)
    n = len(data)
    return EvalStats(
        loss=loss_sum.item() / n,
        accuracy=correct.item() / n,
        predictions=torch.cat(preds).cpu() if keep_predictions else None,
    )


# --- a whole training run -----------------------------------------------------------------------


@dataclass(frozen=True)
class HParams:
    """Every value a run uses, searched or fixed. Stored with each trial so it can be re-run."""

    lr: float
    weight_decay: float
    optimizer: str
    momentum: float
    conv1_channels: int
    conv2_channels: int
    dropout: float
    batch_size: int

    def to_dict(self) -> dict:
        return asdict(self)


def build_optimizer(hp: HParams, params) -> torch.optim.Optimizer:
    if hp.optimizer == "adam":
        return torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay)
    if hp.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
    if hp.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay, nesterov=True
        )
    raise ValueError(f"unknown optimizer, but got {hp.optimizer=}")


class Diverged(Exception):
    """The loss became NaN or infinite."""


@dataclass
class EpochResult:
    epoch: int
    train: EpochStats
    val: EvalStats
    lr: float
    best_val_loss: float
    best_val_accuracy: float
    best_epoch: int


@dataclass
class FitResult:
    best_val_loss: float
    best_val_accuracy: float
    best_epoch: int
    epochs: int
    samples_per_s: float  # mean training throughput over the run
    stop_reason: str
    best_state: dict[str, torch.Tensor]  # weights of the best epoch, on the CPU
    history: list[tuple[int, float, float]]  # (epoch, val loss, val accuracy)


def fit(
    model: nn.Module,
    hp: HParams,
    train: DeviceSplit,
    val: DeviceSplit,
    normalizer: Normalizer,
    crop: tuple[int, int],
    *,
    max_epochs: int,
    patience: int,
    plateau_factor: float,
    plateau_patience: int,
    eval_batch_size: int,
    precision: Precision,
    seed: int,
    on_epoch: Callable[[EpochResult], None] = lambda r: None,
) -> FitResult:
    """Train with ReduceLROnPlateau and early stopping on the validation loss.

    `on_epoch` runs after every epoch; the objective reports to Optuna there and may raise
    `optuna.TrialPruned`. Raises `Diverged` on a non-finite loss.
    """
    device = train.labels.device
    torch.manual_seed(seed)
    generator = torch.Generator(device=device).manual_seed(seed)
    optimizer = build_optimizer(hp, model.parameters())
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=plateau_factor, patience=plateau_patience
    )
    best_loss, best_acc, best_epoch, since_best = math.inf, 0.0, 0, 0
    best_state: dict[str, torch.Tensor] = {}
    history: list[tuple[int, float, float]] = []
    samples, seconds = 0, 0.0
    stop_reason = f"reached max_epochs={max_epochs}"
    for epoch in range(1, max_epochs + 1):
        stats = train_epoch(model, optimizer, train, normalizer, hp.batch_size, crop, generator, precision)
        if not math.isfinite(stats.loss):
            raise Diverged(f"training loss is {stats.loss} at epoch {epoch} (lr={hp.lr:.3g})")
        samples, seconds = samples + stats.samples, seconds + stats.seconds
        ev = evaluate(model, val, normalizer, eval_batch_size, crop, precision)
        if not math.isfinite(ev.loss):
            raise Diverged(f"validation loss is {ev.loss} at epoch {epoch} (lr={hp.lr:.3g})")
        scheduler.step(ev.loss)
        history.append((epoch, ev.loss, ev.accuracy))
        if ev.loss < best_loss:
            best_loss, best_acc, best_epoch, since_best = ev.loss, ev.accuracy, epoch, 0
            # A copy on the CPU: the weights of the best epoch are what we keep, not the last.
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        else:
            since_best += 1
        on_epoch(
            EpochResult(epoch, stats, ev, optimizer.param_groups[0]["lr"], best_loss, best_acc, best_epoch)
        )
        if since_best >= patience:
            stop_reason = f"early stopping: no better validation loss for {patience} epochs"
            break
    return FitResult(
        best_val_loss=best_loss,
        best_val_accuracy=best_acc,
        best_epoch=best_epoch,
        epochs=len(history),
        samples_per_s=samples / seconds if seconds > 0 else 0.0,
        stop_reason=stop_reason,
        best_state=best_state,
        history=history,
    )

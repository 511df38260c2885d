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
from dataclasses import asdict, dataclass, fields

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
            # bf16 autocast pays off on GPUs, and on CPUs with native bf16 dot products (AVX-512
            # BF16 or AMX): ~2x the fp32 throughput of this CNN there (BENCHMARKS.md). Elsewhere
            # bf16 is emulated and slower than fp32, so "auto" keeps fp32.
            use = device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())
        else:
            use = bf16 == "on"
        return Precision(channels_last=channels_last, bf16=use)

    def autocast(self, device: torch.device):
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX-512 BF16 or AMX tiles)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


@dataclass(frozen=True)
class EpochStats:
    loss: float  # mean training loss
    samples: int
    seconds: float
    accuracy: float = 0.0  # on the training batches as trained (random crops, dropout on)

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
    should_stop: Callable[[], bool] = lambda: False,
) -> EpochStats:
    """One pass over `data` in a random order. `should_stop` is asked before every batch, so a
    worker told to stop leaves within one batch (not one epoch), raising `Interrupted`."""
    model.train()
    device = data.labels.device
    start = time.perf_counter()
    n = len(data)
    order = torch.randperm(n, device=device, generator=generator)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    for i in range(0, n, batch_size):
        if should_stop():
            raise Interrupted(f"stopped on request during an epoch, after {i} of {n} samples")
        idx = order[i : i + batch_size]
        x = random_crop(data.images[idx], crop, generator)
        x = precision.prepare(normalizer(x))
        y = data.labels[idx]
        with precision.autocast(device):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)  # the loss in fp32 whatever the precision
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach() * len(idx)
        correct += (logits.detach().argmax(dim=1) == y).sum()
    mean_loss, accuracy = (torch.stack([loss_sum, correct.to(loss_sum.dtype)]) / n).tolist()  # one host sync
    return EpochStats(loss=mean_loss, samples=n, seconds=time.perf_counter() - start, accuracy=accuracy)


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
    params = list(params)
    # The fused step updates every tensor in one kernel instead of ~10 elementwise ops each: for a
    # small CNN the optimizer step is a visible share of the epoch (BENCHMARKS.md).
    fused = all(p.device.type in ("cpu", "cuda") for p in params)
    if hp.optimizer == "adam":
        return torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay, fused=fused)
    if hp.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay, fused=fused)
    if hp.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay, nesterov=True,
            fused=fused,
        )
    raise ValueError(f"unknown optimizer, but got {hp.optimizer=}")


class Diverged(Exception):
    """The loss became NaN or infinite, or far worse than knowing nothing (`divergence`)."""


# "Far": ten times. A uniform guess over K classes has cross-entropy ln K (2.30 for 10 classes);
# a validation loss ten times that is a model confidently wrong on most images, which no
# learning run passes through. A run that learned and then blew up is caught by its own first
# epoch: ten times that loss, once it is above ln K (worse than a uniform guess).
DIVERGENCE_FACTOR = 10.0


def divergence(loss: float, epoch: int, first_loss: float | None, num_classes: int) -> str | None:
    """Why a validation loss means the run diverged, or None when it does not."""
    chance = math.log(num_classes) if num_classes > 1 else 1.0
    if not math.isfinite(loss):
        return f"validation loss is {loss} at epoch {epoch}"
    if loss > DIVERGENCE_FACTOR * chance:
        return (f"validation loss {loss:.4g} at epoch {epoch} is more than {DIVERGENCE_FACTOR:g}x that "
                f"of a uniform guess over {num_classes} classes (ln {num_classes} = {chance:.3g})")
    if first_loss is not None and epoch > 1 and loss > chance and loss > DIVERGENCE_FACTOR * first_loss:
        return (f"validation loss {loss:.4g} at epoch {epoch} is more than {DIVERGENCE_FACTOR:g}x the "
                f"first epoch's ({first_loss:.4g}) and worse than a uniform guess")
    return None


class Interrupted(Exception):
    """Training stopped on request (a signal) before the run ended. The last epoch's `TrainState`
    (given to `on_checkpoint`) is where a later run picks up."""


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
class TrainState:
    """Everything needed to continue a run after `epoch` as if it had never stopped: the weights,
    the optimiser's moments, the LR scheduler, every random generator the loop draws from, and the
    early-stopping bookkeeping. Plain tensors and numbers only, so `torch.load(weights_only=True)`
    reads it back."""

    epoch: int
    model: dict[str, torch.Tensor]
    optimizer: dict
    scheduler: dict
    rng: dict[str, torch.Tensor | None]  # cpu, generator (shuffles and crops), cuda (dropout on GPU)
    best_val_loss: float
    best_val_accuracy: float
    best_epoch: int
    since_best: int
    best_state: dict[str, torch.Tensor]
    history: list[tuple[int, float, float]]
    samples: int
    seconds: float

    def to_dict(self) -> dict:
        # Not `asdict`: it deep-copies every tensor, and these are copies already.
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @staticmethod
    def from_dict(d: dict) -> "TrainState":
        return TrainState(**{**d, "history": [tuple(h) for h in d["history"]]})


@dataclass
class FitResult:
    best_val_loss: float
    best_val_accuracy: float
    best_epoch: int
    epochs: int  # in the whole run, counting epochs trained before a resume
    epochs_trained: int  # by this call only
    samples_per_s: float  # mean training throughput over the run
    stop_reason: str
    best_state: dict[str, torch.Tensor]  # weights of the best epoch, on the CPU
    history: list[tuple[int, float, float]]  # (epoch, val loss, val accuracy)


def _cpu(tree):
    """A copy of a state dict (nested dicts/lists of tensors) with every tensor on the CPU."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().to("cpu", copy=True)
    if isinstance(tree, dict):
        return {k: _cpu(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_cpu(v) for v in tree)
    return tree


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
    on_epoch_start: Callable[[int], None] = lambda epoch: None,
    start: TrainState | None = None,
    on_checkpoint: Callable[[TrainState], None] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    num_classes: int | None = None,
) -> FitResult:
    """Train with ReduceLROnPlateau and early stopping on the validation loss.

    `on_epoch` runs after every epoch; the objective reports to Optuna there and may raise
    `optuna.TrialPruned`. `on_epoch_start(epoch)` runs as each epoch starts (the pruner starts
    its read of the study there, to have it by the report). Raises `Diverged` on a non-finite
    loss, or a validation loss far above a uniform guess's or the first epoch's (`divergence`;
    `num_classes` defaults to the largest validation label + 1).

    `on_checkpoint` gets a `TrainState` after every epoch that is not the last one (after
    `on_epoch`, so a pruned epoch is not saved); `start` continues from such a state instead of
    from `seed`. `should_stop` is asked before every batch; when it says yes, `Interrupted` is
    raised and the last state given to `on_checkpoint` is where to resume.
    """
    device = train.labels.device
    generator = torch.Generator(device=device)
    optimizer = build_optimizer(hp, model.parameters())
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=plateau_factor, patience=plateau_patience
    )
    if start is None:
        torch.manual_seed(seed)
        generator.manual_seed(seed)
        best_loss, best_acc, best_epoch, since_best = math.inf, 0.0, 0, 0
        best_state: dict[str, torch.Tensor] = {}
        history: list[tuple[int, float, float]] = []
        samples, seconds = 0, 0.0
        first = 1
    else:
        model.load_state_dict(start.model)
        optimizer.load_state_dict(start.optimizer)
        scheduler.load_state_dict(start.scheduler)
        torch.set_rng_state(start.rng["cpu"])
        generator.set_state(start.rng["generator"])
        if device.type == "cuda" and start.rng.get("cuda") is not None:
            torch.cuda.set_rng_state(start.rng["cuda"], device)
        best_loss, best_acc = start.best_val_loss, start.best_val_accuracy
        best_epoch, since_best = start.best_epoch, start.since_best
        best_state, history = dict(start.best_state), list(start.history)
        samples, seconds = start.samples, start.seconds
        first = start.epoch + 1
    stop_reason = f"reached max_epochs={max_epochs}"
    trained = 0
    if num_classes is None:
        num_classes = int(val.labels.max()) + 1 if len(val) else 2
    for epoch in range(first, max_epochs + 1):
        if should_stop():
            raise Interrupted(f"stopped on request before epoch {epoch}")
        on_epoch_start(epoch)
        stats = train_epoch(model, optimizer, train, normalizer, hp.batch_size, crop, generator, precision,
                            should_stop)
        if not math.isfinite(stats.loss):
            raise Diverged(f"training loss is {stats.loss} at epoch {epoch} (lr={hp.lr:.3g})")
        samples, seconds, trained = samples + stats.samples, seconds + stats.seconds, trained + 1
        ev = evaluate(model, val, normalizer, eval_batch_size, crop, precision)
        why = divergence(ev.loss, epoch, history[0][1] if history else None, num_classes)
        if why is not None:
            raise Diverged(f"{why} (lr={hp.lr:.3g})")
        scheduler.step(ev.loss)
        history.append((epoch, ev.loss, ev.accuracy))
        if ev.loss < best_loss:
            best_loss, best_acc, best_epoch, since_best = ev.loss, ev.accuracy, epoch, 0
            # A copy on the CPU: the weights of the best epoch are what we keep, not the last.
            best_state = _cpu(model.state_dict())
        else:
            since_best += 1
        on_epoch(
            EpochResult(epoch, stats, ev, optimizer.param_groups[0]["lr"], best_loss, best_acc, best_epoch)
        )
        if since_best >= patience:
            stop_reason = f"early stopping: no better validation loss for {patience} epochs"
            break
        if on_checkpoint is not None and epoch < max_epochs:
            on_checkpoint(
                TrainState(
                    epoch=epoch,
                    model=_cpu(model.state_dict()),
                    optimizer=_cpu(optimizer.state_dict()),
                    scheduler=_cpu(scheduler.state_dict()),
                    rng={
                        "cpu": torch.get_rng_state(),
                        "generator": generator.get_state().cpu(),
                        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                    },
                    best_val_loss=best_loss, best_val_accuracy=best_acc, best_epoch=best_epoch,
                    since_best=since_best, best_state=best_state, history=list(history),
                    samples=samples, seconds=seconds,
                )
            )
    return FitResult(
        best_val_loss=best_loss,
        best_val_accuracy=best_acc,
        best_epoch=best_epoch,
        epochs=len(history),
        epochs_trained=trained,
        samples_per_s=samples / seconds if seconds > 0 else 0.0,
        stop_reason=stop_reason,
        best_state=best_state,
        history=history,
    )

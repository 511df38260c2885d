"""The seed-style baseline the benchmarks compare against: what the tutorials in the design
documents (../shared/seeds) do, written the way they write it.

- A Dataset of PIL images with per-sample torchvision transforms (RandomCrop for training,
  CenterCrop for evaluation, then ToTensor + Normalize), served by a shuffling DataLoader.
- The seed CNN in the tutorial's order (conv -> ReLU -> pool), in NCHW and fp32.
- Plain `torch.optim` optimizers (no fused step) and a `.item()` per batch for the running loss.

It shares nothing with hpsearch's hot path except the split (so both see the same images) and the
hyperparameters, so the ratios measure what hpsearch adds.
"""

from __future__ import annotations

import time

import torch
import torchvision.transforms as T
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from hpsearch.data import DeviceSplit, Normalizer
from hpsearch.model import ModelSpec
from hpsearch.train import HParams


class SeedStyleDataset(Dataset):
    """Per-sample PIL transforms, as in the seed tutorials."""

    def __init__(self, split: DeviceSplit, transform) -> None:
        self.images = split.images.cpu()
        self.labels = split.labels.cpu()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        img = self.images[i]
        pil = Image.fromarray(img[0].numpy()) if img.shape[0] == 1 else Image.fromarray(img.permute(1, 2, 0).numpy())
        return self.transform(pil), int(self.labels[i])


def loaders(train: DeviceSplit, val: DeviceSplit, normalizer: Normalizer, crop: tuple[int, int],
            batch_size: int) -> tuple[DataLoader, DataLoader]:
    """Training (random crops, shuffled) and validation (centre crops) loaders, tutorial style."""
    mean = [m / 255 for m in normalizer.mean]
    std = [s / 255 for s in normalizer.std]
    train_tf = T.Compose([T.RandomCrop(crop), T.ToTensor(), T.Normalize(mean, std)])
    val_tf = T.Compose([T.CenterCrop(crop), T.ToTensor(), T.Normalize(mean, std)])
    return (DataLoader(SeedStyleDataset(train, train_tf), batch_size=batch_size, shuffle=True, num_workers=0),
            DataLoader(SeedStyleDataset(val, val_tf), batch_size=batch_size, shuffle=False, num_workers=0))


def tutorial_cnn(spec: ModelSpec) -> nn.Module:
    """The seed CNN as the tutorial writes it (conv -> ReLU -> pool): the same function and the
    same parameters as `hpsearch.model.CNN`, which pools before the ReLU."""
    h, w = spec.feature_hw()
    return nn.Sequential(
        nn.Conv2d(spec.in_channels, spec.conv1_channels, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(spec.conv1_channels, spec.conv2_channels, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Dropout(spec.dropout), nn.Linear(spec.conv2_channels * h * w, spec.num_classes),
    )


def tutorial_optimizer(hp: HParams, params) -> torch.optim.Optimizer:
    """The same optimizer choices as hpsearch, as plain (unfused) `torch.optim` classes."""
    if hp.optimizer == "adam":
        return torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay)
    if hp.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
    if hp.optimizer == "sgd":
        return torch.optim.SGD(params, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay, nesterov=True)
    raise ValueError(f"unknown optimizer, but got {hp.optimizer=}")


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader,
                device: torch.device) -> tuple[int, float, float]:
    """One epoch; returns (samples, seconds, mean loss)."""
    model.train()
    loss_fn = nn.CrossEntropyLoss()
    start, n, running = time.perf_counter(), 0, 0.0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        running += loss.item() * len(y)  # the tutorial's per-batch host sync
        n += len(y)
    return n, time.perf_counter() - start, running / max(n, 1)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device) -> tuple[float, float]:
    """(mean loss, accuracy) over the loader."""
    model.eval()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    n, loss, correct = 0, 0.0, 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        out = model(x)
        loss += loss_fn(out, y).item()
        correct += (out.argmax(1) == y).sum().item()
        n += len(y)
    return loss / n, correct / n

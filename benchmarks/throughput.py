"""Training throughput: hpsearch's epoch vs the seed-style DataLoader loop, same model and batch.

The seed-style loop is what the tutorials in the design documents do: a Dataset of PIL images,
per-sample torchvision RandomCrop + ToTensor + Normalize, a shuffling DataLoader, and a `.item()`
per batch for the running loss. hpsearch keeps uint8 tensors on the device and crops/normalises
whole batches there. Both train the seed CNN (32/64 channels) with Adam on the same train split.

The hpsearch rows are a ladder, each adding one change to the row above: the device-resident loop,
channels_last, the CNN's pool-before-ReLU order, bf16 autocast. The last row is what
`hpsearch worker` runs on a CUDA device or a CPU with native bf16 (AVX-512 BF16 / AMX); elsewhere
it is marked "(forced)" and the row above is hpsearch's default.

    uv run python benchmarks/throughput.py --data-dir ../shared/data/mnist-t10k
    uv run python benchmarks/throughput.py --data-dir ../shared/data/mnist-t10k --quick   # CI smoke

Prints a table and writes JSON (--json). Compare the ratio, measured in one run, not absolutes.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn
import torchvision.transforms as T
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from hpsearch.config import DataConfig
from hpsearch.data import crop_size, load_search_data
from hpsearch.model import CNN, ModelSpec, flops_per_sample
from hpsearch.train import HParams, Precision, build_optimizer, train_epoch


class SeedStyleDataset(Dataset):
    """Per-sample PIL transforms, as in the seed tutorials."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, crop: tuple[int, int], mean, std):
        self.images = images.cpu()
        self.labels = labels.cpu()
        self.transform = T.Compose([T.RandomCrop(crop), T.ToTensor(), T.Normalize(mean, std)])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        img = self.images[i]
        pil = Image.fromarray(img[0].numpy()) if img.shape[0] == 1 else Image.fromarray(img.permute(1, 2, 0).numpy())
        return self.transform(pil), int(self.labels[i])


def tutorial_cnn(spec: ModelSpec) -> nn.Module:
    """The seed CNN as the tutorial writes it (conv -> ReLU -> pool): the same function and the
    same parameters as `hpsearch.model.CNN`, which pools before the ReLU."""
    h, w = spec.feature_hw()
    return nn.Sequential(
        nn.Conv2d(spec.in_channels, spec.conv1_channels, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(spec.conv1_channels, spec.conv2_channels, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Dropout(spec.dropout), nn.Linear(spec.conv2_channels * h * w, spec.num_classes),
    )


def seed_style_epoch(model, optimizer, loader, device) -> tuple[int, float]:
    model.train()
    loss_fn = torch.nn.CrossEntropyLoss()
    start, n, running = time.perf_counter(), 0, 0.0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        running += loss.item()  # the tutorial's per-batch host sync
        n += len(y)
    return n, time.perf_counter() - start


def matmul_gflops(device: torch.device, dtype: torch.dtype, size: int = 2048, repeats: int = 10) -> float:
    """Best-of-N GFLOP/s of one large matmul: this machine's practical compute roof for `dtype`."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * size**3 / best / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True, help="folder of IDX files (e.g. the MNIST test set)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=3, help="timed epochs per repeat")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="one short repeat: checks the script runs")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()
    if args.quick:
        args.epochs, args.repeats = 1, 1

    device = torch.device(args.device)
    data = load_search_data(DataConfig(dataset="idx"), args.data_dir, device)
    crop = crop_size(data.image_shape, 4)
    spec = ModelSpec(data.image_shape[0], data.num_classes, crop, 32, 64, 0.0)
    hp = HParams(lr=1e-3, weight_decay=0.0, optimizer="adam", momentum=0.0, conv1_channels=32,
                 conv2_channels=64, dropout=0.0, batch_size=args.batch_size)
    mean = [m / 255 for m in data.normalizer.mean]
    std = [s / 255 for s in data.normalizer.std]
    loader = DataLoader(SeedStyleDataset(data.train.images, data.train.labels, crop, mean, std),
                        batch_size=args.batch_size, shuffle=True, num_workers=0)

    default = Precision.choose(device, channels_last=True, bf16="auto")
    # An ablation ladder: each hpsearch row adds one change to the row above it, so the table says
    # what each change is worth. The last row is what `hpsearch worker` runs on this device.
    contenders: dict[str, tuple[Callable[[], nn.Module], Precision | None]] = {
        "seed-style DataLoader": (lambda: tutorial_cnn(spec), None),
        "hpsearch loop, NCHW": (lambda: tutorial_cnn(spec), Precision(channels_last=False, bf16=False)),
        "+ channels_last": (lambda: tutorial_cnn(spec), Precision(channels_last=True, bf16=False)),
        "+ pool before ReLU": (lambda: CNN(spec), Precision(channels_last=True, bf16=False)),
        f"+ bf16 autocast{'' if default.bf16 else ' (forced)'}": (lambda: CNN(spec), Precision(channels_last=True, bf16=True)),
    }
    results: dict[str, list[float]] = {name: [] for name in contenders}
    for r in range(args.repeats):
        # Interleave the contenders in every repeat so machine noise hits them alike.
        for name, (build, precision) in contenders.items():
            torch.manual_seed(r)
            model = build().to(device)
            if precision is not None and precision.channels_last:
                model = model.to(memory_format=torch.channels_last)
            # The tutorial's plain torch.optim.Adam for the seed loop; hpsearch's own optimizer
            # (fused) for hpsearch.
            opt = (torch.optim.Adam(model.parameters(), lr=hp.lr) if precision is None
                   else build_optimizer(hp, model.parameters()))
            g = torch.Generator(device=device).manual_seed(r)
            rates = []
            for e in range(args.epochs + 1):  # the first epoch warms up allocators and kernels
                if precision is None:
                    n, s = seed_style_epoch(model, opt, loader, device)
                else:
                    st = train_epoch(model, opt, data.train, data.normalizer, args.batch_size, crop, g, precision)
                    n, s = st.samples, st.seconds
                if e > 0:
                    rates.append(n / s)
            results[name].append(statistics.median(rates))

    # The roof for each row is the matmul rate in the precision its convolutions run in.
    roofs = {dtype: matmul_gflops(device, dtype) for dtype in (torch.float32, torch.bfloat16)}
    train_flops = 3 * flops_per_sample(spec)  # forward + backward (~2x forward)
    base = statistics.median(results["seed-style DataLoader"])
    rows = []
    print(f"{'loop':<30}{'samples/s':>12}{'vs seed':>9}{'GFLOP/s':>9}{'of roof':>9}")
    for name, rates in results.items():
        med = statistics.median(rates)
        precision = contenders[name][1]
        roof = roofs[torch.bfloat16 if precision is not None and precision.bf16 else torch.float32]
        achieved = med * train_flops / 1e9
        rows.append(dict(loop=name, samples_per_s=med, repeats=rates, ratio=med / base,
                         gflops=achieved, roof_gflops=roof, roofline_fraction=achieved / roof))
        print(f"{name:<30}{med:>12,.0f}{med / base:>8.2f}x{achieved:>9.1f}{achieved / roof:>9.1%}")
    print(f"matmul (2048^2) on {device}: fp32 {roofs[torch.float32]:.1f}, bf16 {roofs[torch.bfloat16]:.1f} "
          f"GFLOP/s; CNN training: {train_flops / 1e6:.1f} MFLOP/sample; threads: {torch.get_num_threads()}")
    if args.json:
        args.json.write_text(json.dumps(dict(
            date=datetime.now(timezone.utc).isoformat(timespec="seconds"), machine=platform.processor() or platform.machine(),
            device=str(device), threads=torch.get_num_threads(), native_bf16=default.bf16, batch_size=args.batch_size,
            epochs=args.epochs, repeats=args.repeats,
            matmul_gflops={str(k).removeprefix('torch.'): v for k, v in roofs.items()},
            train_flops_per_sample=train_flops, results=rows), indent=2))


if __name__ == "__main__":
    main()

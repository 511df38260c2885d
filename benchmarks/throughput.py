"""Training throughput: hpsearch's epoch vs the seed-style DataLoader loop, same model and batch.

The seed-style loop is what the tutorials in the design documents do: a Dataset of PIL images,
per-sample torchvision RandomCrop + ToTensor + Normalize, a shuffling DataLoader, and a `.item()`
per batch for the running loss. hpsearch keeps uint8 tensors on the device and crops/normalises
whole batches there. Both train the seed CNN (32/64 channels) with Adam on the same train split.

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
from datetime import datetime, timezone
from pathlib import Path

import torch
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


def matmul_gflops(device: torch.device, size: int = 2048, repeats: int = 5) -> float:
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
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
    ap.add_argument("--repeats", type=int, default=3)
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

    results: dict[str, list[float]] = {"seed-style DataLoader": [], "hpsearch fp32": [], "hpsearch channels_last": []}
    for r in range(args.repeats):
        # Interleave the contenders in every repeat so machine noise hits them alike.
        for name in results:
            torch.manual_seed(r)
            model = CNN(spec).to(device)
            precision = Precision(channels_last=name.endswith("channels_last"), bf16=False)
            if precision.channels_last:
                model = model.to(memory_format=torch.channels_last)
            # The tutorial's plain torch.optim.Adam for the seed loop; hpsearch's own optimizer
            # (fused) for hpsearch.
            opt = (torch.optim.Adam(model.parameters(), lr=hp.lr) if name.startswith("seed")
                   else build_optimizer(hp, model.parameters()))
            g = torch.Generator(device=device).manual_seed(r)
            rates = []
            for e in range(args.epochs + 1):  # the first epoch warms up allocators and kernels
                if name.startswith("seed"):
                    n, s = seed_style_epoch(model, opt, loader, device)
                else:
                    st = train_epoch(model, opt, data.train, data.normalizer, args.batch_size, crop, g, precision)
                    n, s = st.samples, st.seconds
                if e > 0:
                    rates.append(n / s)
            results[name].append(statistics.median(rates))

    gflops = matmul_gflops(device)
    train_flops = 3 * flops_per_sample(spec)  # forward + backward (~2x forward)
    base = statistics.median(results["seed-style DataLoader"])
    rows = []
    print(f"{'loop':<26}{'samples/s':>12}{'vs seed':>9}{'GFLOP/s':>9}{'of matmul':>11}")
    for name, rates in results.items():
        med = statistics.median(rates)
        achieved = med * train_flops / 1e9
        rows.append(dict(loop=name, samples_per_s=med, repeats=rates, ratio=med / base,
                         gflops=achieved, roofline_fraction=achieved / gflops))
        print(f"{name:<26}{med:>12,.0f}{med / base:>8.2f}x{achieved:>9.1f}{achieved / gflops:>10.1%}")
    print(f"fp32 matmul (2048^2) on {device}: {gflops:.1f} GFLOP/s; CNN training: "
          f"{train_flops / 1e6:.1f} MFLOP/sample; threads: {torch.get_num_threads()}")
    if args.json:
        args.json.write_text(json.dumps(dict(
            date=datetime.now(timezone.utc).isoformat(timespec="seconds"), machine=platform.processor() or platform.machine(),
            device=str(device), threads=torch.get_num_threads(), batch_size=args.batch_size,
            epochs=args.epochs, repeats=args.repeats, matmul_gflops=gflops,
            train_flops_per_sample=train_flops, results=rows), indent=2))


if __name__ == "__main__":
    main()

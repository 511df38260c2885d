"""Training throughput: hpsearch's epoch vs the seed-style DataLoader loop, same model and batch.

The seed-style loop is what the tutorials in the design documents do: a Dataset of PIL images,
per-sample torchvision RandomCrop + ToTensor + Normalize, a shuffling DataLoader, and a `.item()`
per batch for the running loss. hpsearch keeps uint8 tensors on the device and crops/normalises
whole batches there. Both train the seed CNN (32/64 channels) with Adam on the same train split.

The hpsearch rows are a ladder, each adding one change to the row above: the device-resident loop,
channels_last, the CNN's pool-before-ReLU order, bf16 autocast. The last row is what
`hpsearch worker` runs on a CUDA device or a CPU with native bf16 (AVX-512 BF16 / AMX). On a CPU
without them bf16 is only emulated (a 512^2 bf16 matmul ~13x slower than fp32): that row and the
bf16 matmul roof are reported as "emulated", not timed, and the row above is hpsearch's default.
`--emulated-bf16` treats this CPU as such a CPU (the test of that path uses it).

    uv run python benchmarks/throughput.py --data-dir ../shared/data/mnist-t10k
    uv run python benchmarks/throughput.py --data-dir ../shared/data/mnist-t10k --quick   # CI smoke

--quick is bounded by work, not time: one timed epoch per row after one warm-up epoch, and a small
matmul for the roofs.

Prints a table and writes JSON (--json). Compare the ratio, measured in one run, not absolutes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

from hpsearch.config import DataConfig
from hpsearch.data import crop_size, load_search_data
from hpsearch.model import CNN, ModelSpec, flops_per_sample
from hpsearch.train import HParams, Precision, build_optimizer, train_epoch

import seedstyle  # benchmarks/seedstyle.py: the tutorial-style baseline
from machine import machine


EMULATED = "emulated"


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
    ap.add_argument("--emulated-bf16", action="store_true",
                    help="treat this CPU as one without native bf16: report bf16 rows as emulated, untimed")
    args = ap.parse_args()
    matmul_size, matmul_repeats = 2048, 10
    if args.quick:
        args.epochs, args.repeats = 1, 1
        matmul_size, matmul_repeats = 512, 3

    device = torch.device(args.device)
    data = load_search_data(DataConfig(dataset="idx"), args.data_dir, device)
    crop = crop_size(data.image_shape, 4)
    spec = ModelSpec(data.image_shape[0], data.num_classes, crop, 32, 64, 0.0)
    hp = HParams(lr=1e-3, weight_decay=0.0, optimizer="adam", momentum=0.0, conv1_channels=32,
                 conv2_channels=64, dropout=0.0, batch_size=args.batch_size)
    loader, _ = seedstyle.loaders(data.train, data.val, data.normalizer, crop, args.batch_size)

    default = Precision.choose(device, channels_last=True, bf16="auto")
    # bf16 without hardware support is emulated: minutes of timing that say nothing about hpsearch,
    # which keeps fp32 there (Precision.choose). Such rows are reported, not timed.
    native_bf16 = device.type == "cuda" or (default.bf16 and not args.emulated_bf16)
    if args.emulated_bf16:
        default = Precision(channels_last=True, bf16=False)
    # An ablation ladder: each hpsearch row adds one change to the row above it, so the table says
    # what each change is worth. The last row is what `hpsearch worker` runs on this device.
    contenders: dict[str, tuple[Callable[[], nn.Module], Precision | None]] = {
        "seed-style DataLoader": (lambda: seedstyle.tutorial_cnn(spec), None),
        "hpsearch loop, NCHW": (lambda: seedstyle.tutorial_cnn(spec), Precision(channels_last=False, bf16=False)),
        "+ channels_last": (lambda: seedstyle.tutorial_cnn(spec), Precision(channels_last=True, bf16=False)),
        "+ pool before ReLU": (lambda: CNN(spec), Precision(channels_last=True, bf16=False)),
        f"+ bf16 autocast{'' if default.bf16 else ' (forced)'}": (lambda: CNN(spec), Precision(channels_last=True, bf16=True)),
    }
    emulated = {name for name, (_, p) in contenders.items() if p is not None and p.bf16 and not native_bf16}
    results: dict[str, list[float]] = {name: [] for name in contenders if name not in emulated}
    for r in range(args.repeats):
        # Interleave the contenders in every repeat so machine noise hits them alike.
        for name, (build, precision) in contenders.items():
            if name in emulated:
                continue
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
                    n, s, _ = seedstyle.train_epoch(model, opt, loader, device)
                else:
                    st = train_epoch(model, opt, data.train, data.normalizer, args.batch_size, crop, g, precision)
                    n, s = st.samples, st.seconds
                if e > 0:
                    rates.append(n / s)
            results[name].append(statistics.median(rates))

    # The roof for each row is the matmul rate in the precision its convolutions run in.
    roofs = {dtype: matmul_gflops(device, dtype, matmul_size, matmul_repeats)
             for dtype in (torch.float32, torch.bfloat16) if native_bf16 or dtype != torch.bfloat16}
    train_flops = 3 * flops_per_sample(spec)  # forward + backward (~2x forward)
    base = statistics.median(results["seed-style DataLoader"])
    rows = []
    print(f"{'loop':<30}{'samples/s':>12}{'vs seed':>9}{'GFLOP/s':>9}{'of roof':>9}")
    for name in contenders:
        if name in emulated:
            rows.append(dict(loop=name, status=EMULATED, samples_per_s=None, repeats=[], ratio=None,
                             gflops=None, roof_gflops=None, roofline_fraction=None))
            print(f"{name:<30}{'emulated: no native bf16 on this CPU, not timed':>48}")
            continue
        rates = results[name]
        med = statistics.median(rates)
        precision = contenders[name][1]
        roof = roofs[torch.bfloat16 if precision is not None and precision.bf16 else torch.float32]
        achieved = med * train_flops / 1e9
        rows.append(dict(loop=name, status="timed", samples_per_s=med, repeats=rates, ratio=med / base,
                         gflops=achieved, roof_gflops=roof, roofline_fraction=achieved / roof))
        print(f"{name:<30}{med:>12,.0f}{med / base:>8.2f}x{achieved:>9.1f}{achieved / roof:>9.1%}")
    bf16_roof = f"{roofs[torch.bfloat16]:.1f}" if torch.bfloat16 in roofs else EMULATED
    print(f"matmul ({matmul_size}^2) on {device}: fp32 {roofs[torch.float32]:.1f}, bf16 {bf16_roof} "
          f"GFLOP/s; CNN training: {train_flops / 1e6:.1f} MFLOP/sample; threads: {torch.get_num_threads()}")
    if args.json:
        args.json.write_text(json.dumps(dict(
            date=datetime.now(timezone.utc).isoformat(timespec="seconds"), machine=machine(),
            device=str(device), threads=torch.get_num_threads(), native_bf16=native_bf16, batch_size=args.batch_size,
            epochs=args.epochs, repeats=args.repeats, quick=args.quick, matmul_size=matmul_size,
            matmul_gflops={str(k).removeprefix('torch.'): roofs.get(k, EMULATED)
                           for k in (torch.float32, torch.bfloat16)},
            train_flops_per_sample=train_flops, results=rows), indent=2))


if __name__ == "__main__":
    main()

"""MNIST-rot, built offline from the shipped MNIST images: the harder dataset of the peers benchmark.

The recipe of Larochelle et al. (2007), "An empirical evaluation of deep architectures on problems
with many factors of variation" (the mnist-rotation set): every digit rotated by an angle drawn
uniformly from [0, 2*pi). Here the angles come from a seeded generator, so the same input gives the
same images. The labels are unchanged (a rotated 6 stays a 6, as in the original).

    uv run python benchmarks/mnist_rot.py ../shared/data/mnist-t10k /tmp/mnist-rot

writes `rot-images-idx3-ubyte.gz` and `rot-labels-idx1-ubyte.gz` (the IDX format the study files
read) to the output folder.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from hpsearch.data import find_idx_pairs, read_idx, write_idx


def rotate(images: np.ndarray, seed: int) -> np.ndarray:
    """(N, H, W) uint8 images, each rotated about its centre by its own uniform angle, bilinear,
    black outside (the background of MNIST)."""
    angles = torch.rand(len(images), generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2 * math.pi
    cos, sin = torch.cos(angles), torch.sin(angles)
    zero = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1).float()
    x = torch.from_numpy(images).float().unsqueeze(1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.squeeze(1).round().clamp(0, 255).to(torch.uint8).numpy()


def build(source: Path, out: Path, seed: int = 0) -> None:
    pairs = find_idx_pairs(source)
    images = np.concatenate([read_idx(img) for img, _ in pairs])
    labels = np.concatenate([read_idx(lab) for _, lab in pairs])
    out.mkdir(parents=True, exist_ok=True)
    write_idx(out / "rot-images-idx3-ubyte.gz", rotate(images, seed))
    write_idx(out / "rot-labels-idx1-ubyte.gz", labels)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", type=Path, help="folder of MNIST IDX files (e.g. the shipped test set)")
    ap.add_argument("out", type=Path, help="folder to write MNIST-rot to")
    ap.add_argument("--seed", type=int, default=0, help="seed of the angles")
    args = ap.parse_args()
    build(args.source, args.out, args.seed)


if __name__ == "__main__":
    main()

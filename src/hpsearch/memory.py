"""How much memory a trial needs, estimated before anything is allocated, and how much there is.

A trial whose channel counts or batch size cannot fit is failed with the estimate in its reason
instead of being tried: on the CPU, trying can take the whole worker down (the kernel's
out-of-memory killer, or a machine swapping at a few samples per second with the trial left
RUNNING), which no `except` can catch.

The estimate is an upper bound built from the network's shapes (model.py): fp32 weights, their
gradients, the optimizer's state, and the activations autograd keeps for one training batch,
counted twice (the backward pass allocates gradients of about the same size), then a margin for
the allocator and convolution workspaces. `tests/test_memory.py` checks it against the measured
peak of real training steps (the estimate is 1.4-1.7x what they use on the CPU). The kernel
libraries' one-time set-up (~170 MB on the CPU) is paid once per worker, not per trial, and is
left out.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from hpsearch.model import KERNEL, POOL, ModelSpec

FLOAT = 4  # bytes: weights, activations and optimizer state are fp32 (bf16 autocast only saves)
MARGIN = 1.25  # allocator rounding, convolution workspaces, the odd temporary
GIB = 2**30


@dataclass(frozen=True)
class Estimate:
    parameters: int  # count
    weights: int  # bytes: weights + gradients + optimizer state (+ the CPU copies, on the CPU)
    activations: int  # bytes: one training batch, forward and backward
    batch_size: int
    input_hw: tuple[int, int]
    eval_batch_size: int

    @property
    def total(self) -> int:
        return math.ceil((self.weights + self.activations) * MARGIN)

    def describe(self) -> str:
        return (
            f"about {self.total / GIB:.1f} GiB ({self.parameters:,} parameters with gradients and "
            f"optimizer state: {self.weights / GIB:.1f} GiB; activations at {self.input_hw[0]}x"
            f"{self.input_hw[1]} for batch_size {self.batch_size} and eval_batch_size "
            f"{self.eval_batch_size}: {self.activations / GIB:.1f} GiB)"
        )


def parameter_count(spec: ModelSpec) -> int:
    fh, fw = spec.feature_hw()
    k2 = KERNEL * KERNEL
    conv1 = spec.conv1_channels * (spec.in_channels * k2 + 1)
    conv2 = spec.conv2_channels * (spec.conv1_channels * k2 + 1)
    linear = spec.num_classes * (spec.conv2_channels * max(fh, 0) * max(fw, 0) + 1)
    return conv1 + conv2 + linear


def activation_floats(spec: ModelSpec) -> int:
    """Floats autograd keeps for one sample: each layer's output, max-pool indices (int64: two
    floats' worth) and the dropout mask."""
    h, w = spec.input_hw
    h1, w1 = h - KERNEL + 1, w - KERNEL + 1
    p1h, p1w = h1 // POOL, w1 // POOL
    h2, w2 = p1h - KERNEL + 1, p1w - KERNEL + 1
    fh, fw = spec.feature_hw()
    features = spec.conv2_channels * max(fh, 0) * max(fw, 0)
    return (
        spec.in_channels * h * w  # the normalised, cropped input
        + spec.conv1_channels * max(h1 * w1, 0)  # conv1 output
        + 3 * spec.conv1_channels * max(p1h * p1w, 0)  # pool output (ReLU in place) + int64 indices
        + spec.conv2_channels * max(h2 * w2, 0)
        + 3 * features
        + 2 * features  # dropout output and mask
        + 2 * spec.num_classes
    )


def optimizer_state_floats(optimizer: str, momentum: float, parameters: int) -> int:
    if optimizer in ("adam", "adamw"):
        return 2 * parameters  # first and second moments
    return parameters if momentum > 0 else 0


def estimate(spec: ModelSpec, batch_size: int, eval_batch_size: int, optimizer: str, momentum: float,
             device: torch.device) -> Estimate:
    p = parameter_count(spec)
    opt = optimizer_state_floats(optimizer, momentum, p)
    floats = 2 * p + opt  # weights, gradients, optimizer state
    if device.type == "cpu":
        # The best epoch's weights and the epoch checkpoint (weights + optimizer) are CPU copies.
        floats += p + p + opt
    # Training keeps every layer's output for the backward pass; evaluation (no autograd) holds at
    # most about as much for its own, often larger, batches.
    activations = max(2 * batch_size, eval_batch_size) * activation_floats(spec)
    return Estimate(p, floats * FLOAT, activations * FLOAT, batch_size, spec.input_hw, eval_batch_size)


def available_bytes(device: torch.device) -> int | None:
    """Memory a new trial can still take on `device`; None where it cannot be told."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        # Blocks PyTorch's caching allocator holds but no tensor uses are free for this trial too.
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type == "cpu":
        return _cpu_available()
    return None


def _cpu_available() -> int | None:
    found: list[int] = []
    try:  # Linux: what the kernel could give without swapping
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError):
        pass
    # In a container the cgroup's limit binds first (cgroup v2).
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            found.append(int(limit) - used)
    except (OSError, ValueError):
        pass
    if not found:
        try:  # other Unixes
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            return None
    return max(min(found), 0)


def check_fits(spec: ModelSpec, batch_size: int, eval_batch_size: int, optimizer: str, momentum: float,
               device: torch.device) -> str | None:
    """None when the trial fits; else the reason it does not, for the trial's `stop_reason`."""
    need = estimate(spec, batch_size, eval_batch_size, optimizer, momentum, device)
    have = available_bytes(device)
    if have is None or need.total <= have:
        return None
    return (
        f"does not fit in memory: needs {need.describe()}, {have / GIB:.1f} GiB available on {device}; "
        f"narrow conv1_channels, conv2_channels or batch_size in the study's [search] (or lower "
        f"[training] eval_batch_size)"
    )

"""The seed CNN, with the trial choosing channel counts and dropout.

conv(5x5) -> ReLU -> max-pool(2) -> conv(5x5) -> ReLU -> max-pool(2) -> dropout -> linear.

The network fits the data: the seed's unpadded convolutions need an input (the crop) of at least
16x16. A smaller input gets "same" padding (2 pixels) on both convolutions, so only the two
poolings shrink it and inputs down to 4x4 work: 8x8 images still train with a random crop. The
padding is a function of the input size alone (`conv_padding`), so a checkpoint's spec rebuilds
the same network. `data.crop_size` refuses anything smaller, when the data is loaded.
The layers run as conv -> max-pool -> ReLU: the same function (ReLU is monotonic, so it commutes
with max) and the same gradients, but the ReLU and its backward touch a quarter of the values.
That alone made a training epoch ~1.7x faster on the CPU (BENCHMARKS.md).
It returns logits: `nn.CrossEntropyLoss` applies log-softmax itself (the seed's Softmax layer
before it would be wrong).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

KERNEL = 5
POOL = 2
SEED_MIN_INPUT = 16  # the smallest side two unpadded 5x5 convolutions and two poolings take
MIN_INPUT = POOL * POOL  # the smallest side with padded convolutions: two poolings leave 1x1


def conv_padding(input_hw: tuple[int, int]) -> int:
    """0 (the seed's network) where it fits, else "same" padding for inputs below 16x16."""
    return 0 if min(input_hw) >= SEED_MIN_INPUT else KERNEL // 2


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild the network, stored with every checkpoint."""

    in_channels: int
    num_classes: int
    input_hw: tuple[int, int]  # after cropping
    conv1_channels: int
    conv2_channels: int
    dropout: float

    @property
    def padding(self) -> int:
        return conv_padding(self.input_hw)

    def conv_hw(self) -> list[tuple[int, int]]:
        """Output size of each convolution (before its pooling)."""
        out, (h, w) = [], self.input_hw
        grow = 2 * self.padding - KERNEL + 1
        for _ in range(2):
            h, w = h + grow, w + grow
            out.append((h, w))
            h, w = h // POOL, w // POOL
        return out

    def feature_hw(self) -> tuple[int, int]:
        h, w = self.conv_hw()[-1]
        return h // POOL, w // POOL

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "ModelSpec":
        return ModelSpec(**{**d, "input_hw": tuple(d["input_hw"])})


class CNN(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        h, w = spec.feature_hw()
        if h < 1 or w < 1:
            raise ValueError(
                f"input of {spec.input_hw[0]}x{spec.input_hw[1]} is too small for two 2x2 poolings "
                f"(needs at least {MIN_INPUT}x{MIN_INPUT} after cropping)"
            )
        self.spec = spec
        self.features = nn.Sequential(
            nn.Conv2d(spec.in_channels, spec.conv1_channels, KERNEL, padding=spec.padding),
            nn.MaxPool2d(POOL),
            nn.ReLU(inplace=True),
            nn.Conv2d(spec.conv1_channels, spec.conv2_channels, KERNEL, padding=spec.padding),
            nn.MaxPool2d(POOL),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(spec.dropout),
            nn.Linear(spec.conv2_channels * h * w, spec.num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_sample(spec: ModelSpec) -> int:
    """Multiply-adds x 2 of one forward pass (convolutions and the linear layer)."""
    (h1, w1), (h2, w2) = spec.conv_hw()
    conv1 = h1 * w1 * spec.conv1_channels * spec.in_channels * KERNEL * KERNEL
    conv2 = h2 * w2 * spec.conv2_channels * spec.conv1_channels * KERNEL * KERNEL
    fh, fw = spec.feature_hw()
    linear = spec.conv2_channels * fh * fw * spec.num_classes
    return 2 * (conv1 + conv2 + linear)


def summarize(spec: ModelSpec) -> dict:
    """Layers with their output shapes and parameter counts, the totals and the size in memory.

    Built from the spec on the CPU (shapes and counts do not depend on the weights or the device).
    """
    model = CNN(spec).eval()
    layers: list[dict] = []

    def hook(name: str):
        def record(module: nn.Module, _inputs, output: torch.Tensor) -> None:
            layers.append({
                "name": name,
                "type": type(module).__name__,
                "detail": module.extra_repr(),
                "output_shape": list(output.shape[1:]),
                "parameters": sum(p.numel() for p in module.parameters(recurse=False)),
            })
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if not list(m.children())]
    with torch.no_grad():
        model(torch.zeros(1, spec.in_channels, *spec.input_hw))
    for h in handles:
        h.remove()
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return {
        "input_shape": [spec.in_channels, *spec.input_hw],
        "layers": layers,
        "parameters": count_parameters(model),
        "size_bytes": size,
        "flops_per_sample": flops_per_sample(spec),
        "spec": spec.to_dict(),
    }

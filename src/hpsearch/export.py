"""The tested winner as a file that loads with PyTorch alone: a `torch.export` program (`model.pt2`).

The program takes a batch of images as the dataset stores them (uint8, N x C x H x W, 0-255) and
does what hpsearch does before the network: the centre crop and the per-channel normalisation
with the training part's mean and std. So a user needs neither hpsearch nor its data pipeline,
only `torch.export.load(path).module()`. The class names travel inside the file (`META_FILE`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from hpsearch.data import Normalizer, TestData
from hpsearch.model import CNN, ModelSpec

MODEL_FILE = "model.pt2"
META_FILE = "hpsearch.json"  # extra file inside the program: classes, input shape, preprocessing


class Deployable(nn.Module):
    """Crop, normalise, classify: the whole path from stored image to class scores."""

    def __init__(self, model: CNN, normalizer: Normalizer, crop: tuple[int, int], image_hw: tuple[int, int]) -> None:
        super().__init__()
        self.model = model
        shape = (1, len(normalizer.mean), 1, 1)
        self.register_buffer("mean", torch.tensor(normalizer.mean, dtype=torch.float32).view(shape))
        self.register_buffer("inv_std", 1.0 / torch.tensor(normalizer.std, dtype=torch.float32).view(shape))
        h, w = image_hw
        # The same centre crop as hpsearch.data.center_crop, fixed for this image size.
        self.top, self.left = (h - crop[0]) // 2, (w - crop[1]) // 2
        self.crop = crop

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images[:, :, self.top : self.top + self.crop[0], self.left : self.left + self.crop[1]]
        return self.model((x.float() - self.mean) * self.inv_std)


def export_winner(spec: ModelSpec, state_dict: dict[str, torch.Tensor], normalizer: Normalizer,
                  crop: tuple[int, int], test: TestData, out_dir: Path) -> dict:
    """Write `out_dir/model.pt2` (fp32, CPU) and check it on the test images already in memory.

    Returns what the report needs: the file, its input, and the exported program's own accuracy
    on the test split (the same images `finalize` just evaluated, not another look at new data).
    """
    model = CNN(spec)
    model.load_state_dict({k: v.detach().cpu() for k, v in state_dict.items()})
    c, h, w = test.image_shape
    module = Deployable(model, normalizer, crop, (h, w)).eval()
    example = torch.zeros(2, c, h, w, dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    program = torch.export.export(module, (example,), dynamic_shapes=({0: batch},))
    meta = {
        "classes": list(test.classes),
        "input": {"dtype": "uint8", "shape": ["N", c, h, w], "range": [0, 255]},
        "crop": list(crop),
        "normalizer": {"mean": list(normalizer.mean), "std": list(normalizer.std)},
        "model": spec.to_dict(),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / MODEL_FILE
    tmp = path.with_name(path.name + ".tmp")
    torch.export.save(program, tmp, extra_files={META_FILE: json.dumps(meta)})
    tmp.replace(path)
    return {
        "file": MODEL_FILE,
        "path": str(path),
        "meta_file": META_FILE,
        "torch": torch.__version__.split("+")[0],
        "input": f"uint8 tensor N × {c} × {h} × {w}",
        "example_shape": [1, c, h, w],
        "test_accuracy": accuracy(program.module(), test.test.images.cpu(), test.test.labels.cpu()),
    }


@torch.inference_mode()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1024) -> float:
    correct = 0
    for i in range(0, len(labels), batch_size):
        correct += int((model(images[i : i + batch_size]).argmax(dim=1) == labels[i : i + batch_size]).sum())
    return correct / max(len(labels), 1)

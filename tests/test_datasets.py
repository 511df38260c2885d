"""Data a user brings: `hpsearch worker` then `hpsearch finalize` on every kind, or a one-line error
with nothing written.

The datasets are written by the tests from the MNIST test set shipped in the repository (real
digits, so the accuracies mean something): resized to 8x8 and 16x16, coloured at 32x32 in both
4-dim layouts, as a folder of PNG/JPEG files, with labels {3, 7}, with one class, with a class of
3 images. Each kind runs through the CLI in subprocesses, as a user runs it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import run_cli
from hpsearch.data import read_idx, write_idx

pytestmark = pytest.mark.slow

STUDY = """\
[study]
name = "{name}"

[data]
{data}

[search]
lr = {{ low = 2e-3, high = 1e-2, log = true }}
optimizer = "adam"
conv1_channels = {{ low = 8, high = 16 }}
conv2_channels = {{ low = 16, high = 32 }}
batch_size = 64

[training]
max_epochs = 2
patience = 2
crop_margin = {margin}

[sampler]
seed = 3

[budget]
n_trials = 2
"""


@pytest.fixture(scope="module")
def digits(mnist_dir: Path) -> tuple[torch.Tensor, np.ndarray]:
    """The first 2,000 shipped MNIST digits (N x 1 x 28 x 28 uint8) and their labels."""
    images = read_idx(mnist_dir / "t10k-images-idx3-ubyte.gz")[:2000]
    labels = read_idx(mnist_dir / "t10k-labels-idx1-ubyte.gz")[:2000]
    return torch.from_numpy(images.copy()).unsqueeze(1), labels


def resized(images: torch.Tensor, side: int) -> np.ndarray:
    """N x side x side: the digits resized (area averaging)."""
    x = F.interpolate(images.float(), size=(side, side), mode="area").round().to(torch.uint8)
    return x[:, 0].numpy()


def coloured(images: torch.Tensor, seed: int = 0) -> np.ndarray:
    """28x28 digits on 32x32, each painted in a random colour on a random background (N x 3 x 32 x 32)."""
    rng = np.random.default_rng(seed)
    x = np.pad(images.numpy()[:, 0].astype(np.float32) / 255, ((0, 0), (2, 2), (2, 2)))
    fg = rng.uniform(0.3, 1.0, (len(x), 3, 1, 1))
    bg = rng.uniform(0.0, 0.3, (len(x), 3, 1, 1))
    return np.rint(255 * (bg + (fg - bg) * x[:, None])).astype(np.uint8)


def write_pair(folder: Path, images: np.ndarray, labels: np.ndarray, dims: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write_idx(folder / f"set-images-idx{dims}-ubyte.gz", images)
    write_idx(folder / "set-labels-idx1-ubyte.gz", labels)
    return folder


def write_png_folder(root: Path, images: torch.Tensor, labels: np.ndarray) -> Path:
    """Digits 0, 1 and 2 as one folder per class, in mixed sizes and formats (resized on load)."""
    names = {0: "zero", 1: "one", 2: "two"}
    for i, (img, y) in enumerate(zip(images[:, 0].numpy(), labels)):
        if int(y) not in names:
            continue
        d = root / names[int(y)]
        d.mkdir(parents=True, exist_ok=True)
        pic = Image.fromarray(img)
        if i % 3 == 0:
            pic.resize((20, 20)).save(d / f"{i}.png")
        elif i % 3 == 1:
            pic.convert("RGB").save(d / f"{i}.jpg", quality=95)
        else:
            pic.save(d / f"{i}.png")
    return root


def study_file(folder: Path, name: str, data: str, margin: int = 4) -> Path:
    path = folder / f"{name}.toml"
    path.write_text(STUDY.format(name=name, data=data, margin=margin))
    return path


def search_and_finalize(tmp_path: Path, study: Path, data_dir: Path) -> tuple[dict, str]:
    """Worker then finalize through the CLI; the report's result and everything they printed."""
    url = f"sqlite:///{tmp_path / 'hpsearch.db'}"
    env = {"HPSEARCH_CACHE_DIR": str(tmp_path / "cache")}
    common = ("--study", str(study), "--storage", url, "--data-dir", str(data_dir), "--device", "cpu")
    w = run_cli("worker", *common, cwd=tmp_path, env=env)
    assert w.returncode == 0, w.stdout + w.stderr
    f = run_cli("finalize", *common, "--out", str(tmp_path / "reports"), cwd=tmp_path, env=env)
    assert f.returncode == 0, f.stdout + f.stderr
    output = w.stdout + w.stderr + f.stdout + f.stderr
    assert "Traceback" not in output
    doc = json.loads((tmp_path / "reports" / study.stem / "report.json").read_text())
    r = doc["result"]
    # For the record (pytest -s): each kind of data with its validation and test accuracy.
    print(f"\n{study.stem}: validation accuracy {r['validation']['accuracy']:.2%}, "
          f"test accuracy {r['test']['accuracy']:.2%} on {r['test']['images']} images")
    return r, output


def refused(tmp_path: Path, study: Path, data_dir: Path) -> str:
    """The worker's one-line error; the storage and the artifact store were never created."""
    url = f"sqlite:///{tmp_path / 'hpsearch.db'}"
    r = run_cli("worker", "--study", str(study), "--storage", url, "--data-dir", str(data_dir),
                "--device", "cpu", cwd=tmp_path, env={"HPSEARCH_CACHE_DIR": str(tmp_path / "cache")})
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hpsearch: error: "), r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    assert not (tmp_path / "hpsearch.db").exists()
    assert not (tmp_path / "hpsearch-artifacts").exists()
    return lines[0]


# --- data that searches ------------------------------------------------------------------------


@pytest.mark.parametrize("side,margin,padding,floor", [
    (8, 2, 2, 0.4),  # 6x6 crops: padded convolutions
    (16, 4, 2, 0.7),  # 12x12 crops: padded convolutions
    (64, 8, 0, 0.7),  # 56x56 crops: the seed's unpadded network
])
def test_greyscale_images_from_8x8_to_64x64_train_with_crops(tmp_path, digits, side, margin, padding, floor):
    images, labels = digits
    d = write_pair(tmp_path / "data", resized(images, side), labels)
    result, _ = search_and_finalize(tmp_path, study_file(tmp_path, f"grey{side}", 'dataset = "idx"', margin), d)
    model = result["model"]
    assert model["input_shape"] == [1, side - margin, side - margin]  # still augmented by random crops
    assert model["spec"]["input_hw"] == [side - margin, side - margin]
    conv = [layer for layer in model["layers"] if layer["type"] == "Conv2d"]
    # torch names the padding only when there is some.
    assert all((f"padding=({padding}, {padding})" in layer["detail"]) == bool(padding) for layer in conv)
    assert len(conv) == 2
    assert result["test"]["accuracy"] > floor  # ten classes: chance is 10%


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_colour_idx4_files_in_either_layout(tmp_path, digits, layout):
    images, labels = digits
    nchw = coloured(images)
    on_disk = nchw.transpose(0, 2, 3, 1) if layout == "nhwc" else nchw
    d = write_pair(tmp_path / "data", np.ascontiguousarray(on_disk), labels, dims=4)
    # No layout in the file: inferred from where the 3 channels are.
    result, output = search_and_finalize(tmp_path, study_file(tmp_path, f"colour-{layout}", 'dataset = "idx"'), d)
    assert "shape (3, 32, 32)" in output
    assert result["model"]["input_shape"] == [3, 28, 28]
    assert result["test"]["accuracy"] > 0.5


def test_a_folder_of_pngs_and_jpegs_with_three_classes(tmp_path, digits):
    images, labels = digits
    root = write_png_folder(tmp_path / "pictures", images, labels)
    data = 'dataset = "folder"\nimage_size = [24, 24]'
    result, output = search_and_finalize(tmp_path, study_file(tmp_path, "pictures", data), root)
    assert result["test"]["classes"] == ["one", "two", "zero"]  # the folders' names, sorted
    assert result["model"]["input_shape"] == [1, 20, 20]  # grey images stay one channel
    # Decoded once, by the worker; finalize loaded the cache.
    assert output.count("decoding") == 1
    assert len(list((tmp_path / "cache" / "folders").glob("*.npz"))) == 1
    assert result["test"]["accuracy"] > 0.8


def test_sparse_labels_make_two_classes_named_by_their_values(tmp_path, digits):
    images, labels = digits
    keep = np.isin(labels, [3, 7])
    d = write_pair(tmp_path / "data", images.numpy()[keep], labels[keep])
    result, _ = search_and_finalize(tmp_path, study_file(tmp_path, "three-seven", 'dataset = "idx"'), d)
    assert result["test"]["classes"] == ["3", "7"]  # two outputs, named by the original labels
    assert result["model"]["spec"]["num_classes"] == 2
    assert [c["class"] for c in result["test"]["per_class"]] == ["3", "7"]
    assert result["test"]["accuracy"] > 0.8


def test_a_class_of_three_images_is_warned_about_at_load_and_in_the_report(tmp_path, digits):
    images, labels = digits
    first_twos = np.flatnonzero(labels == 2)[:3]
    keep = np.isin(labels, [0, 1]) | np.isin(np.arange(len(labels)), first_twos)
    d = write_pair(tmp_path / "data", images.numpy()[keep], labels[keep])
    result, output = search_and_finalize(tmp_path, study_file(tmp_path, "tiny-class", 'dataset = "idx"'), d)
    assert "warning: class '2' has 3 image(s)" in output
    counts = result["data"]["counts"]["2"]
    assert sum(counts.values()) == 3 and 0 in counts.values()
    assert len(result["data"]["warnings"]) == 1 and "'2'" in result["data"]["warnings"][0]
    report_md = (tmp_path / "reports" / "tiny-class" / "report.md").read_text()
    assert "class '2' has 3 image(s)" in report_md


# --- data that is refused, with nothing written -----------------------------------------------


def test_one_class_is_refused(tmp_path, digits):
    images, labels = digits
    keep = labels == 5
    d = write_pair(tmp_path / "data", images.numpy()[keep], labels[keep])
    line = refused(tmp_path, study_file(tmp_path, "one-class", 'dataset = "idx"'), d)
    assert "every image has label 5" in line and "at least 2 classes" in line


def test_float_labels_are_refused(tmp_path, digits):
    images, labels = digits
    d = write_pair(tmp_path / "data", images.numpy(), labels.astype(np.float32) + 0.5)
    line = refused(tmp_path, study_file(tmp_path, "float-labels", 'dataset = "idx"'), d)
    assert "labels must be integer class numbers" in line and "float32" in line


def test_an_ambiguous_layout_is_refused_with_the_setting_to_use(tmp_path, digits):
    images, labels = digits
    x = np.ascontiguousarray(resized(images, 8)[:, :3, :, None].repeat(3, axis=3))  # N x 3 x 8 x 3
    d = write_pair(tmp_path / "data", x, labels, dims=4)
    line = refused(tmp_path, study_file(tmp_path, "which-layout", 'dataset = "idx"'), d)
    assert 'set layout = "nhwc" or layout = "nchw"' in line


def test_a_crop_that_leaves_too_little_is_refused_with_the_margin_that_fits(tmp_path, digits):
    images, labels = digits
    d = write_pair(tmp_path / "data", resized(images, 8), labels)
    line = refused(tmp_path, study_file(tmp_path, "big-crop", 'dataset = "idx"', margin=6), d)
    assert "crops 8x8 images to 2x2" in line and "set crop_margin to 4 or less" in line


def test_images_smaller_than_the_network_takes_are_refused(tmp_path, digits):
    images, labels = digits
    d = write_pair(tmp_path / "data", resized(images, 3), labels)
    line = refused(tmp_path, study_file(tmp_path, "tiny", 'dataset = "idx"', margin=0), d)
    assert "images of 3x3 are smaller than the 4x4" in line

"""Datasets, the deterministic stratified train/val/test split, and device-resident batches.

The pool (all images the study names) is split per class by a hash of each image's bytes and the
split seed, so the split is a pure function of the data's content: the same on every worker, on
every node, whatever order the files were read in. Workers get `load_search_data` (train and
validation only); the test part is reachable only through `load_test_data`, for `finalize`.

Images stay uint8 on the trial's device; batches are cropped and normalised there, in one go.
"""

from __future__ import annotations

import gzip
import hashlib
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hpsearch.config import DataConfig
from hpsearch.errors import DataError
from hpsearch.model import MIN_INPUT

# --- IDX files (the MNIST family's format) ------------------------------------------------------

_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (gzipped when it ends in .gz) into an array of its shape and type."""
    path = Path(path)
    try:
        with _open(path) as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read IDX file {path}: {e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number {raw[:4].hex()!r})")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(
            f"{path}: header says shape {shape} ({expected} bytes) but the file holds "
            f"{len(raw) - header} bytes; is it truncated?"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write an array as an IDX file (gzipped when the name ends in .gz)."""
    path = Path(path)
    codes = {v.newbyteorder("=").str: k for k, v in _IDX_DTYPES.items()}
    a = np.ascontiguousarray(array)
    code = codes.get(a.dtype.newbyteorder("=").str)
    if code is None:
        raise ValueError(f"IDX cannot store dtype {a.dtype}")
    big = a.astype(_IDX_DTYPES[code])
    blob = bytes([0, 0, code, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape) + big.tobytes()
    with (gzip.open(path, "wb") if path.suffix == ".gz" else open(path, "wb")) as f:
        f.write(blob)


IDX_IMAGES = re.compile(r"images-idx[34]-ubyte")


def find_idx_pairs(folder: Path) -> list[tuple[Path, Path]]:
    """Every `*images-idx3-ubyte[.gz]` or `*images-idx4-ubyte[.gz]` in `folder` with its
    `*labels-idx1-ubyte[.gz]`."""
    pairs = []
    for img in sorted(p for p in folder.iterdir() if IDX_IMAGES.search(p.name)):
        lab_name = IDX_IMAGES.sub("labels-idx1-ubyte", img.name)
        candidates = [folder / lab_name, folder / lab_name.removesuffix(".gz"), folder / (lab_name + ".gz")]
        lab = next((c for c in candidates if c.is_file()), None)
        if lab is None:
            raise DataError(f"{img} has no matching labels file ({lab_name}) in {folder}")
        pairs.append((img, lab))
    return pairs


# Channel counts that `layout = "auto"` recognises: greyscale and RGB.
_CHANNELS = (1, 3)


def to_nchw(images: np.ndarray, layout: str, path: Path) -> np.ndarray:
    """N x H x W, N x H x W x C or N x C x H x W images as N x C x H x W.

    A 4-dim array is read by `layout`; "auto" infers it when exactly one of dims 1 and 3 has a
    channel count of 1 or 3, and asks for `layout` otherwise (a 3 x 32 x 3 image is either).
    """
    if images.ndim == 3:
        return images[:, None]
    if layout == "auto":
        first, last = images.shape[1] in _CHANNELS, images.shape[3] in _CHANNELS
        if first == last:
            a, b, c = images.shape[1:]
            raise DataError(
                f"{path}: images of shape {a} x {b} x {c} could be H x W x C or C x H x W; set "
                f'layout = "nhwc" or layout = "nchw" in the study\'s [data] section'
            )
        layout = "nchw" if first else "nhwc"
    return images if layout == "nchw" else images.transpose(0, 3, 1, 2)


def check_labels(labels: np.ndarray, path: Path) -> None:
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"{path}: labels must be integer class numbers, but the file holds {labels.dtype} values; "
            f"write the labels as an integer IDX type (e.g. unsigned byte)"
        )


# --- the pool -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pool:
    """Every image the study names, before splitting. Labels are 0..K-1; `classes[k]` names
    label k by its original value (IDX), its folder (image folders) or torchvision's name."""

    images: torch.Tensor  # uint8, N x C x H x W
    labels: torch.Tensor  # int64, N, in 0..K-1
    classes: tuple[str, ...]
    name: str


def _dense_labels(raw: np.ndarray, name: str) -> tuple[torch.Tensor, tuple[str, ...]]:
    """The labels present, mapped to 0..K-1 in increasing order; their original values as names."""
    values, dense = np.unique(raw, return_inverse=True)
    if len(values) < 2:
        raise DataError(
            f"{name}: every image has label {values[0]}, but a classifier needs at least 2 classes; "
            f"add images of another class"
        )
    return torch.from_numpy(dense.astype(np.int64)), tuple(str(int(v)) for v in values)


_TORCHVISION = {
    "mnist": "MNIST",
    "fashion-mnist": "FashionMNIST",
    "kmnist": "KMNIST",
    "cifar10": "CIFAR10",
}


def _load_torchvision(cfg: DataConfig, root: Path) -> Pool:
    import torchvision

    cls = getattr(torchvision.datasets, _TORCHVISION[cfg.dataset])
    images, labels, classes = [], [], ()
    for part in cfg.parts:
        try:
            ds = cls(root=str(root), train=(part == "train"), download=True)
        except Exception as e:  # torchvision raises URLError, RuntimeError, OSError...
            raise DataError(
                f"could not load or download {cls.__name__} ({part}) into {root}: {e}. "
                f"Copy the dataset's files there, or use dataset = 'idx' with --data-dir "
                f"pointing at IDX files (the cnn study runs offline on the MNIST copy in the repository)"
            ) from None
        data = torch.as_tensor(np.asarray(ds.data))
        # MNIST family: N x H x W; CIFAR: N x H x W x C.
        data = data.unsqueeze(1) if data.ndim == 3 else data.permute(0, 3, 1, 2)
        images.append(data.contiguous())
        labels.append(torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64))
        classes = tuple(ds.classes)
    return Pool(torch.cat(images), torch.cat(labels), classes, cls.__name__)


def _load_idx(cfg: DataConfig, root: Path) -> Pool:
    if not root.is_dir():
        raise DataError(f"data dir {root} does not exist; pass --data-dir pointing at your IDX files")
    if cfg.images:
        pairs = [(root / i, root / l) for i, l in zip(cfg.images, cfg.labels)]
        for p in (p for pair in pairs for p in pair):
            if not p.is_file():
                raise DataError(f"{p} not found; check data.images/data.labels or --data-dir")
    else:
        pairs = find_idx_pairs(root)
        if not pairs:
            raise DataError(
                f"no '*images-idx3-ubyte[.gz]' or '*images-idx4-ubyte[.gz]' files in {root}; pass "
                f"--data-dir pointing at IDX files"
            )
    images, labels = [], []
    for img_path, lab_path in pairs:
        img, lab = read_idx(img_path), read_idx(lab_path)
        if img.ndim not in (3, 4) or lab.ndim != 1 or len(img) != len(lab):
            raise DataError(
                f"{img_path} / {lab_path}: expected N x H x W or 4-dim (N x H x W x C or N x C x H x W) "
                f"images and N labels, but got shapes {img.shape} and {lab.shape}"
            )
        if img.dtype != np.uint8:
            raise DataError(f"{img_path}: images must be unsigned bytes, but got {img.dtype}")
        check_labels(lab, lab_path)
        images.append(torch.from_numpy(np.ascontiguousarray(to_nchw(img, cfg.layout, img_path))))
        labels.append(lab.astype(np.int64))
    shapes = {tuple(t.shape[1:]) for t in images}
    if len(shapes) > 1:
        raise DataError(f"IDX files in {root} have different image shapes (C x H x W) {sorted(shapes)}")
    name = f"IDX files in {root}"
    if sum(len(part) for part in labels) == 0:
        raise DataError(f"the IDX files in {root} hold no images; pass --data-dir pointing at a dataset")
    y, classes = _dense_labels(np.concatenate(labels), name)
    return Pool(torch.cat(images), y, classes, name)


def load_pool(cfg: DataConfig, data_dir: str | Path | None = None) -> Pool:
    """Load every image the study names. `data_dir` overrides the file's `data.root`."""
    root = Path(data_dir if data_dir is not None else cfg.root).expanduser()
    if cfg.dataset == "idx":
        pool = _load_idx(cfg, root)
    elif cfg.dataset == "folder":
        from hpsearch.imagefolder import load_folder  # Pillow only where it is needed

        images, labels, classes = load_folder(root, cfg.image_size, cfg.channels)
        pool = Pool(images, labels, classes, f"image folder {root}")
    else:
        pool = _load_torchvision(cfg, root)
    if len(pool.labels) < 20:
        raise DataError(f"{pool.name}: {len(pool.labels)} images are too few to split 3 ways")
    return pool


# --- the split ----------------------------------------------------------------------------------


def content_keys(images: torch.Tensor, labels: torch.Tensor, seed: int) -> np.ndarray:
    """A 64-bit key per image from its bytes, its label and the split seed."""
    flat = images.reshape(len(images), -1).numpy()
    lab = labels.numpy()
    salt = seed.to_bytes(8, "little", signed=True)
    keys = np.empty(len(flat), dtype=np.uint64)
    for i in range(len(flat)):
        h = hashlib.blake2b(flat[i].tobytes(), digest_size=8, salt=salt[:8].ljust(16, b"\0"))
        h.update(int(lab[i]).to_bytes(8, "little"))
        keys[i] = int.from_bytes(h.digest(), "little")
    return keys


def split_indices(
    images: torch.Tensor, labels: torch.Tensor, fractions: tuple[float, float, float], seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stratified train/val/test indices, a pure function of the content and the seed.

    Within each class, images are ordered by their content key and cut at the fractions, so each
    part holds (up to rounding) the same share of every class, and no index is in two parts.
    """
    keys = content_keys(images, labels, seed)
    lab = labels.numpy()
    parts: list[list[np.ndarray]] = [[], [], []]
    for c in np.unique(lab):
        idx = np.flatnonzero(lab == c)
        # Sort by key; identical images (same key) keep file order, so ties are deterministic.
        idx = idx[np.argsort(keys[idx], kind="stable")]
        n = len(idx)
        n_train = int(round(n * fractions[0]))
        n_val = int(round(n * fractions[1]))
        parts[0].append(idx[:n_train])
        parts[1].append(idx[n_train : n_train + n_val])
        parts[2].append(idx[n_train + n_val :])
    out = tuple(np.sort(np.concatenate(p)) for p in parts)
    for name, part in zip(("train", "validation", "test"), out):
        if len(part) == 0:
            raise DataError(f"the {name} part of the split is empty; use more data or larger fractions")
    return out  # type: ignore[return-value]


def split_fingerprint(images: torch.Tensor, labels: torch.Tensor, idx: np.ndarray) -> str:
    """A short hash of one part's content, to check that every worker holds the same split."""
    h = hashlib.sha256()
    h.update(images[torch.from_numpy(idx)].numpy().tobytes())
    h.update(labels[torch.from_numpy(idx)].numpy().tobytes())
    return h.hexdigest()[:16]


# --- device-resident data and batches -----------------------------------------------------------


@dataclass(frozen=True)
class DeviceSplit:
    """One part of the split, as uint8 images and int64 labels on the trial's device."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class Normalizer:
    """Per-channel mean/std of the training part (on the 0-255 scale), applied on the device."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, len(self.mean), 1, 1)
        mean = torch.tensor(self.mean, device=x.device).view(shape)
        inv_std = 1.0 / torch.tensor(self.std, device=x.device).view(shape)
        return (x.float() - mean) * inv_std

    @staticmethod
    def fit(images: torch.Tensor) -> "Normalizer":
        x = images.double()
        mean = x.mean(dim=(0, 2, 3))
        std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
        return Normalizer(tuple(mean.tolist()), tuple(std.tolist()))


@dataclass(frozen=True)
class ClassCounts:
    """How many images of each class each part of the split holds, and what is wrong with that."""

    classes: tuple[str, ...]
    counts: tuple[tuple[int, int, int], ...]  # per class: train, validation, test

    @staticmethod
    def of(pool: Pool, parts: tuple[np.ndarray, np.ndarray, np.ndarray]) -> "ClassCounts":
        k = len(pool.classes)
        lab = pool.labels.numpy()
        per_part = [np.bincount(lab[idx], minlength=k) for idx in parts]
        return ClassCounts(pool.classes, tuple(tuple(int(p[c]) for p in per_part) for c in range(k)))

    @property
    def warnings(self) -> tuple[str, ...]:
        """One line per class missing from a part: its validation or test figures say nothing."""
        out = []
        for name, (tr, va, te) in zip(self.classes, self.counts):
            if min(tr, va, te) == 0:
                out.append(
                    f"class {name!r} has {tr + va + te} image(s): {tr} train / {va} validation / {te} test, "
                    f"so it is missing from a part of the split; add images of it to measure it"
                )
        return tuple(out)

    def to_dict(self) -> dict:
        return {
            "classes": list(self.classes),
            "counts": {c: {"train": tr, "validation": va, "test": te}
                       for c, (tr, va, te) in zip(self.classes, self.counts)},
            "warnings": list(self.warnings),
        }


@dataclass(frozen=True)
class SearchData:
    """What a worker may see: the train and validation parts. There is no test attribute."""

    train: DeviceSplit
    val: DeviceSplit
    normalizer: Normalizer
    num_classes: int
    image_shape: tuple[int, int, int]  # C, H, W before cropping
    classes: tuple[str, ...]  # class k's name: its original label value, folder or torchvision name
    fingerprint: str  # of train + validation content
    class_counts: ClassCounts


@dataclass(frozen=True)
class TestData:
    test: DeviceSplit
    normalizer: Normalizer
    num_classes: int
    image_shape: tuple[int, int, int]
    classes: tuple[str, ...]
    fingerprint: str
    class_counts: ClassCounts


def _partition(cfg: DataConfig, data_dir: str | Path | None):
    pool = load_pool(cfg, data_dir)
    train_idx, val_idx, test_idx = split_indices(pool.images, pool.labels, cfg.split, cfg.split_seed)
    return pool, train_idx, val_idx, test_idx


def _to_device(pool: Pool, idx: np.ndarray, device: torch.device) -> DeviceSplit:
    i = torch.from_numpy(idx)
    return DeviceSplit(pool.images[i].contiguous().to(device), pool.labels[i].to(device))


def load_search_data(cfg: DataConfig, data_dir: str | Path | None, device: torch.device) -> SearchData:
    """Train and validation parts on `device`. The test part is dropped here, never returned."""
    pool, train_idx, val_idx, test_idx = _partition(cfg, data_dir)
    train_images = pool.images[torch.from_numpy(train_idx)]
    return SearchData(
        train=_to_device(pool, train_idx, device),
        val=_to_device(pool, val_idx, device),
        normalizer=Normalizer.fit(train_images),
        num_classes=len(pool.classes),
        image_shape=tuple(pool.images.shape[1:]),  # type: ignore[arg-type]
        classes=pool.classes,
        fingerprint=split_fingerprint(pool.images, pool.labels, np.concatenate([train_idx, val_idx])),
        class_counts=ClassCounts.of(pool, (train_idx, val_idx, test_idx)),
    )


def load_test_data(cfg: DataConfig, data_dir: str | Path | None, device: torch.device) -> TestData:
    """The held-out test part, for `hpsearch finalize` only."""
    pool, train_idx, val_idx, test_idx = _partition(cfg, data_dir)
    return TestData(
        test=_to_device(pool, test_idx, device),
        normalizer=Normalizer.fit(pool.images[torch.from_numpy(train_idx)]),
        num_classes=len(pool.classes),
        image_shape=tuple(pool.images.shape[1:]),  # type: ignore[arg-type]
        classes=pool.classes,
        fingerprint=split_fingerprint(pool.images, pool.labels, test_idx),
        class_counts=ClassCounts.of(pool, (train_idx, val_idx, test_idx)),
    )


def crop_size(image_shape: tuple[int, int, int], margin: int) -> tuple[int, int]:
    """The network's input: (H - margin) x (W - margin). Checked here, where the data is loaded,
    against the smallest input the CNN takes, so data that cannot fit is refused before a worker
    touches the storage."""
    _, h, w = image_shape
    if min(h, w) < MIN_INPUT:
        raise DataError(
            f"images of {h}x{w} are smaller than the {MIN_INPUT}x{MIN_INPUT} the CNN needs (two 2x2 "
            f"poolings); use larger images (for a folder: data.image_size = [{MIN_INPUT}, {MIN_INPUT}] or more)"
        )
    if min(h, w) - margin < MIN_INPUT:
        raise DataError(
            f"training.crop_margin = {margin} crops {h}x{w} images to {h - margin}x{w - margin}, below the "
            f"{MIN_INPUT}x{MIN_INPUT} the CNN needs; set crop_margin to {min(h, w) - MIN_INPUT} or less"
        )
    return h - margin, w - margin


def random_crop(x: torch.Tensor, size: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """An independent random crop per image, in one gather on the device."""
    b, c, h, w = x.shape
    ch, cw = size
    if (ch, cw) == (h, w):
        return x
    oy = torch.randint(0, h - ch + 1, (b,), device=x.device, generator=generator)
    ox = torch.randint(0, w - cw + 1, (b,), device=x.device, generator=generator)
    rows = torch.arange(ch, device=x.device)
    cols = torch.arange(cw, device=x.device)
    # Flat index of every kept pixel: (oy + r) * w + (ox + c), per image.
    index = ((oy * w + ox)[:, None, None] + rows[None, :, None] * w + cols[None, None, :]).view(b, 1, -1)
    return x.reshape(b, c, h * w).gather(2, index.expand(b, c, ch * cw)).view(b, c, ch, cw)


def center_crop(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    h, w = x.shape[-2:]
    top, left = (h - size[0]) // 2, (w - size[1]) // 2
    return x[..., top : top + size[0], left : left + size[1]]

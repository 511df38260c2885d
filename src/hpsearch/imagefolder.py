"""`dataset = "folder"`: one sub-folder per class of PNG/JPEG files (torchvision's ImageFolder layout).

The images are decoded once (Pillow), resized to the study's `image_size` and kept as one uint8
N x C x H x W tensor. The result is cached under a key made from the files' bytes, their classes
and the decoding settings, so the next worker (or the next run) loads the cache instead of decoding
again, and a changed file means a new key, never a stale cache. The cache is written to a temporary
file and renamed into place, so workers starting together never read half a file.

Classes are the sub-folders' names in sorted order (as ImageFolder numbers them); the split that
follows is, as for every dataset, a pure function of the decoded pixels and these labels.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from hpsearch.errors import DataError

SUFFIXES = {".png", ".jpg", ".jpeg"}
CACHE_FORMAT = 1  # part of the key: a change in how images are decoded invalidates every cache
ENV_CACHE_DIR = "HPSEARCH_CACHE_DIR"


def cache_dir() -> Path:
    """$HPSEARCH_CACHE_DIR, else $XDG_CACHE_HOME/hpsearch, else ~/.cache/hpsearch."""
    if os.environ.get(ENV_CACHE_DIR):
        return Path(os.environ[ENV_CACHE_DIR]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "hpsearch"


def list_images(root: Path) -> tuple[tuple[str, ...], list[tuple[Path, int]]]:
    """Class names (sub-folders, sorted) and every image file with its class index."""
    if not root.is_dir():
        raise DataError(f"data dir {root} does not exist; pass --data-dir pointing at a folder of class sub-folders")
    dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not dirs:
        raise DataError(
            f"{root} has no sub-folders; dataset = 'folder' expects one sub-folder of PNG/JPEG images "
            f"per class (torchvision's ImageFolder layout)"
        )
    files: list[tuple[Path, int]] = []
    for k, d in enumerate(dirs):
        found = sorted(p for p in d.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file())
        if not found:
            raise DataError(f"class folder {d} holds no .png/.jpg/.jpeg files; add images or remove the folder")
        files += [(p, k) for p in found]
    if len(dirs) < 2:
        raise DataError(
            f"{root} has one class folder ({dirs[0].name}), but a classifier needs at least 2 classes; "
            f"add a sub-folder of images per class"
        )
    return tuple(d.name for d in dirs), files


def content_key(root: Path, classes: tuple[str, ...], files: list[tuple[Path, int]],
                size: tuple[int, int] | None, channels: int | None) -> str:
    """A hash of every file's bytes, path and class, and of the decoding settings."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((CACHE_FORMAT, size, channels, classes)).encode())
    for path, k in files:
        h.update(f"{k}\0{path.relative_to(root).as_posix()}\0".encode())
        h.update(hashlib.blake2b(path.read_bytes(), digest_size=16).digest())
    return h.hexdigest()


def _decode(path: Path, size: tuple[int, int] | None) -> np.ndarray:
    """One image as H x W x 3 uint8, resized to `size` (height, width) when given."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if size is not None and im.size != (size[1], size[0]):
                im = im.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            return np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"cannot decode {path} ({e}); remove or replace the file") from None


def decode_all(files: list[tuple[Path, int]], size: tuple[int, int] | None, console: Console) -> np.ndarray:
    """Every file decoded to N x H x W x 3, with a progress bar on a terminal."""
    out: np.ndarray | None = None
    columns = (TextColumn("decoding images"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as bar:
        for i, (path, _) in enumerate(bar.track(files)):
            img = _decode(path, size)
            if out is None:
                out = np.empty((len(files), *img.shape), dtype=np.uint8)
            elif img.shape != out.shape[1:]:
                first = files[0][0]
                raise DataError(
                    f"{path} is {img.shape[1]}x{img.shape[0]} but {first} is {out.shape[2]}x{out.shape[1]} "
                    f"(width x height); set data.image_size = [height, width] to resize every image"
                )
            out[i] = img
    assert out is not None
    return out


def to_tensor(rgb: np.ndarray, channels: int | None) -> torch.Tensor:
    """N x H x W x 3 -> N x C x H x W; C is 1 when asked, or when every pixel is grey."""
    if channels is None:
        grey = bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())
        channels = 1 if grey else 3
    if channels == 1:
        # ITU-R 601 luma, as Pillow's convert("L"), for colour images asked to be grey.
        y = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        arr = np.clip(np.rint(y), 0, 255).astype(np.uint8)[:, None]
    else:
        arr = rgb.transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(arr))


def _read_cache(path: Path) -> tuple[torch.Tensor, torch.Tensor] | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            return torch.from_numpy(z["images"]), torch.from_numpy(z["labels"])
    except (OSError, KeyError, ValueError):  # absent, or not a complete cache: decode again
        return None


def _write_cache(path: Path, images: torch.Tensor, labels: torch.Tensor) -> None:
    """Temp file + rename: a reader sees the whole cache or none. A read-only place is no error."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".npz")
    except OSError:
        return
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, images=images.numpy(), labels=labels.numpy())
        os.replace(tmp, path)
    except OSError:
        Path(tmp).unlink(missing_ok=True)


def load_folder(root: Path, size: tuple[int, int] | None, channels: int | None,
                console: Console | None = None) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    """Images (uint8, N x C x H x W), labels (0..K-1) and class names of an image folder."""
    console = console or Console(stderr=True)
    classes, files = list_images(root)
    key = content_key(root, classes, files, size, channels)
    cache = cache_dir() / "folders" / f"{key}.npz"
    cached = _read_cache(cache)
    if cached is not None:
        return cached[0], cached[1], classes
    console.print(f"hpsearch: decoding {len(files)} images in {root} (cached in {cache.parent} for next time)",
                  highlight=False)
    images = to_tensor(decode_all(files, size, console), channels)
    labels = torch.tensor([k for _, k in files], dtype=torch.int64)
    _write_cache(cache, images, labels)
    return images, labels, classes

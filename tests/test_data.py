"""The IDX reader, the content-defined stratified split, and device-side augmentation."""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hpsearch.config import DataConfig
from hpsearch.data import (
    SearchData,
    center_crop,
    find_idx_pairs,
    load_pool,
    load_search_data,
    load_test_data,
    random_crop,
    read_idx,
    split_fingerprint,
    split_indices,
    write_idx,
)
from hpsearch.errors import DataError


def _toy(n_per_class=(50, 30, 20), shape=(1, 8, 8), seed=0):
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(n_per_class)])
    images = rng.integers(0, 256, size=(len(labels), *shape), dtype=np.uint8)
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))


# --- IDX ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_round_trip(tmp_path: Path, suffix: str) -> None:
    images = np.random.default_rng(1).integers(0, 256, size=(7, 5, 4), dtype=np.uint8)
    labels = np.arange(7, dtype=np.uint8) % 3
    write_idx(tmp_path / f"a-images-idx3-ubyte{suffix}", images)
    write_idx(tmp_path / f"a-labels-idx1-ubyte{suffix}", labels)
    np.testing.assert_array_equal(read_idx(tmp_path / f"a-images-idx3-ubyte{suffix}"), images)
    np.testing.assert_array_equal(read_idx(tmp_path / f"a-labels-idx1-ubyte{suffix}"), labels)
    assert find_idx_pairs(tmp_path) == [
        (tmp_path / f"a-images-idx3-ubyte{suffix}", tmp_path / f"a-labels-idx1-ubyte{suffix}")
    ]


def test_idx_header_is_checked(tmp_path: Path) -> None:
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    write_idx(tmp_path / "ok", np.zeros((4, 3, 3), dtype=np.uint8))
    (tmp_path / "short").write_bytes((tmp_path / "ok").read_bytes()[:-5])
    with pytest.raises(DataError, match="truncated"):
        read_idx(tmp_path / "short")


def test_idx_reads_big_endian_ints(tmp_path: Path) -> None:
    a = np.array([[1, -2], [300000, 4]], dtype=np.int32)
    write_idx(tmp_path / "ints.gz", a)
    raw = gzip.decompress((tmp_path / "ints.gz").read_bytes())
    assert raw[:4] == bytes([0, 0, 0x0C, 2])  # IDX magic for int32, 2 dimensions
    np.testing.assert_array_equal(read_idx(tmp_path / "ints.gz"), a)


def test_idx_folder_pools_every_pair_and_handles_colour(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    for part, n in (("train", 40), ("t10k", 20)):
        write_idx(tmp_path / f"{part}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 6, 6, 3), dtype=np.uint8))
        write_idx(tmp_path / f"{part}-labels-idx1-ubyte", (np.arange(n) % 4).astype(np.uint8))
    pool = load_pool(DataConfig(dataset="idx"), tmp_path)
    assert pool.images.shape == (60, 3, 6, 6)  # N x H x W x C on disk -> N x C x H x W
    assert pool.classes == ("0", "1", "2", "3")


def test_missing_idx_files_are_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no '\\*images-idx3-ubyte"):
        load_pool(DataConfig(dataset="idx"), tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        load_pool(DataConfig(dataset="idx"), tmp_path / "nope")
    write_idx(tmp_path / "x-images-idx3-ubyte", np.zeros((3, 2, 2), dtype=np.uint8))
    with pytest.raises(DataError, match="no matching labels"):
        load_pool(DataConfig(dataset="idx"), tmp_path)


# --- the split ----------------------------------------------------------------------------------


def test_split_is_disjoint_complete_and_stratified() -> None:
    images, labels = _toy((200, 120, 80))
    tr, va, te = split_indices(images, labels, (0.7, 0.15, 0.15), seed=0)
    assert len(set(tr) & set(va)) == len(set(tr) & set(te)) == len(set(va) & set(te)) == 0
    assert sorted(np.concatenate([tr, va, te]).tolist()) == list(range(len(labels)))
    lab = labels.numpy()
    for c, n in enumerate((200, 120, 80)):
        assert abs((lab[tr] == c).sum() - 0.7 * n) <= 1
        assert abs((lab[va] == c).sum() - 0.15 * n) <= 1
        assert abs((lab[te] == c).sum() - 0.15 * n) <= 1


def test_split_depends_on_content_and_seed_not_on_order() -> None:
    images, labels = _toy()
    tr, va, te = split_indices(images, labels, (0.7, 0.15, 0.15), seed=0)
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(3))
    tr2, va2, te2 = split_indices(images[perm], labels[perm], (0.7, 0.15, 0.15), seed=0)
    # The same images land in the same parts, wherever they were in the files.
    for a, b in ((tr, tr2), (va, va2), (te, te2)):
        assert set(perm[b].tolist()) == set(a.tolist())
    tr3, _, _ = split_indices(images, labels, (0.7, 0.15, 0.15), seed=1)
    assert set(tr3.tolist()) != set(tr.tolist())


def test_split_is_identical_across_processes(mnist_dir: Path) -> None:
    code = (
        "import torch; from hpsearch.config import DataConfig; from hpsearch.data import load_search_data;"
        f"d = load_search_data(DataConfig(dataset='idx'), {str(mnist_dir)!r}, torch.device('cpu'));"
        "print(d.fingerprint, len(d.train), len(d.val))"
    )
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
            for _ in range(2)}
    here = load_search_data(DataConfig(dataset="idx"), mnist_dir, torch.device("cpu"))
    assert outs == {f"{here.fingerprint} {len(here.train)} {len(here.val)}\n"}
    assert (len(here.train), len(here.val)) == (6999, 1500)


def test_workers_never_get_the_test_part(mnist_dir: Path) -> None:
    cfg = DataConfig(dataset="idx")
    search = load_search_data(cfg, mnist_dir, torch.device("cpu"))
    assert not hasattr(search, "test") and set(SearchData.__dataclass_fields__) >= {"train", "val"}
    test = load_test_data(cfg, mnist_dir, torch.device("cpu"))
    assert len(search.train) + len(search.val) + len(test.test) == 10_000
    # No test image is in the search data (compare content, not indices).
    seen = {bytes(x) for x in search.train.images.reshape(len(search.train), -1).numpy()}
    seen |= {bytes(x) for x in search.val.images.reshape(len(search.val), -1).numpy()}
    overlap = sum(bytes(x) in seen for x in test.test.images.reshape(len(test.test), -1).numpy())
    assert overlap <= 2  # MNIST's test set holds a couple of byte-identical duplicate digits
    assert search.normalizer == test.normalizer  # both normalise with the train part's statistics


def test_split_fingerprint_changes_with_content() -> None:
    images, labels = _toy()
    idx = np.arange(10)
    a = split_fingerprint(images, labels, idx)
    images[0, 0, 0, 0] ^= 1
    assert split_fingerprint(images, labels, idx) != a


# --- augmentation -------------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 3])
def test_crops_keep_channels_and_take_real_windows(channels: int) -> None:
    x = torch.arange(5 * channels * 28 * 28, dtype=torch.int64).view(5, channels, 28, 28)
    g = torch.Generator().manual_seed(0)
    out = random_crop(x, (24, 24), g)
    assert out.shape == (5, channels, 24, 24)
    for b in range(5):
        # Each crop is a contiguous 24x24 window of its own image, the same window for every channel.
        top_left = out[b, 0, 0, 0].item() - x[b, 0, 0, 0].item()
        oy, ox = divmod(top_left, 28)
        assert 0 <= oy <= 4 and 0 <= ox <= 4
        torch.testing.assert_close(out[b], x[b, :, oy : oy + 24, ox : ox + 24])
    c = center_crop(x, (24, 24))
    torch.testing.assert_close(c, x[..., 2:26, 2:26])


def test_random_crop_varies_between_images() -> None:
    x = torch.arange(64 * 28 * 28).view(64, 1, 28, 28)
    out = random_crop(x, (24, 24), torch.Generator().manual_seed(0))
    offsets = {(out[b, 0, 0, 0] - x[b, 0, 0, 0]).item() for b in range(64)}
    assert len(offsets) > 5

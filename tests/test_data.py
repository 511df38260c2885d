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


# --- layouts, labels, folders, class counts -----------------------------------------------------


def test_idx4_files_are_found_and_either_layout_is_inferred(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    nchw = rng.integers(0, 256, (30, 3, 5, 7), dtype=np.uint8)
    labels = (np.arange(30) % 3).astype(np.uint8)
    for layout, on_disk in (("nchw", nchw), ("nhwc", nchw.transpose(0, 2, 3, 1))):
        d = tmp_path / layout
        d.mkdir()
        write_idx(d / "c-images-idx4-ubyte.gz", np.ascontiguousarray(on_disk))
        write_idx(d / "c-labels-idx1-ubyte.gz", labels)
        assert find_idx_pairs(d) == [(d / "c-images-idx4-ubyte.gz", d / "c-labels-idx1-ubyte.gz")]
        pool = load_pool(DataConfig(dataset="idx"), d)
        torch.testing.assert_close(pool.images, torch.from_numpy(nchw))
        # Said explicitly, the same.
        torch.testing.assert_close(load_pool(DataConfig(dataset="idx", layout=layout), d).images, pool.images)


def test_an_ambiguous_layout_must_be_named(tmp_path: Path) -> None:
    x = np.random.default_rng(5).integers(0, 256, (30, 3, 6, 3), dtype=np.uint8)
    write_idx(tmp_path / "a-images-idx4-ubyte", x)
    write_idx(tmp_path / "a-labels-idx1-ubyte", (np.arange(30) % 2).astype(np.uint8))
    with pytest.raises(DataError, match='set layout = "nhwc" or layout = "nchw"'):
        load_pool(DataConfig(dataset="idx"), tmp_path)
    assert load_pool(DataConfig(dataset="idx", layout="nhwc"), tmp_path).images.shape == (30, 3, 3, 6)
    assert load_pool(DataConfig(dataset="idx", layout="nchw"), tmp_path).images.shape == (30, 3, 6, 3)


def test_sparse_labels_are_numbered_and_keep_their_values(tmp_path: Path) -> None:
    x = np.random.default_rng(6).integers(0, 256, (40, 4, 4), dtype=np.uint8)
    raw = np.where(np.arange(40) % 2 == 0, 70000, 3).astype(np.int32)
    write_idx(tmp_path / "s-images-idx3-ubyte", x)
    write_idx(tmp_path / "s-labels-idx1-ubyte", raw)
    pool = load_pool(DataConfig(dataset="idx"), tmp_path)
    assert pool.classes == ("3", "70000")  # two outputs, not 70,001
    assert pool.labels.tolist() == [1 if v == 70000 else 0 for v in raw]


@pytest.mark.parametrize("labels,match", [
    (np.full(30, 4, dtype=np.uint8), "every image has label 4"),
    ((np.arange(30) % 3).astype(np.float64) + 0.7, "labels must be integer class numbers"),
])
def test_labels_that_cannot_train_a_classifier_are_refused(tmp_path: Path, labels, match) -> None:
    write_idx(tmp_path / "b-images-idx3-ubyte", np.zeros((30, 4, 4), dtype=np.uint8))
    write_idx(tmp_path / "b-labels-idx1-ubyte", labels)
    with pytest.raises(DataError, match=match):
        load_pool(DataConfig(dataset="idx"), tmp_path)


def test_class_counts_warn_about_a_class_missing_from_a_part(tmp_path: Path) -> None:
    images, labels = _toy((50, 30, 3))
    write_idx(tmp_path / "t-images-idx4-ubyte", images.numpy())
    write_idx(tmp_path / "t-labels-idx1-ubyte", labels.numpy().astype(np.uint8))
    data = load_search_data(DataConfig(dataset="idx"), tmp_path, torch.device("cpu"))
    counts = dict(zip(data.class_counts.classes, data.class_counts.counts))
    assert counts["0"] == (35, 8, 7) and sum(counts["2"]) == 3
    assert [w.split(" has ")[0] for w in data.class_counts.warnings] == ["class '2'"]
    assert data.class_counts.to_dict()["counts"]["2"]["validation"] == 0


def _write_pictures(root: Path, n: int = 12) -> None:
    from PIL import Image

    rng = np.random.default_rng(7)
    for k, name in enumerate(("cat", "dog", "owl")):
        (root / name).mkdir(parents=True)
        for i in range(n):
            size = (10 + i % 3, 9)  # mixed sizes: resized on load
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.{'png' if i % 2 else 'jpg'}")


def test_image_folder_is_decoded_once_then_loaded_from_its_cache(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HPSEARCH_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "pictures"
    _write_pictures(root)
    cfg = DataConfig(dataset="folder", image_size=(8, 6))
    first = load_pool(cfg, root)
    assert first.images.shape == (36, 3, 8, 6) and first.images.dtype == torch.uint8
    assert first.classes == ("cat", "dog", "owl") and first.labels.tolist() == [0] * 12 + [1] * 12 + [2] * 12
    cached = list((tmp_path / "cache" / "folders").glob("*.npz"))
    assert len(cached) == 1 and not list((tmp_path / "cache" / "folders").glob(".tmp-*"))
    # The next load reads the cache: same tensors, and the decoder is not called.
    import hpsearch.imagefolder as imagefolder

    monkeypatch.setattr(imagefolder, "decode_all", lambda *a: pytest.fail("decoded again"))
    again = load_pool(cfg, root)
    torch.testing.assert_close(again.images, first.images)
    monkeypatch.undo()
    # A changed file changes the key: decoded afresh, never a stale cache.
    monkeypatch.setenv("HPSEARCH_CACHE_DIR", str(tmp_path / "cache"))
    (root / "cat" / "0.jpg").write_bytes((root / "dog" / "0.jpg").read_bytes())
    load_pool(cfg, root)
    assert len(list((tmp_path / "cache" / "folders").glob("*.npz"))) == 2


def test_image_folder_problems_are_one_line_data_errors(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HPSEARCH_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "pictures"
    _write_pictures(root)
    with pytest.raises(DataError, match=r"set data.image_size = \[height, width\]"):
        load_pool(DataConfig(dataset="folder"), root)  # mixed sizes and no image_size
    (root / "owl" / "5.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="cannot decode .*5.png"):
        load_pool(DataConfig(dataset="folder", image_size=(8, 8)), root)
    lone = tmp_path / "lone"
    (lone / "only").mkdir(parents=True)
    (lone / "only" / "a.png").write_bytes((root / "cat" / "1.png").read_bytes())
    with pytest.raises(DataError, match="at least 2 classes"):
        load_pool(DataConfig(dataset="folder"), lone)

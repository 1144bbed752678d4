"""Data loading: IDX validation, splits, the embedded digits set and the shared MNIST copy."""

from __future__ import annotations

import gzip
import hashlib
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from fixedpoint import data as data_mod
from fixedpoint.data import (
    Dataset,
    DatasetError,
    default_mnist_dir,
    load_dataset,
    load_digits_dataset,
    load_mnist,
    read_idx,
)

SHARED_MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"
T10K_CLASS_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    array = np.asarray(array, dtype=np.uint8)
    if magic is None:
        magic = 0x800 | array.ndim
    return struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.tobytes()


def write_mnist(
    directory: Path,
    n: int = 30,
    prefix: str = "t10k",
    gz: bool = True,
    seed: int = 0,
    labels: np.ndarray | None = None,
    size: tuple[int, int] = (28, 28),
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, *size), dtype=np.uint8)
    if labels is None:
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    directory.mkdir(parents=True, exist_ok=True)
    files = ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels))
    for stem, arr in files:
        blob = idx_bytes(arr)
        if gz:
            (directory / (stem + ".gz")).write_bytes(gzip.compress(blob))
        else:
            (directory / stem).write_bytes(blob)
    return images, labels


# ------------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [True, False])
def test_good_files_parse_and_scale(tmp_path: Path, gz: bool) -> None:
    images, labels = write_mnist(tmp_path, n=30, gz=gz)
    ds = load_mnist(tmp_path, holdout=10)
    assert isinstance(ds, Dataset) and ds.name == "mnist"
    assert ds.train_x.shape == (20, 1, 28, 28) and ds.test_x.shape == (10, 1, 28, 28)
    assert ds.train_x.dtype == torch.float32 and ds.train_y.dtype == torch.int64
    # Every image appears exactly once across the split, scaled by x / 127.5 - 1.
    all_x = torch.cat([ds.train_x, ds.test_x])
    all_y = torch.cat([ds.train_y, ds.test_y])
    expected = torch.from_numpy(images.astype(np.float32)) / 127.5 - 1
    order = [int(np.argmin([(e - a[0]).abs().sum() for e in expected])) for a in all_x]
    assert sorted(order) == list(range(30))
    assert torch.equal(all_x[:, 0], expected[order])
    assert torch.equal(all_y, torch.from_numpy(labels.astype(np.int64))[order])
    assert all_x.min() >= -1 and all_x.max() <= 1
    assert ds.provenance["split_seed"] == 0
    assert set(ds.provenance["md5"]) == {
        f"t10k-images-idx3-ubyte{'.gz' if gz else ''}",
        f"t10k-labels-idx1-ubyte{'.gz' if gz else ''}",
    }


def test_split_is_deterministic(tmp_path: Path) -> None:
    write_mnist(tmp_path, n=40)
    a, b = load_mnist(tmp_path, holdout=10), load_mnist(tmp_path, holdout=10)
    assert torch.equal(a.test_x, b.test_x) and torch.equal(a.train_y, b.train_y)
    c = load_mnist(tmp_path, holdout=10, seed=1)
    assert not torch.equal(a.test_x, c.test_x)


def test_official_split_when_train_files_exist(tmp_path: Path) -> None:
    write_mnist(tmp_path, n=12, prefix="t10k", seed=1)
    train_images, _ = write_mnist(tmp_path, n=25, prefix="train", gz=False, seed=2)
    ds = load_mnist(tmp_path)
    assert len(ds.train_x) == 25 and len(ds.test_x) == 12
    first = torch.from_numpy(train_images[0].astype(np.float32)) / 127.5 - 1
    assert torch.equal(ds.train_x[0, 0], first)
    assert ds.provenance["split"] == "official train/t10k"


def test_torchvision_root_is_accepted(tmp_path: Path) -> None:
    write_mnist(tmp_path / "MNIST" / "raw", n=20)
    assert len(load_mnist(tmp_path, holdout=5).test_x) == 5


def test_truncated_gzip(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    f = tmp_path / "t10k-images-idx3-ubyte.gz"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(DatasetError, match=r"t10k-images-idx3-ubyte\.gz.*(gzip|truncated)"):
        load_mnist(tmp_path, holdout=10)


def test_truncated_raw_file(tmp_path: Path) -> None:
    write_mnist(tmp_path, gz=False)
    f = tmp_path / "t10k-images-idx3-ubyte"
    f.write_bytes(f.read_bytes()[:-1])
    message = r"t10k-images-idx3-ubyte: header says 30 images.*truncated"
    with pytest.raises(DatasetError, match=message):
        load_mnist(tmp_path, holdout=10)


def test_short_header(tmp_path: Path) -> None:
    f = tmp_path / "x"
    f.write_bytes(b"\x00\x00\x08")
    with pytest.raises(DatasetError, match="too short"):
        read_idx(f, "images")


def test_wrong_magic(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    labels = np.zeros(30, dtype=np.uint8)
    # An images file where the labels file should be: the magic says 3-d.
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(idx_bytes(labels, magic=0x803))
    )
    message = r"t10k-labels-idx1-ubyte\.gz: wrong magic number 0x00000803"
    with pytest.raises(DatasetError, match=message):
        load_mnist(tmp_path, holdout=10)


def test_count_mismatch(tmp_path: Path) -> None:
    write_mnist(tmp_path, n=30)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(idx_bytes(np.zeros(29, dtype=np.uint8)))
    )
    with pytest.raises(DatasetError, match="30 images but t10k-labels-idx1-ubyte.gz has 29 labels"):
        load_mnist(tmp_path, holdout=10)


def test_label_out_of_range(tmp_path: Path) -> None:
    write_mnist(tmp_path, labels=np.full(30, 10, dtype=np.uint8))
    with pytest.raises(DatasetError, match="label 10 outside 0..9"):
        load_mnist(tmp_path, holdout=10)


def test_wrong_image_size(tmp_path: Path) -> None:
    write_mnist(tmp_path, size=(27, 28))
    with pytest.raises(DatasetError, match="MNIST is 28x28"):
        load_mnist(tmp_path, holdout=10)


def test_missing_directory_and_files(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        load_mnist(tmp_path / "nope")
    write_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetError, match=r"missing MNIST file t10k-labels-idx1-ubyte\[\.gz\]"):
        load_mnist(tmp_path, holdout=10)


def test_holdout_larger_than_data(tmp_path: Path) -> None:
    write_mnist(tmp_path, n=5)
    with pytest.raises(DatasetError, match="cannot hold out"):
        load_mnist(tmp_path)  # default holdout 2000 > 5 images


def test_default_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FIXEDPOINT_MNIST_DIR", str(tmp_path))
    assert default_mnist_dir() == tmp_path
    monkeypatch.delenv("FIXEDPOINT_MNIST_DIR")
    monkeypatch.setattr(data_mod, "_REPO_ROOT", tmp_path / "repo")
    with pytest.raises(DatasetError, match="--data-dir.*torchvision"):
        default_mnist_dir()
    (tmp_path / "shared" / "data" / "mnist").mkdir(parents=True)
    assert default_mnist_dir() == tmp_path / "shared" / "data" / "mnist"


def test_dataset_error_is_value_error() -> None:
    assert issubclass(DatasetError, ValueError)


# ---------------------------------------------------------------------------- digits


def test_digits_shapes_range_and_split() -> None:
    ds = load_digits_dataset()
    assert ds.train_x.shape == (1497, 1, 8, 8) and ds.test_x.shape == (300, 1, 8, 8)
    assert ds.image_size == 8 and ds.channels == 1
    x = torch.cat([ds.train_x, ds.test_x])
    assert x.min() == -1.0 and x.max() == 1.0
    # 0..16 mapped to multiples of 1/8.
    assert torch.equal(x * 8, (x * 8).round())
    assert set(torch.cat([ds.train_y, ds.test_y]).tolist()) == set(range(10))
    again = load_digits_dataset()
    assert torch.equal(ds.test_x, again.test_x) and torch.equal(ds.train_y, again.train_y)
    assert ds.provenance["split_seed"] == 0


def test_load_dataset_dispatch(tmp_path: Path) -> None:
    assert load_dataset("digits").name == "digits"
    with pytest.raises(DatasetError, match="unknown data set 'cifar'"):
        load_dataset("cifar")
    with pytest.raises(DatasetError, match="embedded"):
        load_dataset("digits", tmp_path)
    write_mnist(tmp_path, n=2100)
    assert load_dataset("MNIST", tmp_path).test_x.shape == (2000, 1, 28, 28)


# ---------------------------------------------------------------------- shared MNIST


@pytest.mark.skipif(not SHARED_MNIST.is_dir(), reason="shared MNIST copy not present")
def test_shared_mnist() -> None:
    labels = read_idx(SHARED_MNIST / "t10k-labels-idx1-ubyte.gz", "labels")
    assert np.bincount(labels, minlength=10).tolist() == T10K_CLASS_COUNTS
    ds = load_mnist(SHARED_MNIST)
    assert ds.train_x.shape == (8000, 1, 28, 28) and ds.test_x.shape == (2000, 1, 28, 28)
    assert torch.bincount(torch.cat([ds.train_y, ds.test_y])).tolist() == T10K_CLASS_COUNTS
    assert ds.train_x.min() == -1.0 and ds.train_x.max() == 1.0
    md5 = hashlib.md5((SHARED_MNIST / "t10k-images-idx3-ubyte.gz").read_bytes()).hexdigest()
    assert ds.provenance["md5"]["t10k-images-idx3-ubyte.gz"] == md5

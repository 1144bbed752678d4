"""Image data sets for training and evaluating TarFlow.

Two sources, both returned as a :class:`Dataset` of float32 images in ``[-1, 1]`` with
shape ``(N, 1, H, W)`` and int64 labels:

* ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 images, no download,
  always available).  This is the embedded default; it never touches the network or the
  MNIST folder.
* ``mnist``: 28x28 MNIST read from the standard IDX files (the ones torchvision keeps
  under ``MNIST/raw``), gzip-compressed or not.

Splits are deterministic and recorded in :attr:`Dataset.provenance`:

* digits: a seeded random permutation (seed :data:`SPLIT_SEED`); the last
  :data:`DIGITS_TEST_SIZE` = 300 images of it are the test set, the other 1,497 train.
* mnist with ``train-*`` files present: the official 60,000 / 10,000 split.
* mnist with only the ``t10k-*`` files (the shared copy): a seeded random permutation of the
  10,000 test images; its last :data:`MNIST_HOLDOUT` = 2,000 are the test set, the other
  8,000 train.  The permutation is random rather than "the last 2,000 in file order"
  because the t10k file is not exchangeable: its first 5,000 images come from the cleaner
  SD-3 writers and the last 5,000 from SD-1 students, so a file-order tail would test on
  a harder distribution than the model was trained on.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DATASETS",
    "DIGITS_TEST_SIZE",
    "MNIST_HOLDOUT",
    "SPLIT_SEED",
    "Dataset",
    "DatasetError",
    "default_mnist_dir",
    "load_dataset",
    "load_digits_dataset",
    "load_mnist",
    "read_idx",
]

SPLIT_SEED = 0
DIGITS_TEST_SIZE = 300
MNIST_HOLDOUT = 2000
DATASETS = ("digits", "mnist")

# IDX magic numbers: two zero bytes, a type code (0x08 = unsigned byte) and the number of
# dimensions.  Only unsigned-byte data is valid for MNIST.
_IMAGES_MAGIC = 0x00000803
_LABELS_MAGIC = 0x00000801

_REPO_ROOT = Path(__file__).resolve().parents[1]
MNIST_ENV = "FIXEDPOINT_MNIST_DIR"


class DatasetError(ValueError):
    """A data set is missing, unreadable or malformed.  The message names the file."""


@dataclass(frozen=True)
class Dataset:
    """Train and test images in ``[-1, 1]`` with their labels.

    ``train_x``/``test_x`` are float32 ``(N, C, H, W)``; ``train_y``/``test_y`` are int64
    ``(N,)`` in ``0..num_classes-1``.  ``provenance`` is a plain JSON-able dict (source,
    file md5s, split rule and seed) that training copies into checkpoints.
    """

    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    provenance: dict[str, Any] = field(default_factory=dict)
    num_classes: int = 10

    @property
    def image_size(self) -> int:
        return int(self.train_x.shape[-1])

    @property
    def channels(self) -> int:
        return int(self.train_x.shape[1])

    def __repr__(self) -> str:
        return (
            f"Dataset({self.name!r}, train={tuple(self.train_x.shape)}, "
            f"test={tuple(self.test_x.shape)})"
        )


def _split(n: int, holdout: int, seed: int) -> tuple[Tensor, Tensor]:
    """Indices (train, test) of a seeded random permutation; the last ``holdout`` test.

    torch's generator is used (not numpy's global state) so the split is identical on every
    platform and unaffected by whatever else seeded the global RNGs.
    """
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[: n - holdout], perm[n - holdout :]


def load_digits_dataset(seed: int = SPLIT_SEED, test_size: int = DIGITS_TEST_SIZE) -> Dataset:
    """scikit-learn's 8x8 digits, pixel values 0..16 mapped linearly to ``[-1, 1]``."""
    from sklearn.datasets import load_digits  # local import: sklearn is slow to import

    bunch = load_digits()
    x = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32)) / 8.0 - 1.0
    y = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    x = x.unsqueeze(1).contiguous()
    train, test = _split(len(x), test_size, seed)
    provenance = {
        "dataset": "digits",
        "source": "sklearn.datasets.load_digits",
        "split": f"seeded random permutation, last {test_size} test",
        "split_seed": seed,
        "md5": {"images": hashlib.md5(x.numpy().tobytes()).hexdigest()},
    }
    return Dataset("digits", x[train], y[train], x[test], y[test], provenance)


# ---------------------------------------------------------------------------- MNIST


def _read_bytes(path: Path) -> bytes:
    """File contents, transparently gunzipped; corrupt/truncated gzip -> DatasetError."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read: {exc.strerror or exc}") from None
    # Decide by content, not by name: torchvision's raw folder holds both forms, and a
    # user may have renamed a file.
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as exc:
            raise DatasetError(f"{path}: corrupt or truncated gzip data ({exc})") from None
    return raw


def read_idx(path: str | os.PathLike[str], kind: str) -> np.ndarray:
    """Parse one IDX file of unsigned bytes.

    ``kind`` is ``"images"`` (3-d, magic 0x803) or ``"labels"`` (1-d, magic 0x801).
    Validates the magic number, the header and that the payload size matches it exactly.
    """
    path = Path(path)
    expected_magic = {"images": _IMAGES_MAGIC, "labels": _LABELS_MAGIC}[kind]
    ndim = expected_magic & 0xFF
    data = _read_bytes(path)
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{path}: file too short for an IDX header ({len(data)} bytes)")
    magic = struct.unpack(">I", data[:4])[0]
    if magic != expected_magic:
        raise DatasetError(
            f"{path}: wrong magic number 0x{magic:08x}, expected 0x{expected_magic:08x} "
            f"(IDX {kind} of unsigned bytes)"
        )
    dims = struct.unpack(f">{ndim}I", data[4:header])
    if kind == "images" and (dims[1] == 0 or dims[2] == 0):
        raise DatasetError(f"{path}: invalid image dimensions {dims[1]}x{dims[2]}")
    size = int(np.prod(dims, dtype=np.int64))
    if len(data) - header != size:
        raise DatasetError(
            f"{path}: header says {dims[0]} {kind} of shape {tuple(dims[1:])} = {size} bytes "
            f"but the file holds {len(data) - header} bytes (truncated or corrupt)"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _find(directory: Path, stem: str) -> Path | None:
    # Prefer the uncompressed file when both exist (torchvision keeps both): no gunzip.
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def _load_pair(directory: Path, prefix: str) -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
    img_path = _find(directory, f"{prefix}-images-idx3-ubyte")
    lab_path = _find(directory, f"{prefix}-labels-idx1-ubyte")
    if img_path is None or lab_path is None:
        missing = f"{prefix}-{'images-idx3' if img_path is None else 'labels-idx1'}-ubyte[.gz]"
        raise DatasetError(f"{directory}: missing MNIST file {missing}")
    images = read_idx(img_path, "images")
    labels = read_idx(lab_path, "labels")
    if images.shape[0] != labels.shape[0]:
        raise DatasetError(
            f"{img_path}: {images.shape[0]} images but {lab_path.name} has "
            f"{labels.shape[0]} labels"
        )
    if images.shape[1:] != (28, 28):
        raise DatasetError(f"{img_path}: images are {images.shape[1:]}, MNIST is 28x28")
    if labels.size and int(labels.max()) > 9:
        raise DatasetError(f"{lab_path}: label {int(labels.max())} outside 0..9")
    md5 = {
        p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in (img_path, lab_path)
    }
    return images, labels, md5


def default_mnist_dir() -> Path:
    """``$FIXEDPOINT_MNIST_DIR``, else ``<repo>/../shared/data/mnist`` if it exists."""
    env = os.environ.get(MNIST_ENV)
    if env:
        return Path(env).expanduser()
    shared = _REPO_ROOT.parent / "shared" / "data" / "mnist"
    if shared.is_dir():
        return shared
    raise DatasetError(
        f"no MNIST directory given: pass --data-dir (or set {MNIST_ENV}) to a folder holding "
        "t10k-images-idx3-ubyte[.gz] and t10k-labels-idx1-ubyte[.gz], for example the "
        "MNIST/raw folder of a torchvision download"
    )


def _to_unit(images: np.ndarray) -> Tensor:
    # 0..255 -> [-1, 1]; float32 copy (frombuffer arrays are read-only).
    x = torch.from_numpy(images.astype(np.float32)) / 127.5 - 1.0
    return x.unsqueeze(1).contiguous()


def load_mnist(
    directory: str | os.PathLike[str] | None = None,
    seed: int = SPLIT_SEED,
    holdout: int = MNIST_HOLDOUT,
) -> Dataset:
    """MNIST from IDX files in ``directory`` (see the module docstring for the split)."""
    directory = default_mnist_dir() if directory is None else Path(directory).expanduser()
    if not directory.is_dir():
        raise DatasetError(f"{directory}: MNIST directory does not exist")
    # Accept the torchvision root as well as its MNIST/raw folder.
    if _find(directory, "t10k-images-idx3-ubyte") is None:
        raw = directory / "MNIST" / "raw"
        if raw.is_dir():
            directory = raw
    test_images, test_labels, md5 = _load_pair(directory, "t10k")
    has_train = _find(directory, "train-images-idx3-ubyte") is not None or (
        _find(directory, "train-labels-idx1-ubyte") is not None
    )
    provenance: dict[str, Any] = {"dataset": "mnist", "source": str(directory.resolve())}
    if has_train:
        train_images, train_labels, md5_train = _load_pair(directory, "train")
        md5.update(md5_train)
        train_x, train_y = _to_unit(train_images), torch.from_numpy(train_labels.astype(np.int64))
        test_x, test_y = _to_unit(test_images), torch.from_numpy(test_labels.astype(np.int64))
        provenance.update(split="official train/t10k", split_seed=None)
    else:
        if not 0 < holdout < len(test_images):
            raise DatasetError(
                f"{directory}: cannot hold out {holdout} of {len(test_images)} images"
            )
        x, y = _to_unit(test_images), torch.from_numpy(test_labels.astype(np.int64))
        train, test = _split(len(x), holdout, seed)
        train_x, train_y, test_x, test_y = x[train], y[train], x[test], y[test]
        provenance.update(
            split=f"t10k only: seeded random permutation, last {holdout} test",
            split_seed=seed,
        )
    provenance["md5"] = md5
    return Dataset("mnist", train_x, train_y, test_x, test_y, provenance)


def load_dataset(name: str, directory: str | os.PathLike[str] | None = None) -> Dataset:
    """``'digits'`` (embedded) or ``'mnist'`` (IDX files in ``directory``)."""
    key = name.lower()
    if key == "digits":
        if directory is not None:
            raise DatasetError("the digits data set is embedded; a data directory does not apply")
        return load_digits_dataset()
    if key == "mnist":
        return load_mnist(directory)
    raise DatasetError(f"unknown data set {name!r}; choose one of: {', '.join(DATASETS)}")

"""Offline sample-quality measures: a Fréchet *classifier* distance and conditional accuracy.

The paper scores samples with FID, the Fréchet distance between Gaussians fitted to
Inception-v3 features of generated and real images.  No Inception network can be
downloaded here, so this module substitutes a small CNN trained on the data set itself
(sklearn digits 8x8 or MNIST 28x28) and measures the Fréchet distance in the space of its
penultimate-layer activations.  We call that number the **Fréchet classifier distance
(FCD)**.  It is *not* FID and its values are not comparable with FID values in the paper
or with FCDs computed with any other classifier, data set, sample size or seed; only
comparisons made with the same :class:`QualityMeter` and the same number of samples mean
anything.  The intended use is relative: "does method X change sample quality compared
with sequential sampling from the same model?", read against the metric's own noise (the
FCD between two sequential runs with different seeds, see :func:`frechet_noise_floor`).

Pieces:

* :class:`FeatureClassifier`: two 3x3 conv layers, each followed by ReLU and 2x2 max
  pooling, a 64-unit fully connected feature layer (ReLU) and a linear 10-way head.
* :func:`train_classifier`: deterministic training on the *clean* training images
  (no noise augmentation), test accuracy on the held-out test images, optional on-disk
  cache keyed by a hash of every setting that affects the weights.
* :func:`frechet_distance`: the Fréchet (2-Wasserstein) distance between the Gaussians
  fitted to two feature sets.
* :class:`QualityMeter`: the classifier plus reference statistics of the data set's
  *test* images; ``frechet(images)`` is the FCD, ``accuracy(images, labels)`` the fraction
  of class-conditional samples that the classifier assigns to their conditioning class.
* :func:`deviation`: max / mean absolute pixel difference between two image batches
  (a method's samples against sequential samples from the same noise).

Caveats worth repeating where the numbers are reported:

* The Fréchet distance of finite samples is biased upwards, and the bias depends on the
  number of samples; always compare FCDs computed from the same number of images.
* The classifier never saw noisy or out-of-range images, so it can map artefacts in
  unusual ways; FCD is a proxy, the deviation from sequential samples the direct check.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
import warnings
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fixedpoint.data import Dataset

from .atomic import atomic_torch_save

__all__ = [
    "CACHE_FORMAT",
    "CACHE_FORMAT_VERSION",
    "DEFAULT_EPOCHS",
    "ClassifierCacheError",
    "FeatureClassifier",
    "QualityMeter",
    "TrainedClassifier",
    "cache_path",
    "classifier_settings",
    "deviation",
    "feature_statistics",
    "frechet_distance",
    "frechet_distance_from_statistics",
    "frechet_noise_floor",
    "load_classifier",
    "train_classifier",
]

CACHE_FORMAT = "fixedpoint.quality.classifier"
CACHE_FORMAT_VERSION = 1

# Epochs chosen so that training stays well under a minute (digits) / about a minute or
# two (MNIST, 8,000 training images) on two shared CPU cores; accuracy has plateaued by
# then (see train_classifier).
DEFAULT_EPOCHS = {"digits": 40, "mnist": 8}
_DEFAULT_EPOCHS_OTHER = 10

# Diagonal offset used when the plain matrix square root of the covariance product is
# not trustworthy (see frechet_distance).  1e-6 is the customary value in FID code.
FRECHET_EPS = 1e-6
# sqrtm results whose relative residual ||X X - A||_F / ||A||_F exceeds this are
# recomputed with the diagonal offset.
_SQRTM_RESIDUAL_TOL = 1e-5
# Imaginary parts on the diagonal of sqrtm's result larger than this are not rounding
# noise but a sign of an invalid covariance; the customary FID threshold.
_IMAG_TOL = 1e-3


class ClassifierCacheError(ValueError):
    """A cached classifier file is unreadable, of another format or does not fit."""


# ------------------------------------------------------------------------- classifier


class FeatureClassifier(nn.Module):
    """Small CNN for 1-channel square images whose side is a multiple of 4 (8, 28, ...).

    conv3x3(1->w1) -> ReLU -> maxpool2 -> conv3x3(w1->w2) -> ReLU -> maxpool2 -> flatten
    -> linear(feature_dim) -> ReLU -> [features] -> linear(num_classes).

    :meth:`features` returns the post-ReLU activations of the ``feature_dim`` layer (the
    input of the head), which is what the Fréchet classifier distance is computed on.
    Some of these units never fire on real data (about a third with the default training:
    21/64 on the digits test set, 29/64 on MNIST's); they add zero rows to the reference
    covariance, which the Fréchet computation handles, and they still respond to samples
    that drive the network somewhere real data does not.
    """

    def __init__(
        self,
        image_size: int = 8,
        channels: int = 1,
        widths: Sequence[int] = (16, 32),
        feature_dim: int = 64,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        if image_size < 4 or image_size % 4:
            raise ValueError(
                f"image_size must be a positive multiple of 4 (two 2x2 poolings), got {image_size}"
            )
        if len(widths) != 2 or min(widths) < 1:
            raise ValueError(f"widths must be two positive channel counts, got {widths}")
        w1, w2 = int(widths[0]), int(widths[1])
        # Kept as plain data so that a cached model can be rebuilt without pickling.
        self.config: dict[str, Any] = {
            "image_size": int(image_size),
            "channels": int(channels),
            "widths": [w1, w2],
            "feature_dim": int(feature_dim),
            "num_classes": int(num_classes),
        }
        self.conv1 = nn.Conv2d(channels, w1, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(w1, w2, kernel_size=3, padding=1)
        side = image_size // 4
        self.fc = nn.Linear(w2 * side * side, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    @property
    def feature_dim(self) -> int:
        return int(self.config["feature_dim"])

    def _check_input(self, x: Tensor) -> None:
        c, s = self.config["channels"], self.config["image_size"]
        if x.dim() != 4 or tuple(x.shape[1:]) != (c, s, s):
            raise ValueError(f"expected images of shape (N, {c}, {s}, {s}), got {tuple(x.shape)}")

    def features(self, x: Tensor) -> Tensor:
        """Penultimate activations ``(N, feature_dim)`` of images ``(N, C, H, W)``."""
        self._check_input(x)
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        return F.relu(self.fc(h.flatten(1)))

    def forward(self, x: Tensor) -> Tensor:
        """Class logits ``(N, num_classes)``."""
        return self.head(self.features(x))


@dataclass
class TrainedClassifier:
    """A trained :class:`FeatureClassifier` (eval mode), its test accuracy and provenance.

    ``provenance`` is plain JSON-able data: data set provenance, every training setting,
    their hash, the training time and whether the weights came from the cache.
    """

    model: FeatureClassifier
    test_accuracy: float
    provenance: dict[str, Any] = field(default_factory=dict)


def _batched(fn: Callable[[Tensor], Tensor], x: Tensor, batch_size: int) -> Tensor:
    return torch.cat([fn(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


@torch.inference_mode()
def _accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1000) -> float:
    was_training = model.training
    model.eval()
    try:
        pred = _batched(lambda b: model(b).argmax(1), x.float(), batch_size)
    finally:
        model.train(was_training)
    return float((pred == y).double().mean())


def classifier_settings(
    dataset: Dataset,
    *,
    seed: int = 0,
    epochs: int | None = None,
    batch_size: int = 64,
    lr: float = 2e-3,
    weight_decay: float = 1e-4,
    widths: Sequence[int] = (16, 32),
    feature_dim: int = 64,
) -> dict[str, Any]:
    """Every setting that determines the trained weights, as plain data.

    The cache file name carries a hash of this dict, so changing any of it (or the data:
    the data set's md5s and split are included) selects a different cache file.
    """
    if epochs is None:
        epochs = DEFAULT_EPOCHS.get(dataset.name, _DEFAULT_EPOCHS_OTHER)
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    prov = dataset.provenance
    return {
        "cache_format_version": CACHE_FORMAT_VERSION,
        "dataset": dataset.name,
        # Only the parts of the provenance that identify the data: the source path of a
        # copied MNIST folder must not change the hash.
        "data": {k: prov.get(k) for k in ("md5", "split", "split_seed")},
        "train_size": int(len(dataset.train_x)),
        "test_size": int(len(dataset.test_x)),
        "model": {
            "image_size": dataset.image_size,
            "channels": dataset.channels,
            "widths": [int(w) for w in widths],
            "feature_dim": int(feature_dim),
            "num_classes": int(dataset.num_classes),
        },
        "seed": int(seed),
        "epochs": int(epochs),
        "batch_size": int(batch_size),
        "optimizer": {"name": "adamw", "lr": float(lr), "weight_decay": float(weight_decay)},
        "schedule": "cosine to 0 over all steps",
    }


def _settings_hash(settings: dict[str, Any]) -> str:
    blob = json.dumps(settings, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def cache_path(cache_dir: str | os.PathLike[str], settings: dict[str, Any]) -> Path:
    """``cache_dir/classifier-<dataset>-<hash of settings>.pt``."""
    return Path(cache_dir) / f"classifier-{settings['dataset']}-{_settings_hash(settings)}.pt"


def _fit(
    dataset: Dataset, settings: dict[str, Any], progress: bool
) -> tuple[FeatureClassifier, list[dict[str, float]]]:
    """Train from scratch; deterministic for given settings (and torch build/threads)."""
    seed = settings["seed"]
    # fork_rng: initialisation must not depend on, nor disturb, the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FeatureClassifier(**settings["model"])
    # A private generator for the shuffling, so the batch order is a function of the seed.
    gen = torch.Generator().manual_seed(seed + 1)
    x, y = dataset.train_x.float(), dataset.train_y
    n, bs, epochs = len(x), settings["batch_size"], settings["epochs"]
    steps_per_epoch = (n + bs - 1) // bs
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=settings["optimizer"]["lr"],
        weight_decay=settings["optimizer"]["weight_decay"],
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    history: list[dict[str, float]] = []
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=gen)
        total = 0.0
        for i in range(0, n, bs):
            idx = perm[i : i + bs]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        record = {"epoch": epoch + 1, "train_loss": total / n}
        history.append(record)
        if progress:
            acc = _accuracy(model, dataset.test_x, dataset.test_y)
            print(
                f"classifier[{dataset.name}] epoch {epoch + 1}/{epochs} "
                f"loss {record['train_loss']:.4f} test acc {acc:.4f}",
                file=sys.stderr,
                flush=True,
            )
    return model.eval(), history


@contextlib.contextmanager
def _num_threads(threads: int | None) -> Iterator[None]:
    """Temporarily set torch's intra-op thread count (process-wide, hence restored)."""
    if threads is None:
        yield
        return
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _short(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def load_classifier(
    path: str | os.PathLike[str], dataset: Dataset, settings: dict[str, Any]
) -> TrainedClassifier:
    """Load and validate a cached classifier; :class:`ClassifierCacheError` if unusable.

    Checks: readable weights-only torch file of this format and version, stored settings
    identical to ``settings``, weights that fit the architecture, and a test accuracy
    recomputed now that agrees with the stored one (catches silently damaged weights).
    """
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ClassifierCacheError(f"{path}: no such cache file") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise ClassifierCacheError(
            f"{path}: unreadable classifier cache (truncated or corrupt): {_short(exc)}"
        ) from None
    except Exception as exc:  # pickle.UnpicklingError for files that are not torch zips
        raise ClassifierCacheError(
            f"{path}: unreadable classifier cache (not a torch file?): {_short(exc)}"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != CACHE_FORMAT:
        raise ClassifierCacheError(f"{path}: not a fixedpoint classifier cache file")
    if payload.get("format_version") != CACHE_FORMAT_VERSION:
        raise ClassifierCacheError(
            f"{path}: cache format version {payload.get('format_version')!r}, this code "
            f"reads {CACHE_FORMAT_VERSION}"
        )
    if payload.get("settings") != settings:
        raise ClassifierCacheError(f"{path}: cached classifier was trained with other settings")
    state = payload.get("model")
    stored_acc = payload.get("test_accuracy")
    if not isinstance(state, dict) or not isinstance(stored_acc, float):
        raise ClassifierCacheError(f"{path}: model weights or test accuracy missing")
    with torch.random.fork_rng(devices=[]):
        model = FeatureClassifier(**settings["model"])
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, KeyError) as exc:
        raise ClassifierCacheError(
            f"{path}: weights do not fit the classifier: {_short(exc)}"
        ) from None
    model.eval()
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise ClassifierCacheError(f"{path}: weights contain NaN or infinity")
    acc = _accuracy(model, dataset.test_x, dataset.test_y)
    # Not exact equality: another thread count may round a borderline logit differently.
    if abs(acc - stored_acc) > 0.01:
        raise ClassifierCacheError(
            f"{path}: test accuracy is {acc:.4f} now but {stored_acc:.4f} when cached "
            "(weights damaged or test data changed)"
        )
    provenance = dict(payload.get("provenance") or {})
    provenance.update(loaded_from_cache=True, cache_path=str(path), test_accuracy=acc)
    return TrainedClassifier(model, acc, provenance)


def train_classifier(
    dataset: Dataset,
    *,
    seed: int = 0,
    epochs: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
    threads: int | None = 1,
    batch_size: int = 64,
    lr: float = 2e-3,
    weight_decay: float = 1e-4,
    widths: Sequence[int] = (16, 32),
    feature_dim: int = 64,
) -> TrainedClassifier:
    """Train (or load from ``cache_dir``) the feature classifier for ``dataset``.

    Training uses the clean training images only, AdamW with a cosine learning-rate
    decay, and is deterministic for a given seed: initialisation and shuffling use
    seeded RNGs inside ``fork_rng``, so the caller's global RNG state is untouched.
    ``epochs=None`` picks :data:`DEFAULT_EPOCHS` for the data set.

    ``threads`` sets torch's intra-op thread count while training (restored afterwards;
    ``None`` keeps the caller's).  The default 1 is deliberate: the network is too small
    to gain from more, and on two shared cores a second thread spin-waits for a busy core
    (measured 4-7x slower).  A fixed count also keeps the float rounding, hence the
    weights, independent of the caller's setting.

    With ``cache_dir`` the weights are stored atomically in
    ``cache_dir/classifier-<dataset>-<hash of settings>.pt`` and reused by later calls
    with the same settings and data.  A cache file that fails validation is reported with
    a :class:`RuntimeWarning` naming the problem and replaced by a freshly trained model.
    """
    settings = classifier_settings(
        dataset,
        seed=seed,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        widths=widths,
        feature_dim=feature_dim,
    )
    path = None if cache_dir is None else cache_path(cache_dir, settings)
    if path is not None and path.exists():
        try:
            return load_classifier(path, dataset, settings)
        except ClassifierCacheError as exc:
            warnings.warn(f"{exc}; retraining the classifier", RuntimeWarning, stacklevel=2)

    start = time.perf_counter()
    with _num_threads(threads):
        model, history = _fit(dataset, settings, progress)
    seconds = time.perf_counter() - start
    acc = _accuracy(model, dataset.test_x, dataset.test_y)
    provenance: dict[str, Any] = {
        "metric": "Frechet classifier distance (FCD); not FID",
        "data_provenance": dataset.provenance,
        "settings": settings,
        "settings_hash": _settings_hash(settings),
        "test_accuracy": acc,
        "final_train_loss": history[-1]["train_loss"],
        "train_seconds": round(seconds, 3),
        "torch_threads": threads if threads is not None else torch.get_num_threads(),
        "versions": {"torch": str(torch.__version__), "numpy": str(np.__version__)},
        "loaded_from_cache": False,
        "cache_path": None if path is None else str(path),
    }
    if path is not None:
        atomic_torch_save(
            {
                "format": CACHE_FORMAT,
                "format_version": CACHE_FORMAT_VERSION,
                "settings": settings,
                "model": model.state_dict(),
                "test_accuracy": acc,
                "provenance": provenance,
            },
            path,
        )
    return TrainedClassifier(model, acc, provenance)


# --------------------------------------------------------------------- Fréchet distance


def _as_float64(x: Tensor | np.ndarray) -> np.ndarray:
    arr = x.detach().cpu().double().numpy() if isinstance(x, Tensor) else np.asarray(x)
    return np.asarray(arr, dtype=np.float64)


def feature_statistics(feats: Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(F,)`` and unbiased covariance ``(F, F)`` of features ``(N, F)``, float64."""
    f = _as_float64(feats)
    if f.ndim != 2:
        raise ValueError(f"features must be a 2-d (N, F) array, got shape {f.shape}")
    if f.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {f.shape[0]}")
    if not np.isfinite(f).all():
        raise ValueError("features contain NaN or infinity")
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


def _sqrtm_product_trace(s1: np.ndarray, s2: np.ndarray, eps: float) -> float:
    """``tr sqrtm(s1 @ s2)`` for PSD ``s1``, ``s2``, following the customary FID recipe."""
    prod = s1 @ s2
    scale = np.linalg.norm(prod)
    if scale == 0.0:  # a zero covariance: the product and its root are exactly zero
        return 0.0

    def root(a: np.ndarray) -> tuple[np.ndarray, float]:
        with warnings.catch_warnings():
            # Singular input makes scipy warn; the residual check below decides instead.
            warnings.simplefilter("ignore", RuntimeWarning)
            r = scipy.linalg.sqrtm(a)
        r = np.asarray(r)
        if not np.isfinite(r).all():
            return r, np.inf
        return r, float(np.linalg.norm(r @ r - a) / np.linalg.norm(a))

    covmean, residual = root(prod)
    if residual > _SQRTM_RESIDUAL_TOL:
        # Singular (rank-deficient) covariances, e.g. fewer samples than feature
        # dimensions or ReLU units that never fire, can make the product defective, and
        # sqrtm then fails or is inaccurate.  Adding eps*I to both covariances makes them
        # positive definite; it changes the distance by O(eps * F).
        offset = eps * np.eye(s1.shape[0])
        covmean, residual = root((s1 + offset) @ (s2 + offset))
        if not np.isfinite(covmean).all():
            raise ValueError("matrix square root of the covariance product is not finite")
    if np.iscomplexobj(covmean):
        # The product of two PSD matrices has real non-negative eigenvalues, so its
        # principal root is real; imaginary parts are rounding noise from eigenvalues
        # that came out slightly negative.  Large ones mean invalid input.
        imag = float(np.max(np.abs(np.diagonal(covmean).imag)))
        if imag > _IMAG_TOL:
            raise ValueError(f"matrix square root has a large imaginary component ({imag:g})")
        covmean = covmean.real
    return float(np.trace(covmean))


def frechet_distance_from_statistics(
    mu1: np.ndarray,
    sigma1: np.ndarray,
    mu2: np.ndarray,
    sigma2: np.ndarray,
    eps: float = FRECHET_EPS,
) -> float:
    """``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2})``, in float64.

    The matrix square root is ``scipy.linalg.sqrtm`` of ``S1 @ S2``.  If it is not finite
    or its relative residual ``|X X - S1 S2|_F / |S1 S2|_F`` exceeds 1e-5 (singular
    covariances), it is recomputed for ``S1 + eps I`` and ``S2 + eps I``.  Imaginary parts
    (rounding noise) are discarded after checking that they are below 1e-3 on the
    diagonal.  The result is clipped at 0: rounding can make a zero distance come out as
    ``-1e-12``.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(
            f"statistics do not match: means {mu1.shape} / {mu2.shape}, covariances "
            f"{s1.shape} / {s2.shape}"
        )
    diff = mu1 - mu2
    tr_covmean = _sqrtm_product_trace(s1, s2, eps)
    value = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)
    return max(value, 0.0)


def frechet_distance(
    feats_a: Tensor | np.ndarray, feats_b: Tensor | np.ndarray, eps: float = FRECHET_EPS
) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``(N_a, F)``, ``(N_b, F)``.

    Means and unbiased covariances are computed in float64; see
    :func:`frechet_distance_from_statistics` for the square-root handling.  Symmetric in
    its arguments and invariant under a common translation; it is a *squared* distance
    (translating one set by ``v`` adds ``|v|^2``).
    """
    mu1, s1 = feature_statistics(feats_a)
    mu2, s2 = feature_statistics(feats_b)
    if mu1.shape != mu2.shape:
        raise ValueError(f"feature dimensions differ: {mu1.shape[0]} vs {mu2.shape[0]}")
    return frechet_distance_from_statistics(mu1, s1, mu2, s2, eps)


# -------------------------------------------------------------------------- the meter


def _check_images(images: Tensor, what: str = "images") -> Tensor:
    if not isinstance(images, Tensor):
        images = torch.as_tensor(np.asarray(images))
    if not torch.isfinite(images).all():
        bad = int((~torch.isfinite(images)).flatten(1).any(1).sum())
        raise ValueError(
            f"{what}: {bad} of {len(images)} images contain NaN or infinity (a diverged "
            "sampler?); the classifier cannot score them"
        )
    return images


class QualityMeter:
    """Fréchet classifier distance (FCD) and conditional accuracy of generated images.

    Holds a trained :class:`FeatureClassifier` and the mean and covariance of its
    features on the data set's **test** images (the reference, standing in for FID's
    real-image statistics).  FCD is **not** FID: it uses a small classifier trained on the
    data set instead of Inception-v3, so its values are only comparable between calls of
    the same meter with the same number of images.

    ``clamp=True`` clips images to ``[-1, 1]`` before scoring, as saving them as 8-bit
    images (what FID pipelines do) would; non-finite images raise ``ValueError``.
    """

    def __init__(
        self,
        classifier: TrainedClassifier | FeatureClassifier,
        dataset: Dataset,
        *,
        clamp: bool = True,
        batch_size: int = 1000,
    ) -> None:
        if isinstance(classifier, TrainedClassifier):
            self.model = classifier.model
            self.provenance: dict[str, Any] = dict(classifier.provenance)
        else:
            self.model = classifier
            self.provenance = {}
        self.model.eval()
        self.dataset_name = dataset.name
        self.clamp = clamp
        self.batch_size = batch_size
        ref = self.features(dataset.test_x)
        self.reference_mean, self.reference_cov = feature_statistics(ref)
        self.reference_size = len(ref)
        self.test_accuracy = _accuracy(self.model, dataset.test_x, dataset.test_y)

    @classmethod
    def for_dataset(
        cls,
        dataset: Dataset,
        *,
        seed: int = 0,
        cache_dir: str | os.PathLike[str] | None = None,
        progress: bool = False,
        **kwargs: Any,
    ) -> QualityMeter:
        """Train (or load from the cache) the classifier and build the meter."""
        trained = train_classifier(
            dataset, seed=seed, cache_dir=cache_dir, progress=progress, **kwargs
        )
        return cls(trained, dataset)

    def _prepare(self, images: Tensor) -> Tensor:
        images = _check_images(images).float()
        return images.clamp(-1.0, 1.0) if self.clamp else images

    @torch.inference_mode()
    def features(self, images: Tensor) -> Tensor:
        """Classifier features ``(N, F)`` of images ``(N, 1, H, W)`` in ``[-1, 1]``."""
        return _batched(self.model.features, self._prepare(images), self.batch_size)

    @torch.inference_mode()
    def predict(self, images: Tensor) -> Tensor:
        """Predicted class ``(N,)`` of each image."""
        return _batched(lambda b: self.model(b).argmax(1), self._prepare(images), self.batch_size)

    def frechet(self, images: Tensor) -> float:
        """FCD between ``images`` and the data set's test images (lower is better).

        Fréchet classifier distance, not FID.  Biased upwards for small ``N``; compare
        only values computed from the same number of images.
        """
        mu, sigma = feature_statistics(self.features(images))
        return frechet_distance_from_statistics(mu, sigma, self.reference_mean, self.reference_cov)

    def accuracy(self, images: Tensor, labels: Tensor | Sequence[int]) -> float:
        """Fraction of images classified as the class they were conditioned on."""
        labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        if len(labels) != len(images):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        if len(labels) == 0:
            raise ValueError("no images to score")
        return float((self.predict(images) == labels).double().mean())

    def __repr__(self) -> str:
        return (
            f"QualityMeter({self.dataset_name!r}, reference={self.reference_size} test "
            f"images, classifier test accuracy {self.test_accuracy:.4f})"
        )


def frechet_noise_floor(meter: QualityMeter, images_a: Tensor, images_b: Tensor) -> float:
    """FCD between two sample sets in the meter's feature space (not against the data).

    Given two sequential-sampling runs with different seeds this is the metric's own
    noise: FCD differences between methods smaller than it are not meaningful.
    """
    return frechet_distance(meter.features(images_a), meter.features(images_b))


def deviation(a: Tensor, b: Tensor) -> dict[str, float]:
    """Pixelwise deviation between two image batches of the same shape, in float64.

    Returns ``max_abs`` (largest absolute pixel difference anywhere) and ``mean_abs``
    (mean absolute difference over all pixels).  Non-finite pixels propagate (a NaN in
    either batch gives NaN), so divergence is not hidden.
    """
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.numel() == 0:
        raise ValueError("empty image batches")
    d = (a.double() - b.double()).abs()
    return {"max_abs": float(d.max()), "mean_abs": float(d.mean())}

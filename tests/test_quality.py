"""Quality measures: Fréchet distance maths, the feature classifier, its cache, the meter."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fixedpoint.data import Dataset, load_dataset
from fixedpoint.quality import (
    ClassifierCacheError,
    FeatureClassifier,
    QualityMeter,
    TrainedClassifier,
    cache_path,
    classifier_settings,
    deviation,
    feature_statistics,
    frechet_distance,
    frechet_distance_from_statistics,
    frechet_noise_floor,
    load_classifier,
    train_classifier,
)

# Measured with the default settings (seed 0, 40 epochs): 0.9833 on the 300 test digits.
# The bound leaves room for a different torch build rounding differently.
DIGITS_MIN_ACCURACY = 0.95


def exact_gaussian_sample(mean: np.ndarray, cov: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` points whose sample mean and unbiased sample covariance are exactly given."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, len(mean)))
    z -= z.mean(axis=0)
    # Whiten so the sample covariance is exactly I, then colour with cov's Cholesky factor.
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T
    return mean + z @ np.linalg.cholesky(cov).T


def frechet_reference(mu1, s1, mu2, s2) -> float:
    """Closed form via the symmetric matrix ``S1^{1/2} S2 S1^{1/2}`` (eigh only)."""
    w, v = np.linalg.eigh(s1)
    r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(r1 @ s2 @ r1)
    tr = np.sqrt(np.clip(inner, 0, None)).sum()
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr)


# ------------------------------------------------------------------ Fréchet distance


def test_frechet_self_is_zero() -> None:
    feats = np.random.default_rng(0).standard_normal((400, 16)) * 3 + 1
    assert frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-9)
    # Torch input (float32) is promoted to float64 and gives the same answer.
    t = torch.from_numpy(feats).float()
    assert frechet_distance(t, t) == pytest.approx(0.0, abs=1e-9)


@settings(max_examples=25, deadline=None)
@given(
    v=st.lists(st.floats(-50, 50, allow_nan=False), min_size=12, max_size=12),
    seed=st.integers(0, 2**16),
)
def test_frechet_translation_adds_squared_norm(v: list[float], seed: int) -> None:
    rng = np.random.default_rng(seed)
    feats = rng.standard_normal((200, 12)) @ rng.standard_normal((12, 12))
    shift = np.asarray(v)
    expected = float(shift @ shift)
    got = frechet_distance(feats, feats + shift)
    assert got == pytest.approx(expected, rel=1e-8, abs=1e-8)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_frechet_diagonal_closed_form(seed: int) -> None:
    rng = np.random.default_rng(seed)
    dim = 10
    a, b = rng.uniform(0.1, 5, dim), rng.uniform(0.1, 5, dim)
    mu_a, mu_b = rng.standard_normal(dim), rng.standard_normal(dim)
    fa = exact_gaussian_sample(mu_a, np.diag(a), 300, seed)
    fb = exact_gaussian_sample(mu_b, np.diag(b), 250, seed + 100)
    expected = float(np.sum((np.sqrt(a) - np.sqrt(b)) ** 2) + np.sum((mu_a - mu_b) ** 2))
    assert frechet_distance(fa, fb) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("seed", [0, 1])
def test_frechet_general_covariances_match_symmetric_form(seed: int) -> None:
    rng = np.random.default_rng(seed)
    dim = 8
    m1, m2 = rng.standard_normal((2, dim, dim))
    s1, s2 = m1 @ m1.T + 0.1 * np.eye(dim), m2 @ m2.T + 0.1 * np.eye(dim)
    mu1, mu2 = rng.standard_normal((2, dim))
    got = frechet_distance_from_statistics(mu1, s1, mu2, s2)
    assert got == pytest.approx(frechet_reference(mu1, s1, mu2, s2), rel=1e-8)


def test_frechet_symmetric() -> None:
    rng = np.random.default_rng(3)
    fa = rng.standard_normal((300, 20))
    fb = rng.standard_normal((500, 20)) * 1.5 + 0.3
    ab, ba = frechet_distance(fa, fb), frechet_distance(fb, fa)
    assert ab > 0
    assert ab == pytest.approx(ba, rel=1e-9)


def test_frechet_singular_covariances() -> None:
    rng = np.random.default_rng(4)
    # Fewer samples than dimensions and a dead (always-zero) feature, as ReLU features
    # can have: both covariances are singular.
    fa = rng.standard_normal((10, 32))
    fb = rng.standard_normal((12, 32)) + 0.5
    fa[:, 0] = fb[:, 0] = 0.0
    d = frechet_distance(fa, fb)
    assert np.isfinite(d) and d > 0
    assert frechet_distance(fa, fa) == pytest.approx(0.0, abs=1e-4)
    # The eps fallback perturbs the distance by O(eps * F) only.
    mu1, s1 = feature_statistics(fa)
    mu2, s2 = feature_statistics(fb)
    assert d == pytest.approx(frechet_reference(mu1, s1, mu2, s2), abs=1e-3)


def test_frechet_sqrtm_fallback_adds_eps(monkeypatch: pytest.MonkeyPatch) -> None:
    # scipy's sqrtm rarely fails on real covariances, so simulate a failure: the first
    # call returns NaN, and the distance must be recomputed with eps on both diagonals.
    calls: list[np.ndarray] = []
    real_sqrtm = scipy.linalg.sqrtm

    def flaky(a: np.ndarray) -> np.ndarray:
        calls.append(a.copy())
        return np.full_like(a, np.nan) if len(calls) == 1 else real_sqrtm(a)

    monkeypatch.setattr(scipy.linalg, "sqrtm", flaky)
    rng = np.random.default_rng(5)
    mu1, s1 = feature_statistics(rng.standard_normal((100, 6)))
    mu2, s2 = feature_statistics(rng.standard_normal((100, 6)) * 2)
    eps = 1e-3  # large enough to tell the regularised result from the plain one
    got = frechet_distance_from_statistics(mu1, s1, mu2, s2, eps=eps)
    assert len(calls) == 2
    offset = eps * np.eye(6)
    np.testing.assert_allclose(calls[1], (s1 + offset) @ (s2 + offset))
    reg = frechet_reference(mu1, s1 + offset, mu2, s2 + offset) - 2 * 6 * eps
    assert got == pytest.approx(reg, rel=1e-9)


@pytest.mark.parametrize("imag", [1e-9, 0.1])
def test_frechet_imaginary_parts(monkeypatch: pytest.MonkeyPatch, imag: float) -> None:
    real_sqrtm = scipy.linalg.sqrtm
    monkeypatch.setattr(scipy.linalg, "sqrtm", lambda a: real_sqrtm(a) + 1j * imag * np.eye(len(a)))
    rng = np.random.default_rng(6)
    mu1, s1 = feature_statistics(rng.standard_normal((100, 4)))
    mu2, s2 = feature_statistics(rng.standard_normal((100, 4)) + 1)
    if imag < 1e-6:  # rounding noise: dropped
        got = frechet_distance_from_statistics(mu1, s1, mu2, s2)
        assert got == pytest.approx(frechet_reference(mu1, s1, mu2, s2), rel=1e-6)
    else:
        with pytest.raises(ValueError, match="imaginary"):
            frechet_distance_from_statistics(mu1, s1, mu2, s2)


def test_frechet_input_errors() -> None:
    a = np.zeros((5, 3))
    with pytest.raises(ValueError, match="dimensions differ"):
        frechet_distance(a, np.zeros((5, 4)))
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(np.zeros((1, 3)), a)
    bad = np.ones((5, 3))
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(bad, a)
    with pytest.raises(ValueError, match="2-d"):
        frechet_distance(np.zeros(5), a)


# ------------------------------------------------------------------------- deviation


def test_deviation() -> None:
    a = torch.zeros(2, 1, 2, 2)
    b = a.clone()
    b[0, 0, 0, 0] = 0.8
    b[1, 0, 1, 1] = -0.4
    d = deviation(a, b)
    assert d["max_abs"] == pytest.approx(0.8)
    assert d["mean_abs"] == pytest.approx(1.2 / 8)
    assert deviation(a, a) == {"max_abs": 0.0, "mean_abs": 0.0}
    with pytest.raises(ValueError, match="shapes differ"):
        deviation(a, torch.zeros(2, 1, 2, 3))
    b[0, 0, 0, 1] = float("nan")
    assert np.isnan(deviation(a, b)["max_abs"])  # divergence is not hidden


# ------------------------------------------------------------------------ classifier


def test_feature_classifier_shapes() -> None:
    for size in (8, 28):
        model = FeatureClassifier(image_size=size)
        x = torch.zeros(3, 1, size, size)
        assert model.features(x).shape == (3, 64)
        assert model(x).shape == (3, 10)
    with pytest.raises(ValueError, match="multiple of 4"):
        FeatureClassifier(image_size=10)
    with pytest.raises(ValueError, match=r"\(N, 1, 8, 8\)"):
        FeatureClassifier(image_size=8).features(torch.zeros(3, 1, 28, 28))


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset("digits")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("classifier-cache")


@pytest.fixture(scope="module")
def trained(digits: Dataset, cache_dir: Path) -> TrainedClassifier:
    return train_classifier(digits, cache_dir=cache_dir)


@pytest.fixture(scope="module")
def meter(trained: TrainedClassifier, digits: Dataset) -> QualityMeter:
    return QualityMeter(trained, digits)


def test_classifier_accuracy_on_digits(trained: TrainedClassifier) -> None:
    assert trained.test_accuracy > DIGITS_MIN_ACCURACY
    assert not trained.provenance["loaded_from_cache"]
    assert trained.provenance["settings"]["dataset"] == "digits"
    assert "not FID" in trained.provenance["metric"]
    assert not trained.model.training


def test_training_is_deterministic_and_leaves_global_state(digits: Dataset) -> None:
    torch.manual_seed(123)
    state = torch.get_rng_state()
    threads = torch.get_num_threads()
    a = train_classifier(digits, epochs=1, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.get_num_threads() == threads
    b = train_classifier(digits, epochs=1, seed=5)
    for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    c = train_classifier(digits, epochs=1, seed=6)
    assert not torch.equal(a.model.fc.weight, c.model.fc.weight)


def test_cache_round_trip(trained: TrainedClassifier, digits: Dataset, cache_dir: Path) -> None:
    path = cache_path(cache_dir, classifier_settings(digits))
    assert path.is_file() and path.name.startswith("classifier-digits-")
    assert trained.provenance["cache_path"] == str(path)
    # Atomic write: no temporary files left next to the cache file.
    assert sorted(p.name for p in cache_dir.iterdir()) == [path.name]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a valid cache must load silently
        again = train_classifier(digits, cache_dir=cache_dir)
    assert again.provenance["loaded_from_cache"]
    assert again.test_accuracy == pytest.approx(trained.test_accuracy)
    for key, value in trained.model.state_dict().items():
        assert torch.equal(value, again.model.state_dict()[key])
    # Other settings select another file.
    assert cache_path(cache_dir, classifier_settings(digits, seed=1)) != path


@pytest.mark.parametrize("damage", ["truncate", "garbage", "other-settings", "nan-weights"])
def test_corrupt_cache_warns_and_retrains(digits: Dataset, tmp_path: Path, damage: str) -> None:
    first = train_classifier(digits, epochs=1, cache_dir=tmp_path)
    path = Path(first.provenance["cache_path"])
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "garbage":
        path.write_bytes(b"not a torch file at all")
    elif damage == "other-settings":
        # A valid file of different settings renamed to this name.
        other = train_classifier(digits, epochs=1, seed=9, cache_dir=tmp_path)
        os.replace(other.provenance["cache_path"], path)
    else:
        payload = torch.load(path, weights_only=True)
        payload["model"]["fc.weight"].fill_(float("nan"))
        torch.save(payload, path)
    settings_ = classifier_settings(digits, epochs=1)
    with pytest.raises(ClassifierCacheError, match=str(path.name)):
        load_classifier(path, digits, settings_)
    with pytest.warns(RuntimeWarning, match="retraining"):
        again = train_classifier(digits, epochs=1, cache_dir=tmp_path)
    assert not again.provenance["loaded_from_cache"]
    for key, value in first.model.state_dict().items():
        assert torch.equal(value, again.model.state_dict()[key])
    # The bad file was replaced by a good one.
    assert load_classifier(path, digits, settings_).provenance["loaded_from_cache"]


# ----------------------------------------------------------------------------- meter


def test_meter_reference_and_accuracy(meter: QualityMeter, digits: Dataset) -> None:
    # The reference is the test set itself, so its FCD is zero up to the sqrtm rounding.
    assert meter.frechet(digits.test_x) == pytest.approx(0.0, abs=1e-6)
    assert meter.accuracy(digits.test_x, digits.test_y) == pytest.approx(meter.test_accuracy)
    assert meter.reference_size == len(digits.test_x)
    n = len(digits.test_x)
    real = meter.frechet(digits.train_x[:n])
    noise = meter.frechet(torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(0)))
    assert 0 < real < noise / 10  # real digits are far closer to the test set than noise
    floor = frechet_noise_floor(meter, digits.train_x[:n], digits.train_x[n : 2 * n])
    assert 0 < floor < noise / 10


def test_meter_input_handling(meter: QualityMeter, digits: Dataset) -> None:
    x = digits.test_x[:50]
    # clamp=True: out-of-range pixels are clipped as saving an image would.
    assert torch.equal(meter.features(x * 5), meter.features((x * 5).clamp(-1, 1)))
    bad = x.clone()
    bad[3, 0, 2, 2] = float("nan")
    with pytest.raises(ValueError, match="1 of 50 images contain NaN"):
        meter.frechet(bad)
    with pytest.raises(ValueError, match="labels"):
        meter.accuracy(x, digits.test_y[:10])
    with pytest.raises(ValueError, match=r"\(N, 1, 8, 8\)"):
        meter.frechet(torch.zeros(10, 1, 28, 28))
    assert "digits" in repr(meter)

"""Stopping tolerances against the dtype's noise floor (``fixedpoint.precision``).

The bf16 path runs on CPU under ``torch.autocast``: iterates stay float32, the network's
linear layers run in bfloat16, so the map carries noise of order ``2**-7 |x|``.
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from test_tarflow_sampling import make_model

import fixedpoint as fp
from fixedpoint.precision import NOISE_FLOOR_ULPS, compute_dtype, iterate_scale
from fixedpoint.tarflow import Strategy, TarFlow
from fixedpoint.tarflow.sampling import reverse
from fixedpoint.testing import systems

BF16_FLOOR = 4 * 2.0**-7  # 0.03125


def precision_warnings(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, fp.PrecisionWarning)]


# ---- noise_floor, compute_dtype ------------------------------------------------------


@pytest.mark.parametrize(
    "dtype, eps",
    [(torch.bfloat16, 2.0**-7), (torch.float16, 2.0**-10), (torch.float32, 2.0**-23),
     (torch.float64, 2.0**-52)],
)
def test_noise_floor_is_four_ulps(dtype, eps):
    assert NOISE_FLOOR_ULPS == 4
    assert fp.noise_floor(dtype) == 4 * eps
    assert fp.noise_floor(dtype, scale=8.0) == 32 * eps
    assert fp.noise_floor(torch.bfloat16) == BF16_FLOOR


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, "float32", None])
def test_noise_floor_rejects_non_floating_dtypes(dtype):
    with pytest.raises(ValueError, match="floating-point torch dtype"):
        fp.noise_floor(dtype)


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), float("inf"), "1", True])
def test_noise_floor_rejects_bad_scales(scale):
    with pytest.raises(ValueError, match="scale must be a positive finite number"):
        fp.noise_floor(torch.float32, scale)


def test_compute_dtype_follows_autocast_only_when_coarser():
    x32, x64, x16 = (torch.zeros(1, dtype=d) for d in (torch.float32, torch.float64,
                                                        torch.bfloat16))
    assert compute_dtype(x32) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert compute_dtype(x32) == torch.bfloat16
        assert compute_dtype(x64) == torch.bfloat16
        assert compute_dtype(x16) == torch.bfloat16
    with torch.autocast("cpu", enabled=False):
        assert compute_dtype(x16) == torch.bfloat16


# ---- meaningful_tolerance ------------------------------------------------------------


@pytest.mark.parametrize(
    "method",
    [fp.Jacobi(atol=1e-4), fp.GSJacobi(modules=2, atol=1e-3), fp.Anderson(atol=1e-6),
     fp.TriangularAnderson(atol=1e-6, memory=2)],
    ids=["jacobi", "gsjacobi", "anderson", "triangular-anderson"],
)
def test_meaningful_tolerance_warns_and_raises_to_the_floor(method):
    with pytest.warns(fp.PrecisionWarning) as record:
        got = fp.meaningful_tolerance(method, torch.bfloat16)
    assert len(record) == 1
    text = str(record[0].message)
    for part in (type(method).__name__, "bfloat16", f"{method.atol:g}", f"{BF16_FLOOR:g}",
                 "raised"):
        assert part in text, (part, text)
    assert record[0].filename == __file__  # points at the caller
    assert type(got) is type(method) and got.atol == BF16_FLOOR
    assert got == dataclasses.replace(method, atol=BF16_FLOOR)


def test_meaningful_tolerance_rtol_and_scale():
    with pytest.warns(fp.PrecisionWarning, match="rtol=1e-05"):
        got = fp.meaningful_tolerance(fp.Jacobi(atol=0.5, rtol=1e-5), torch.bfloat16)
    assert (got.atol, got.rtol) == (0.5, BF16_FLOOR)
    # The absolute floor scales with the iterates, the relative one does not.
    with pytest.warns(fp.PrecisionWarning):
        got = fp.meaningful_tolerance(fp.Jacobi(atol=0.1, rtol=0.05), torch.bfloat16, scale=8)
    assert (got.atol, got.rtol) == (8 * BF16_FLOOR, 0.05)


def test_meaningful_tolerance_adjust_false_warns_and_returns_the_same_object():
    method = fp.Anderson(atol=1e-6)
    with pytest.warns(fp.PrecisionWarning, match="cannot be met"):
        got = fp.meaningful_tolerance(method, torch.bfloat16, adjust=False)
    assert got is method


@pytest.mark.parametrize(
    "method, dtype",
    [
        (fp.Sequential(), torch.bfloat16),
        (fp.Jacobi(), torch.bfloat16),  # the default is at the floor by construction
        (fp.Jacobi(atol=0, rtol=0), torch.bfloat16),  # deliberate exact finite termination
        (fp.TriangularAnderson(atol=0.0), torch.float16),
        (fp.Jacobi(atol=BF16_FLOOR), torch.bfloat16),  # at the floor is fine
        (fp.GSJacobi(modules=2, atol=0.05), torch.bfloat16),
        (fp.Jacobi(atol=1e-4), torch.float32),
        (fp.Anderson(atol=1e-6), torch.float32),  # 1e-6 > 4.8e-7
        (fp.Anderson(atol=1e-12), torch.float64),
    ],
)
def test_meaningful_tolerance_leaves_good_methods_alone(method, dtype):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fp.meaningful_tolerance(method, dtype) is method


def test_meaningful_tolerance_rejects_non_methods():
    with pytest.raises(TypeError, match="fixedpoint method"):
        fp.meaningful_tolerance("jacobi", torch.float32)  # type: ignore[arg-type]


# ---- fp.solve ------------------------------------------------------------------------


def test_solve_in_bfloat16_warns_but_keeps_the_method():
    s = systems.AffineAutoregressive.random(2, 16, 3, toughness=0.5, seed=0,
                                            dtype=torch.bfloat16)
    with pytest.warns(fp.PrecisionWarning, match="bfloat16") as record:
        res = fp.solve(s, s.empty(), fp.Jacobi(atol=1e-6))
    assert len(precision_warnings(record.list)) == 1
    assert record[0].filename == __file__  # points at the fp.solve call
    assert res.x.dtype == torch.bfloat16
    assert res.status is fp.Status.SUCCESS  # finite termination, not convergence


@pytest.mark.parametrize("method", [fp.Anderson(atol=1e-6, max_iter=5),
                                    fp.TriangularAnderson(atol=1e-4)])
def test_solve_under_autocast_uses_the_autocast_dtype(method):
    s = systems.AffineAutoregressive.random(2, 16, 3, toughness=0.5, seed=0,
                                            dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.warns(fp.PrecisionWarning):
        # Regression: Anderson's least squares crashed under autocast (bf16 products).
        res = fp.solve(s, s.empty(), method)
    assert res.x.dtype == torch.float32 and torch.isfinite(res.x).all()


@pytest.mark.parametrize(
    "dtype, method",
    [(torch.float32, fp.Jacobi(atol=1e-4)), (torch.float32, fp.Anderson(atol=1e-5)),
     (torch.float64, fp.GSJacobi(modules=4, atol=1e-12)), (torch.bfloat16, fp.Jacobi()),
     (torch.bfloat16, fp.Sequential())],
)
def test_solve_with_meaningful_tolerances_does_not_warn(dtype, method):
    s = systems.AffineAutoregressive.random(2, 16, 3, toughness=0.5, seed=0, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fp.PrecisionWarning)
        fp.solve(s, s.empty(), method)


# ---- TarFlow sampling in bfloat16 on CPU ---------------------------------------------

LABELS = torch.tensor([1, -1, 7])


@pytest.fixture(scope="module")
def model() -> TarFlow:
    """Tiny model with random non-zero out-projections: Jacobi needs several iterations
    (float32, tol 1e-4: 8-10 per block of T = 16)."""
    return make_model(seed=0)


@pytest.fixture(scope="module")
def z() -> torch.Tensor:
    return torch.randn(3, 16, 4, generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def float32_sequential(model, z) -> torch.Tensor:
    with torch.no_grad():
        return reverse(model, z, LABELS, guidance=1.0).x


def bf16_reverse(model, z, method, **kw):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            sample = reverse(model, z, LABELS, guidance=1.0,
                             strategy=Strategy.uniform(method, 4), **kw)
    return sample, precision_warnings(record)


@pytest.fixture(scope="module")
def floor(model, z) -> float:
    """The bf16 floor at the scale of the iterate: reverse starts from z * sqrt(var)."""
    scale = iterate_scale(z * model.var.sqrt())
    return fp.noise_floor(torch.bfloat16, scale)


def test_bf16_sampling_warns_once_and_adjusts(model, z, float32_sequential, floor):
    assert floor > BF16_FLOOR  # the iterate's scale is above 1
    adjusted, warned = bf16_reverse(model, z, fp.Jacobi(atol=1e-4))
    assert len(warned) == 1, warned  # one per reverse call, not one per block
    assert f"blocks 0,1,2,3: Jacobi atol=0.0001 < floor {floor:g}" in warned[0]
    assert "bfloat16" in warned[0] and "adjust_tolerance=False" in warned[0]
    assert [p.method for p in adjusted.strategy.plans] == [fp.Jacobi(atol=floor)] * 4

    kept, warned = bf16_reverse(model, z, fp.Jacobi(atol=1e-4), adjust_tolerance=False)
    assert len(warned) == 1, warned  # fp.solve does not repeat it per block
    assert "cannot be met" in warned[0]
    assert [p.method for p in kept.strategy.plans] == [fp.Jacobi(atol=1e-4)] * 4

    iters = [r.iterations for r in adjusted.blocks]
    kept_iters = [r.iterations for r in kept.blocks]
    assert sum(iters) < sum(kept_iters), (iters, kept_iters)
    assert all(r.status is fp.Status.SUCCESS for r in adjusted.blocks + kept.blocks)

    # Accuracy against float32 sequential sampling: bf16 sequential sampling itself
    # differs by about 0.03; a block stopped at the raised tolerance may add up to the
    # floor (measured 0.08 in all, 0.07 kept); a non-converged iterate is off by 0.1 - 1.
    assert torch.isfinite(adjusted.x).all()
    bf16_seq, _ = bf16_reverse(model, z, fp.Sequential())
    own = float((bf16_seq.x - float32_sequential).abs().max())
    for sample in (adjusted, kept):
        assert float((sample.x - float32_sequential).abs().max()) <= own + floor


def test_precision_warnings_point_at_the_callers_line(model, z):
    # The warning names the user's line, not a line inside the package.
    cheap = Strategy.uniform(fp.Jacobi(atol=1e-4, max_iter=1), 4)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.warns(fp.PrecisionWarning) as record:
            reverse(model, z, LABELS, strategy=cheap)
    assert [w.filename for w in record] == [__file__]


def test_bf16_anderson_tolerances(model, z, float32_sequential, floor):
    # Anderson has no finite termination: a tolerance below the bf16 noise is never met.
    # Its default (None) follows the arithmetic and needs no adjustment.
    default, warned = bf16_reverse(model, z, fp.Anderson(max_iter=30))
    assert warned == []
    assert [r.status for r in default.blocks] == [fp.Status.SUCCESS] * 4
    torch.testing.assert_close(default.x, float32_sequential, rtol=0, atol=0.075)
    adjusted, warned = bf16_reverse(model, z, fp.Anderson(atol=1e-6, max_iter=30))
    assert len(warned) == 1 and f"Anderson atol=1e-06 < floor {floor:g}" in warned[0]
    assert [r.status for r in adjusted.blocks] == [fp.Status.SUCCESS] * 4
    # The raised absolute tolerance (the floor at the largest token, 0.099 here) lets a
    # block stop with updates up to the floor: measured 0.076 from float32 sequential,
    # against 0.034 for bf16 sequential sampling itself.
    bf16_seq, _ = bf16_reverse(model, z, fp.Sequential())
    own = float((bf16_seq.x - float32_sequential).abs().max())
    assert float((adjusted.x - float32_sequential).abs().max()) <= own + floor
    kept, warned = bf16_reverse(model, z, fp.Anderson(atol=1e-6, max_iter=30),
                                adjust_tolerance=False)
    assert len(warned) == 1
    assert [r.status for r in kept.blocks] == [fp.Status.MAX_ITER] * 4


def test_bf16_sampling_with_meaningful_tolerances_is_silent(model, z, floor):
    for method in (fp.Jacobi(atol=2 * floor), fp.Jacobi(), fp.Sequential()):
        sample, warned = bf16_reverse(model, z, method)
        assert warned == [], (method, warned)
        assert sample.strategy.plans[0].method is method


def test_float32_sampling_does_not_warn(model, z):
    with warnings.catch_warnings():
        warnings.simplefilter("error", fp.PrecisionWarning)
        sample = reverse(model, z, LABELS, guidance=1.0,
                         strategy=Strategy.uniform(fp.Jacobi(atol=1e-4), 4))
    assert [p.method for p in sample.strategy.plans] == [fp.Jacobi(atol=1e-4)] * 4


def test_iterate_scale_is_robust_to_an_outlying_sample():
    x = torch.randn(5, 8, 3, generator=torch.Generator().manual_seed(0))
    typical = iterate_scale(x)
    x[2] = 1e30  # one overflowing sample
    x[3, 0, 0] = float("nan")
    assert iterate_scale(x) == pytest.approx(typical, rel=0.5)
    assert iterate_scale(torch.zeros(2, 4, 1)) == 1.0  # never below unit scale

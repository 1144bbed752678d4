"""Stopping tolerances that the arithmetic can actually resolve.

A tolerance test ``|x_new - x_old| <= atol + rtol*|x_new|`` only means something if the
map ``F`` is computed accurately enough to settle below ``atol``.  Every evaluation of
``F`` carries rounding noise of order ``eps * |x|`` in the unit ``eps`` of the arithmetic
it runs in: float32 (``2**-23``), bfloat16 under ``torch.autocast`` (``2**-7``; the
iterates stay float32 but the linear layers do not), TF32 matmuls on CUDA (``2**-10``).
An update that should be zero keeps flickering at that size, so a tolerance below it is
never met: the triangular methods then run to their finite-termination bound, Anderson
to its cap.

:func:`rounding_unit` finds ``eps`` for an iterate, :func:`noise_floor` is the smallest
absolute tolerance worth asking for at a given scale, and :func:`meaningful_tolerance`
warns about (and, if asked, lifts) tolerances below it.  These work for any method whose
tolerances are fields named ``atol`` and ``rtol`` (floats or 1-D tensors); the default
tolerance of every method (``None``) is at the floor by construction.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, TypeVar

import torch
from torch import Tensor

__all__ = [
    "NOISE_FLOOR_ULPS",
    "PrecisionWarning",
    "arithmetic_name",
    "compute_dtype",
    "iterate_scale",
    "low_tolerances",
    "meaningful_tolerance",
    "noise_floor",
    "precision_message",
    "raise_to_floor",
    "rounding_unit",
]

# Why 4 ulps: measured on the trained TarFlow checkpoints (CPU, batch 16, guidance 1,
# Jacobi on every block, bf16 autocast vs float32).  digits (T=16): tol 1e-4 took
# [14,15,15,15] iterations per block in bf16 vs [7,9,12,15] in float32 (the cap is 15-16);
# tol 1e-2 still [5,6,10,14]; at tol 3e-2 bf16 matched float32 ([4,5,7,11] vs
# [4,5,7,10]).  So tolerances below ~4 eps_bf16 = 3.1e-2 sit in the noise.
NOISE_FLOOR_ULPS = 4
"""Noise floor in units of the arithmetic's rounding unit, relative to the iterate."""

TF32_EPS = 2.0**-10
"""Rounding unit of TF32 matmuls (10 explicit mantissa bits)."""


class PrecisionWarning(UserWarning):
    """A stopping tolerance sits below the rounding noise of the compute dtype."""


def noise_floor(dtype: torch.dtype, scale: float = 1.0) -> float:
    """The smallest meaningful absolute stopping tolerance in ``dtype`` at ``scale``.

    >>> noise_floor(torch.bfloat16)
    0.03125
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"noise_floor needs a floating-point torch dtype, got {dtype!r}")
    return _floor(torch.finfo(dtype).eps, scale)


def _floor(eps: float, scale: float) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")
    return NOISE_FLOOR_ULPS * eps * float(scale)


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the arithmetic on ``x`` really runs in: the autocast dtype if autocast is
    enabled for ``x``'s device and coarser than ``x.dtype``, else ``x.dtype``."""
    device = x.device.type
    try:
        autocast = torch.is_autocast_enabled(device)
    except RuntimeError:  # device types without autocast support (e.g. "meta")
        return x.dtype
    if autocast and x.dtype.is_floating_point:
        low = torch.get_autocast_dtype(device)
        if torch.finfo(low).eps > torch.finfo(x.dtype).eps:
            return low
    return x.dtype


def rounding_unit(x: Tensor, *dtypes: torch.dtype) -> float:
    """The rounding unit ``eps`` of the arithmetic on ``x``: the coarsest of
    :func:`compute_dtype`, any further ``dtypes`` (e.g. a model's weights) and, for
    float32 on CUDA with TF32 matmuls enabled, TF32."""
    eps = max([torch.finfo(compute_dtype(x)).eps] + [torch.finfo(d).eps for d in dtypes])
    if (x.device.type == "cuda" and x.dtype == torch.float32
            and torch.backends.cuda.matmul.allow_tf32):
        eps = max(eps, TF32_EPS)
    return eps


def iterate_scale(x: Tensor) -> float:
    """The magnitude at which a tolerance on ``x`` is judged: the median over samples of
    each sample's largest finite entry, at least 1.  The median keeps one outlying
    sample (a bad start, an overflowing one) from setting the floor for all."""
    per_sample = torch.nan_to_num(x.detach().abs(), nan=0.0, posinf=0.0).flatten(1).amax(1)
    return max(float(per_sample.median()), 1.0)


def _smallest_positive(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, Tensor):
        positive = value[value > 0]
        return float(positive.min()) if positive.numel() else None
    return float(value) if value > 0 else None


def low_tolerances(method: Any, eps: float, scale: float = 1.0) -> dict[str, tuple[float, float]]:
    """``{name: (smallest positive value, floor)}`` for the method's ``atol`` / ``rtol``
    that sit below the floor (``atol`` at ``scale``, ``rtol`` relative).  Zero means
    "exact" and is never low; a method without such fields has none."""
    floors = {"atol": _floor(eps, scale), "rtol": _floor(eps, 1.0)}
    low = {}
    for name, floor in floors.items():
        value = _smallest_positive(getattr(method, name, None))
        if value is not None and value < floor:
            low[name] = (value, floor)
    return low


_M = TypeVar("_M")


def raise_to_floor(method: _M, low: dict[str, tuple[float, float]]) -> _M:
    """``method`` with the tolerances named in ``low`` raised to their floors (a new
    object: methods are frozen dataclasses); tensors are raised elementwise, keeping 0."""
    if not low:
        return method
    changes = {}
    for name, (_, floor) in low.items():
        value = getattr(method, name)
        if isinstance(value, Tensor):
            changes[name] = torch.where(value > 0, value.clamp(min=floor), value)
        else:
            changes[name] = floor
    return dataclasses.replace(method, **changes)


def arithmetic_name(x: Tensor) -> str:
    """``bfloat16``, ``float32``, ``float32 with TF32 matmuls``: what :func:`rounding_unit`
    saw, for messages."""
    name = str(compute_dtype(x)).replace("torch.", "")
    if (x.device.type == "cuda" and x.dtype == torch.float32
            and torch.backends.cuda.matmul.allow_tf32):
        name += " with TF32 matmuls"
    return name


def precision_message(subject: str, low: dict[str, tuple[float, float]], eps: float,
                      adjusted: bool, arithmetic: str = "") -> str:
    """The text of a :class:`PrecisionWarning` about ``low`` tolerances of ``subject``."""
    parts = ", ".join(f"{n}={v:g} < floor {f:g}" for n, (v, f) in low.items())
    where = f" in {arithmetic}" if arithmetic else ""
    floor = (f"the noise floor{where} is {NOISE_FLOOR_ULPS} ulps (eps={eps:g}) of the "
             "iterate's scale")
    if adjusted:
        return (f"{subject} {parts}: {floor}; a tolerance below it cannot be met and would "
                "run the solver to its iteration cap, so it was raised to the floor")
    return (f"{subject} {parts}: {floor}; a tolerance below it cannot be met, so the solver "
            "will likely run to its iteration cap; leave atol/rtol at None (the default, "
            "at the floor) or use 0 to ask for exact finite termination")


def meaningful_tolerance(
    method: _M, dtype: torch.dtype, *, scale: float = 1.0, adjust: bool = True
) -> _M:
    """Warn (:class:`PrecisionWarning`) if ``method``'s ``atol``/``rtol`` sit below the
    noise floor of ``dtype`` at ``scale``; with ``adjust``, return it with them raised to
    the floor, else ``method`` itself."""
    if not dataclasses.is_dataclass(method) or isinstance(method, type):
        raise TypeError(f"expected a fixedpoint method (a dataclass), got {method!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"expected a floating-point torch dtype, got {dtype!r}")
    eps = torch.finfo(dtype).eps
    low = low_tolerances(method, eps, scale)
    if not low:
        return method
    name = str(dtype).replace("torch.", "")
    warnings.warn(precision_message(type(method).__name__, low, eps, adjust, name),
                  PrecisionWarning, stacklevel=2)
    return raise_to_floor(method, low) if adjust else method

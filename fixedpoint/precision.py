"""Stopping tolerances that the arithmetic can actually resolve.

A tolerance test ``|x_new - x_old| <= tol + rtol*|x_new|`` only means something if the
map ``F`` is computed accurately enough to settle below ``tol``.  In low precision it is
not: under ``torch.autocast`` with bfloat16 the iterates stay float32 but the network's
linear layers run in bfloat16, so every evaluation of ``F`` carries rounding noise of
order ``eps_bf16 * |x|`` (``eps_bf16 = 2**-7``), and an update that should be zero
keeps flickering at that size.  A tolerance below the noise is never met: Jacobi then
runs to its finite-termination bound (and reports SUCCESS only because of it), while
Anderson, which has no such bound, ends in MAX_ITER.

:func:`noise_floor` is the smallest tolerance worth asking for, :func:`compute_dtype`
finds the precision the arithmetic really runs in, and :func:`meaningful_tolerance`
warns about a tolerance below the floor and, if asked, lifts it to the floor.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import warnings
from typing import TypeVar

import torch
from torch import Tensor

from .methods import Anderson, GSJacobi, Jacobi, Method, Sequential, TriangularAnderson

__all__ = [
    "NOISE_FLOOR_ULPS",
    "PrecisionWarning",
    "compute_dtype",
    "meaningful_tolerance",
    "noise_floor",
]

# Why 4 ulps: measured on the trained TarFlow checkpoints (CPU, batch 16, guidance 1,
# Jacobi(tol) on every block, bf16 autocast vs float32).  digits (T=16): tol 1e-4 took
# [14,15,15,15] iterations per block in bf16 vs [7,9,12,15] in float32 (the cap is 15-16);
# tol 1e-2 still [5,6,10,14]; at tol 3e-2 bf16 matched float32 ([4,5,7,11] vs
# [4,5,7,10]).  mnist patch 2 (T=196): tol 1e-4 [127,150,150,177] vs [8,8,12,48]; tol
# 3e-2 [5,7,9,56] vs [5,5,7,34].  So tolerances below ~4 eps_bf16 = 3.1e-2 sit in the
# noise, and at 4 eps the iteration counts return to the float32 ones.
NOISE_FLOOR_ULPS = 4
"""Noise floor in units of the dtype's machine epsilon (at unit scale)."""


class PrecisionWarning(UserWarning):
    """A stopping tolerance sits below the rounding noise of the compute dtype."""


def noise_floor(dtype: torch.dtype, scale: float = 1.0) -> float:
    """The smallest meaningful absolute stopping tolerance in ``dtype``.

    Iterates (or maps) of magnitude ``scale`` computed in ``dtype`` are only resolved to
    about ``NOISE_FLOOR_ULPS * eps * scale``; asking for less stalls the iteration.

    >>> noise_floor(torch.bfloat16)
    0.03125
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"noise_floor needs a floating-point torch dtype, got {dtype!r}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")
    return NOISE_FLOOR_ULPS * torch.finfo(dtype).eps * float(scale)


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the arithmetic on ``x`` really runs in.

    Under an enabled ``torch.autocast`` for ``x``'s device, eligible ops (matmuls,
    linear layers) run in the autocast dtype; if that is coarser than ``x.dtype`` it
    decides the noise.  Otherwise ``x.dtype``.
    """
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


_M = TypeVar("_M", Sequential, Jacobi, GSJacobi, Anderson, TriangularAnderson)


def _raise_to_floor(
    method: _M, dtype: torch.dtype, scale: float
) -> tuple[_M, dict[str, tuple[float, float]]]:
    """``method`` with ``tol``/``rtol`` raised to the floor, and ``{name: (old, floor)}``.

    No warning: callers that check many methods (``tarflow.reverse``) report once.
    ``tol == 0`` / ``rtol == 0`` are deliberate (exact finite termination, or no
    relative part) and stay as they are; Sequential has no tolerance.
    """
    if not isinstance(method, (Sequential, Jacobi, GSJacobi, Anderson, TriangularAnderson)):
        raise TypeError(f"expected a fixedpoint method, got {type(method).__name__}")
    if isinstance(method, Sequential):
        return method, {}
    floors = {"tol": noise_floor(dtype, scale), "rtol": noise_floor(dtype)}
    low = {}
    for name, floor in floors.items():
        value = getattr(method, name)
        if 0 < value < floor:
            low[name] = (value, floor)
    if not low:
        return method, {}
    return dataclasses.replace(method, **{k: f for k, (_, f) in low.items()}), low


def _describe(method: Method, low: dict[str, tuple[float, float]]) -> str:
    """E.g. ``Jacobi tol=1e-06 < floor 0.03125``."""
    parts = ", ".join(f"{name}={old:g} < floor {floor:g}" for name, (old, floor) in low.items())
    return f"{type(method).__name__} {parts}"


def _message(subject: str, dtype: torch.dtype, adjusted: bool) -> str:
    floor = f"the noise floor of {dtype} is {NOISE_FLOOR_ULPS} eps times the iterates' scale"
    if adjusted:
        return (
            f"{subject}: {floor}; a tolerance below it cannot be met and would run the "
            "solver to its iteration cap, so it was raised to the floor"
        )
    return (
        f"{subject}: {floor}; a tolerance below it cannot be met, so the solver will likely "
        "run to its iteration cap; use a tolerance at or above fixedpoint.noise_floor(dtype), "
        "or tol=0 to ask for exact finite termination"
    )


def meaningful_tolerance(
    method: _M, dtype: torch.dtype, *, scale: float = 1.0, adjust: bool = True
) -> _M:
    """Check ``method``'s tolerances against the noise floor of ``dtype``.

    If ``0 < method.tol < noise_floor(dtype, scale)`` (or ``0 < method.rtol <
    noise_floor(dtype)``: a relative tolerance has no scale) a :class:`PrecisionWarning`
    names the method, the dtype, the tolerance and the floor.  With ``adjust`` the
    returned method has the offending tolerance raised to the floor (a new object; the
    methods are frozen); without, ``method`` itself is returned.  ``tol == 0`` is a
    deliberate request for exact finite termination and passes unchanged, as does
    :class:`~fixedpoint.Sequential`, which has no tolerance.

    ``scale`` is the magnitude of the iterates (the floor is absolute).
    """
    return _check_tolerance(method, dtype, scale=scale, adjust=adjust)


def _check_tolerance(method: _M, dtype: torch.dtype, *, scale: float, adjust: bool) -> _M:
    raised, low = _raise_to_floor(method, dtype, scale)
    if not low:
        return method
    warnings.warn(
        _message(_describe(method, low), dtype, adjust),
        PrecisionWarning,
        stacklevel=_user_stacklevel(),
    )
    return raised if adjust else method


_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _user_stacklevel() -> int:
    """``stacklevel`` for a ``warnings.warn`` in the caller: the first frame outside the
    package, so the warning points at the user's line whichever entry point
    (``fp.solve``, ``TarFlow.reverse``, ``tarflow.reverse``, ...) led here."""
    frame = sys._getframe(1)  # the function that calls warnings.warn: stacklevel 1
    level = 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        frame = frame.f_back
        level += 1
    return level

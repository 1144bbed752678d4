"""Stopping tolerances: validation, and the per-position test every method shares.

Position ``t`` of sample ``b`` has *settled* when every component of its update satisfies

    |x_new - x_old| <= atol_t + rtol_t * |x_new|.

``atol`` and ``rtol`` are floats or 1-D tensors over the ``T`` positions (for instance a
tolerance scaled by each diffusion step's noise level).  ``atol = rtol = None``, the
default of every method, means *stop at the rounding level*: the test becomes

    max_c |x_new - x_old| <= NOISE_FLOOR_ULPS * eps * max_c |x_new|

per position, with ``eps`` the rounding unit of the arithmetic the map runs in (see
:func:`fixedpoint.precision.rounding_unit`: float32, or bfloat16 under autocast, or TF32
on CUDA).  An update that has reached rounding flickers at a few ulps of the iterate's
own magnitude, so this stops a default solve within a few iterations of convergence
instead of at the iteration cap.  ``atol = rtol = 0`` asks for exact agreement: the
triangular methods still end by finite termination, but when iterates flicker they run
to ``T - 1`` iterations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..precision import NOISE_FLOOR_ULPS

__all__ = ["Tolerance", "ToleranceLike", "check_max_iter", "check_tolerance"]

ToleranceLike = float | Tensor | None


def check_tolerance(name: str, value: ToleranceLike) -> None:
    """Raise ``ValueError`` unless ``value`` is None, a finite float >= 0, or a 1-D tensor
    of such values."""
    if value is None:
        return
    if isinstance(value, Tensor):
        if value.ndim != 1 or not value.is_floating_point():
            raise ValueError(f"{name} as a tensor must be 1-D floating point over positions, "
                             f"got shape {tuple(value.shape)} {value.dtype}")
        if not bool(torch.isfinite(value).all()) or bool((value < 0).any()):
            raise ValueError(f"{name} must be finite and >= 0 at every position")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number >= 0, a 1-D tensor or None, got {value!r}")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def check_max_iter(max_iter: int | None) -> None:
    if max_iter is None:
        return
    if not isinstance(max_iter, int) or isinstance(max_iter, bool) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive int or None, got {max_iter!r}")


@dataclass(frozen=True)
class Tolerance:
    """A stopping test resolved for one solve (see the module docstring)."""

    atol: Tensor | float
    rtol: Tensor | float
    floor: float  # > 0 only for the default: NOISE_FLOOR_ULPS * eps, relative per position

    @classmethod
    def resolve(
        cls, atol: ToleranceLike, rtol: ToleranceLike, *, length: int, eps: float,
        device: torch.device, dtype: torch.dtype,
    ) -> Tolerance:
        if atol is None and rtol is None:
            return cls(0.0, 0.0, NOISE_FLOOR_ULPS * eps)

        def place(name: str, value: ToleranceLike) -> Tensor | float:
            if value is None:
                return 0.0
            if isinstance(value, Tensor):
                if value.shape != (length,):
                    raise ValueError(f"{name} has {value.shape[0]} positions, the system {length}")
                return value.to(device=device, dtype=dtype)[:, None]  # (T, 1): per position
            return float(value)

        return cls(place("atol", atol), place("rtol", rtol), 0.0)

    @property
    def exact(self) -> bool:
        """Only exact agreement settles a position."""
        return (self.floor == 0 and not isinstance(self.atol, Tensor) and self.atol == 0
                and not isinstance(self.rtol, Tensor) and self.rtol == 0)

    def excess(self, x_old: Tensor, x_new: Tensor, lo: int) -> Tensor:
        """Per (sample, position) of the window starting at ``lo``: how far the update is
        above what the tolerance allows (``<= 0``: settled).  Non-finite where ``x_new``
        is non-finite, so one reduction serves the test and the failure check."""
        width = x_new.shape[1]
        d = (x_new - x_old).abs()
        if isinstance(self.rtol, Tensor) or self.rtol:
            d = d - self._slice(self.rtol, lo, width) * x_new.abs()
        if isinstance(self.atol, Tensor) or self.atol:
            d = d - self._slice(self.atol, lo, width)
        excess = d.amax(-1)
        if self.floor:
            excess = excess - self.floor * x_new.abs().amax(-1)
        return excess

    @staticmethod
    def _slice(value: Tensor | float, lo: int, width: int) -> Tensor | float:
        return value[lo : lo + width] if isinstance(value, Tensor) else value

"""Jacobi: every unsettled position at once."""

from __future__ import annotations

from dataclasses import dataclass

from .sweep import PrefixMethod
from .tolerance import ToleranceLike, check_max_iter, check_tolerance

__all__ = ["Jacobi"]


@dataclass(frozen=True)
class Jacobi(PrefixMethod):
    """Parallel fixed-point iteration ``x <- F(x)`` on all unsettled positions at once.

    ``atol``/``rtol``: see :mod:`fixedpoint.methods.tolerance` (default: stop at the
    rounding level of the iterate).  ``max_iter=None`` means ``T``, the
    finite-termination bound, so the iteration always ends exact; a smaller cap trades
    accuracy for steps.
    """

    atol: ToleranceLike = None
    rtol: ToleranceLike = None
    max_iter: int | None = None

    def __post_init__(self) -> None:
        check_tolerance("atol", self.atol)
        check_tolerance("rtol", self.rtol)
        check_max_iter(self.max_iter)

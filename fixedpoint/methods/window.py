"""Sliding-window Jacobi (ParaDiGMS, Shih et al. 2023): at most ``W`` positions a step.

Jacobi evaluates every unsettled position at once; when one evaluation of ``F`` costs
in proportion to the positions it covers (a diffusion step per position: each is a row
of the network's batch), the positions far beyond the frozen prefix are mostly wasted
work, because their inputs are still wrong.  The sliding window evaluates only the ``W``
positions from the first unfrozen one, ``[p, p + W)``, and slides forward as the prefix
freezes: the window is the batch of one network call.

* ``width=1`` is forward substitution: one position per step, each exact when computed.
* ``width >= T`` is Jacobi.
* Cost: each iteration is one dependent evaluation of at most ``W`` positions per sample
  (``token_evals`` counts what the map actually reads).

With a batch of samples the window starts at the slowest sample's prefix (one network
call serves the batch); a sample that is further ahead then sees fewer of its unsettled
positions in that call, so its iteration count, though never its solution, can depend
on the rest of the batch.  With one sample, as in ParaDiGMS, it does not.

``rms=True`` is the ParaDiGMS stopping rule: a position settles when the root mean
square of its update over its ``d`` components is at most ``atol_t + rtol_t * RMS(x_new)``
(instead of every component meeting it).  ParaDiGMS's ``||dx||^2 / (d sigma_t^2) <=
tau^2`` is ``atol = tau * sigma`` as a per-position tensor, ``rtol = 0``
(:func:`fixedpoint.diffusion.paradigms_tolerance` builds it for a sampler chain).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import Problem
from .sweep import PrefixMethod, PrefixState
from .tolerance import Tolerance, ToleranceLike, check_max_iter, check_tolerance

__all__ = ["SlidingWindow"]


@dataclass(frozen=True)
class SlidingWindow(PrefixMethod):
    """Jacobi on a window of at most ``width`` positions starting at the frozen prefix.

    ``max_iter=None`` means ``T`` (every iteration freezes at least one position, so the
    iteration always ends exact).
    """

    width: int = 16
    atol: ToleranceLike = None
    rtol: ToleranceLike = None
    max_iter: int | None = None
    rms: bool = False

    def __post_init__(self) -> None:
        w = self.width
        if isinstance(w, bool) or not isinstance(w, int) or w < 1:
            raise ValueError(f"window width must be a positive int, got {w!r}")
        check_tolerance("atol", self.atol)
        check_tolerance("rtol", self.rtol)
        check_max_iter(self.max_iter)
        if not isinstance(self.rms, bool):
            raise TypeError(f"rms must be a bool, got {self.rms!r}")

    def window(self) -> int:
        return self.width

    def init(self, problem: Problem) -> PrefixState:
        state = super().init(problem)
        if self.rms:
            state.tol = _RootMeanSquare(state.tol)
        return state


class _RootMeanSquare:
    """The shared tolerance test with each position's update measured by its RMS."""

    def __init__(self, tol: Tolerance):
        self.tol = tol

    def excess(self, x_old: Tensor, x_new: Tensor, lo: int) -> Tensor:
        tol, width = self.tol, x_new.shape[1]
        d = (x_new - x_old).pow(2).mean(-1).sqrt()
        scale = x_new.pow(2).mean(-1).sqrt()
        allowed = torch.zeros_like(d)
        if isinstance(tol.atol, Tensor) or tol.atol:
            allowed = allowed + _per_position(tol.atol, lo, width)
        if isinstance(tol.rtol, Tensor) or tol.rtol:
            allowed = allowed + _per_position(tol.rtol, lo, width) * scale
        if tol.floor:
            allowed = allowed + tol.floor * x_new.abs().amax(-1)
        return d - allowed


def _per_position(value: Tensor | float, lo: int, width: int) -> Tensor | float:
    # Tolerance keeps tensors as (T, 1) for broadcasting over components; here (T,).
    return value[lo : lo + width, 0] if isinstance(value, Tensor) else value

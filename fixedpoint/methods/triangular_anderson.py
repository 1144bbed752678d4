"""Triangular Anderson acceleration (ParaTAA, Tang et al. 2024)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import Problem
from .linalg import check_history, own_precision, ridge_solve
from .sweep import PrefixMethod
from .tolerance import ToleranceLike, check_max_iter, check_tolerance

__all__ = ["TriangularAnderson"]


@dataclass(frozen=True)
class TriangularAnderson(PrefixMethod):
    """Triangular Anderson acceleration (ParaTAA, Tang et al. 2024).

    Position ``t`` mixes its history with coefficients fitted on the causal prefix
    ``s <= t`` only, so no position looks ahead.  The first unsettled position takes the
    plain step, which keeps Jacobi's finite termination (at most ``T`` iterations).
    """

    memory: int = 3
    ridge: float = 1e-8
    atol: ToleranceLike = None
    rtol: ToleranceLike = None
    max_iter: int | None = None

    def __post_init__(self) -> None:
        check_tolerance("atol", self.atol)
        check_tolerance("rtol", self.rtol)
        check_max_iter(self.max_iter)
        check_history(self.memory, self.ridge)

    def proposer(self, problem: Problem, lo0: int, hi: int) -> _History:
        return _History(self.memory, self.ridge, problem, lo0, hi)


class _History:
    """The per-position iterate and residual differences of one module."""

    def __init__(self, memory: int, ridge: float, problem: Problem, lo0: int, hi: int):
        self.memory = memory
        self.ridge = ridge
        self.lo0 = lo0
        shape = (problem.batch, hi - lo0, problem.dim, memory)
        self.dX = problem.x.new_zeros(shape)
        self.dR = problem.x.new_zeros(shape)
        self.filled = 0
        self.slot = 0
        self.prev_x: Tensor | None = None
        self.prev_r: Tensor | None = None

    def propose(self, x: Tensor, f: Tensor, lo: int, unfrozen: Tensor, first: Tensor) -> Tensor:
        with own_precision(x):
            return self._propose(x, f, lo, unfrozen, first)

    def _propose(self, x: Tensor, f: Tensor, lo: int, unfrozen: Tensor, first: Tensor) -> Tensor:
        r = f - x
        off = lo - self.lo0
        if self.prev_x is not None:
            self.dX[:, off:, :, self.slot] = x - self.prev_x[:, off:]
            self.dR[:, off:, :, self.slot] = r - self.prev_r[:, off:]
            self.slot = (self.slot + 1) % self.memory
            self.filled = min(self.filled + 1, self.memory)
        self.prev_x = torch.cat([x.new_zeros(x.shape[0], off, x.shape[2]), x], 1)
        self.prev_r = torch.cat([r.new_zeros(r.shape[0], off, r.shape[2]), r], 1)
        if self.filled == 0:
            return f
        dX, dR = self.dX[:, off:], self.dR[:, off:]
        live = unfrozen[..., None, None].to(x.dtype)
        # Causal prefix sums over the unfrozen positions: position t sees s <= t only.
        gram = torch.cumsum(live * dR.transpose(-1, -2) @ dR, dim=1)
        rhs = torch.cumsum(live * (dR.transpose(-1, -2) @ r[..., None]), dim=1)[..., 0]
        used = torch.arange(self.memory, device=x.device) < self.filled
        gamma, info = ridge_solve(gram, rhs, used, self.ridge)
        mixed = x + r - ((dX + dR) @ gamma[..., None])[..., 0]
        # Singular or overflowing least squares: that position takes the plain step.
        fallback = first[..., None] | ~torch.isfinite(mixed) | (info != 0)[..., None]
        return torch.where(fallback, f, mixed)

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

    ``window`` (None: the whole rest of the module) evaluates at most that many
    positions per iteration from the frozen prefix, as :class:`SlidingWindow` does; a
    position entering the window starts with an empty history.  ParaTAA pairs the two
    on long diffusion chains, where each evaluated position is a row of the network call.
    """

    memory: int = 3
    ridge: float = 1e-8
    atol: ToleranceLike = None
    rtol: ToleranceLike = None
    max_iter: int | None = None
    window_width: int | None = None

    def __post_init__(self) -> None:
        check_tolerance("atol", self.atol)
        check_tolerance("rtol", self.rtol)
        check_max_iter(self.max_iter)
        check_history(self.memory, self.ridge)
        w = self.window_width
        if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 1):
            raise ValueError(f"window_width must be a positive int or None, got {w!r}")

    def window(self) -> int | None:
        return self.window_width

    def proposer(self, problem: Problem, lo0: int, hi: int) -> _History:
        return _History(self.memory, self.ridge, problem, lo0, hi)


class _History:
    """The per-position iterate and residual differences of one module.

    Slots of the ring buffer are written in turn; ``valid[t, j]`` says whether slot ``j``
    holds a difference of position ``t`` (a position gets its first one on its second
    evaluation).  Without a window every evaluated position has the same valid slots.
    """

    def __init__(self, memory: int, ridge: float, problem: Problem, lo0: int, hi: int):
        self.memory = memory
        self.ridge = ridge
        self.lo0 = lo0
        length = hi - lo0
        shape = (problem.batch, length, problem.dim, memory)
        self.dX = problem.x.new_zeros(shape)
        self.dR = problem.x.new_zeros(shape)
        self.prev_x = problem.x.new_zeros(problem.batch, length, problem.dim)
        self.prev_r = problem.x.new_zeros(problem.batch, length, problem.dim)
        self.seen = torch.zeros(length, dtype=torch.bool, device=problem.device)
        self.valid = torch.zeros(length, memory, dtype=torch.bool, device=problem.device)
        self.slot = 0

    def propose(self, x: Tensor, f: Tensor, lo: int, unfrozen: Tensor, first: Tensor) -> Tensor:
        with own_precision(x):
            return self._propose(x, f, lo, unfrozen, first)

    def _propose(self, x: Tensor, f: Tensor, lo: int, unfrozen: Tensor, first: Tensor) -> Tensor:
        r = f - x
        a, b = lo - self.lo0, lo - self.lo0 + x.shape[1]
        seen = self.seen[a:b]
        if bool(seen.any()):
            known = seen[None, :, None]
            slot = self.slot
            self.dX[:, a:b, :, slot] = torch.where(known, x - self.prev_x[:, a:b], 0.0)
            self.dR[:, a:b, :, slot] = torch.where(known, r - self.prev_r[:, a:b], 0.0)
            self.valid[a:, slot] = False
            self.valid[a:b, slot] = seen
            self.slot = (slot + 1) % self.memory
        self.prev_x[:, a:b] = x
        self.prev_r[:, a:b] = r
        self.seen[a:b] = True
        used = self.valid[a:b]
        if not bool(used.any()):
            return f
        dX, dR = self.dX[:, a:b], self.dR[:, a:b]
        live = unfrozen[..., None, None].to(x.dtype)
        # Causal prefix sums over the unfrozen positions: position t sees s <= t only.
        # (A slot valid at t is valid at every s < t in the window: positions enter it in
        # order, so the sums mix only real differences.)
        gram = torch.cumsum(live * dR.transpose(-1, -2) @ dR, dim=1)
        rhs = torch.cumsum(live * (dR.transpose(-1, -2) @ r[..., None]), dim=1)[..., 0]
        gamma, info = ridge_solve(gram, rhs, used, self.ridge)
        mixed = x + r - ((dX + dR) @ gamma[..., None])[..., 0]
        # Singular or overflowing least squares, or no history yet: the plain step.
        fallback = (
            first[..., None]
            | ~torch.isfinite(mixed)
            | (info != 0)[..., None]
            | ~used.any(-1)[None, :, None]
        )
        return torch.where(fallback, f, mixed)

"""Type-II Anderson acceleration over the whole sequence, per sample, safeguarded."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import Method, Problem
from .linalg import check_history, own_precision, ridge_solve
from .tolerance import Tolerance, ToleranceLike, check_max_iter, check_tolerance

__all__ = ["Anderson"]


@dataclass(frozen=True)
class Anderson(Method):
    """Type-II Anderson acceleration over the whole sequence, safeguarded.

    Each sample keeps its own history of the last ``memory`` iterate and residual
    differences and mixes them by ridge-regularised least squares.  Mixing couples
    later positions into earlier ones, so the triangular structure and its finite
    termination are lost; the safeguards make failure visible instead of silent: a
    non-finite mixed step, or one whose residual grew by more than ``growth``, is
    rejected in favour of the plain step and the history restarts.  A sample converges
    when its residual ``F(x) - x`` meets the tolerance at every position.
    ``max_iter=None`` means ``T``: never more dependent steps than sequential.
    """

    memory: int = 5
    ridge: float = 1e-8
    damping: float = 1.0
    atol: ToleranceLike = None
    rtol: ToleranceLike = None
    max_iter: int | None = None
    growth: float = 2.0

    def __post_init__(self) -> None:
        check_tolerance("atol", self.atol)
        check_tolerance("rtol", self.rtol)
        check_max_iter(self.max_iter)
        check_history(self.memory, self.ridge)
        if not 0 < self.damping <= 1:
            raise ValueError(f"damping must be in (0, 1], got {self.damping!r}")
        if not self.growth >= 1:
            raise ValueError(f"growth must be >= 1, got {self.growth!r}")

    def init(self, problem: Problem) -> _AndersonState:
        tol = Tolerance.resolve(self.atol, self.rtol, length=problem.length, eps=problem.eps,
                                device=problem.device, dtype=problem.dtype)
        cap = problem.length if self.max_iter is None else self.max_iter
        return _AndersonState(problem, self.memory, tol, cap)

    def done(self, problem: Problem, state: _AndersonState) -> bool:
        if state.iterations < state.cap and state.any_active:
            return False
        problem.cap_reached(state.active)
        problem.module_iterations.append(state.iterations)
        return True

    def step(self, problem: Problem, s: _AndersonState) -> _AndersonState:
        B, T, d = problem.batch, problem.length, problem.dim
        beta = self.damping
        f3 = problem.evaluate(0, T)
        s.iterations += 1
        problem.count_iteration(s.active)
        x3 = problem.x
        excess = s.tol.excess(x3, f3, 0)  # (B, T): residual against the tolerance
        f, x = f3.reshape(B, -1), x3.reshape(B, -1)
        g = f - x
        finite = torch.isfinite(excess).all(1)
        norm = torch.linalg.vector_norm(torch.where(finite[:, None], g, 0.0), dim=1)
        prev_norm = torch.linalg.vector_norm(s.prev_g, dim=1)
        # Safeguard: a mixed step that overflowed or grew the residual is rejected.
        reject = s.active & s.mixed_last & (~finite | (norm > self.growth * prev_norm))
        failed = s.active & ~finite & ~reject
        problem.fail(failed)
        accept = s.active & finite & ~reject
        done = accept & (excess <= 0).all(1)
        go_on = accept & ~done

        push = go_on & s.has_prev
        rows = s.rows
        s.dX[rows[push], s.slot[push]] = (x - s.prev_x)[push]
        s.dG[rows[push], s.slot[push]] = (g - s.prev_g)[push]
        s.slot = torch.where(push, (s.slot + 1) % self.memory, s.slot)
        s.filled = torch.where(push, torch.clamp(s.filled + 1, max=self.memory), s.filled)
        s.filled = torch.where(reject, 0, s.filled)

        plain = x + beta * g
        with own_precision(x):
            used = torch.arange(self.memory, device=x.device)[None, :] < s.filled[:, None]
            gram = s.dG @ s.dG.transpose(1, 2)
            rhs = (s.dG @ g[..., None])[..., 0]
            gamma, info = ridge_solve(gram, rhs, used, self.ridge)
            # A singular system gives non-finite coefficients: the plain step is taken.
            gamma = torch.where((info != 0)[:, None], torch.nan, gamma)
            mixed = plain - ((s.dX + beta * s.dG).transpose(1, 2) @ gamma[..., None])[..., 0]
        usable = (s.filled > 0) & torch.isfinite(mixed).all(1)
        s.filled = torch.where(go_on & ~usable, 0, s.filled)

        new_x = torch.where(done[:, None], f, x)
        new_x = torch.where(go_on[:, None], torch.where(usable[:, None], mixed, plain), new_x)
        new_x = torch.where(reject[:, None], s.prev_x + beta * s.prev_g, new_x)

        s.prev_x = torch.where(go_on[:, None], x, s.prev_x)
        s.prev_g = torch.where(go_on[:, None], g, s.prev_g)
        s.has_prev |= go_on
        s.mixed_last = go_on & usable
        s.active = s.active & ~done & ~failed
        if problem.tracing:
            residual = (new_x - x).abs().amax(1)
        problem.x = new_x.reshape(B, T, d)
        if problem.tracing:
            problem.record(0, s.iterations, residual)
        s.any_active = bool(s.active.any())  # the one synchronisation of the iteration
        return s


class _AndersonState:
    """History buffers and per-sample flags (device tensors) of one Anderson solve."""

    def __init__(self, problem: Problem, memory: int, tol: Tolerance, cap: int):
        B, N = problem.batch, problem.length * problem.dim
        device, dtype = problem.device, problem.dtype
        self.tol = tol
        self.cap = cap
        self.iterations = 0
        self.dX = torch.zeros(B, memory, N, dtype=dtype, device=device)
        self.dG = torch.zeros_like(self.dX)
        self.filled = torch.zeros(B, dtype=torch.long, device=device)
        self.slot = torch.zeros(B, dtype=torch.long, device=device)
        self.rows = torch.arange(B, device=device)
        # The last accepted iterate and its residual: differences are taken against them.
        self.prev_x = torch.zeros(B, N, dtype=dtype, device=device)
        self.prev_g = torch.zeros_like(self.prev_x)
        self.has_prev = torch.zeros(B, dtype=torch.bool, device=device)
        self.mixed_last = torch.zeros(B, dtype=torch.bool, device=device)
        self.active = problem.alive.clone()
        self.any_active = True
        self.last: Tensor | None = None

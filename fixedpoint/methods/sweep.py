"""Frozen-prefix iteration: the machinery of the triangular (Jacobi-family) methods.

Positions ``lo0 .. hi-1`` (a *module*; Jacobi has one module, the whole sequence) are
iterated with everything before ``lo0`` final.  Each sample keeps a pointer ``p``:
its positions before ``p`` are frozen.  One iteration evaluates ``F`` on the window
``[min p, hi)`` (or at most ``window`` positions of it) and then freezes, per sample,
every position all of whose inputs had settled: the first unfrozen position always
qualifies (its inputs were frozen), which is the finite-termination argument (at most
``hi - lo0`` iterations per module), and every later position whose update met the
tolerance follows it up to the first one that moved.  Frozen positions take the plain
value ``F(x)``, exact given their inputs; unfrozen ones take the method's *proposal*
(``F(x)`` for Jacobi, a mixed step for triangular Anderson, a damped one for damped
Jacobi).

A new method of this family subclasses :class:`PrefixMethod` and overrides at most
:meth:`PrefixMethod.edges` (where the modules start), :meth:`PrefixMethod.cap` (the
iteration cap per module), :meth:`PrefixMethod.window` and :meth:`PrefixMethod.proposer`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from .base import Method, Problem
from .tolerance import Tolerance

__all__ = ["PrefixMethod", "PrefixState", "Proposer"]


class Proposer(Protocol):
    """Turns the plain Jacobi values into the method's proposal for unfrozen positions."""

    def propose(
        self, x_old: Tensor, f: Tensor, lo: int, unfrozen: Tensor, first: Tensor
    ) -> Tensor:
        """``x_old``, ``f``: ``(B, W, d)`` on the window starting at ``lo``; ``unfrozen``
        and ``first`` (the first unfrozen position): ``(B, W)`` bool.  Must not write
        into its arguments."""


@dataclass(eq=False)
class PrefixState:
    """State of a :class:`PrefixMethod` solve (mutable; owned by the driver's loop)."""

    edges: tuple[int, ...]
    tol: Tolerance
    module: int = -1
    lo0: int = 0
    hi: int = 0
    cap: int = 0
    iterations: int = 0
    p: Tensor | None = None  # (B,) first unfrozen position; hi when frozen or failed
    lo: int = 0  # the next window's start (host copy of min p)
    any_alive: bool = True
    proposer: Proposer | None = None
    finished: bool = False
    positions: Tensor | None = None


class PrefixMethod(Method):
    """Base of the frozen-prefix methods; subclasses are frozen dataclasses that define
    ``atol`` and ``rtol`` fields (and usually ``max_iter``)."""

    atol: Any
    rtol: Any

    # ---- what a subclass may override --------------------------------------------------

    def edges(self, length: int) -> tuple[int, ...]:
        """Module edges ``(0, e_1, ..., length)``; one module by default."""
        return (0, length)

    def cap(self, width: int) -> int:
        """Iteration cap of a module of ``width`` positions (default: ``max_iter``, or the
        width, the finite-termination bound)."""
        max_iter = getattr(self, "max_iter", None)
        return width if max_iter is None else max_iter

    def window(self) -> int | None:
        """At most this many positions per evaluation (None: the rest of the module)."""
        return None

    def proposer(self, problem: Problem, lo0: int, hi: int) -> Proposer | None:
        """A fresh proposer for the module ``lo0 .. hi-1`` (None: plain Jacobi values)."""
        return None

    # ---- the protocol -------------------------------------------------------------------

    def init(self, problem: Problem) -> PrefixState:
        tol = Tolerance.resolve(
            self.atol, self.rtol, length=problem.length, eps=problem.eps,
            device=problem.device, dtype=problem.dtype,
        )
        state = PrefixState(edges=self.edges(problem.length), tol=tol)
        state.positions = torch.arange(problem.length, device=problem.device)
        _next_module(self, problem, state)
        return state

    def done(self, problem: Problem, state: PrefixState) -> bool:
        return state.finished

    def step(self, problem: Problem, state: PrefixState) -> PrefixState:
        s = state
        lo, hi = s.lo, s.hi
        width = self.window()
        end = hi if width is None else min(hi, lo + width)
        p = s.p
        f = problem.evaluate(lo, end)
        x_old = problem.x[:, lo:end]
        window = s.positions[lo:end]
        active = p < hi
        problem.count_iteration(active)
        unfrozen = window[None, :] >= p[:, None]
        excess = s.tol.excess(x_old, f, lo)
        # A non-finite value at an unfrozen position stops the sample; it keeps its last
        # finite iterate (no write below touches it).
        broken = (~torch.isfinite(excess) & unfrozen).any(1)
        problem.fail(broken)
        unfrozen = unfrozen & ~broken[:, None]
        proposal = f
        if s.proposer is not None:
            first = unfrozen & (window[None, :] == p[:, None])
            proposal = s.proposer.propose(x_old, f, lo, unfrozen, first)
        # Freeze up to (and including) the first position that moved: its inputs had
        # settled, so its plain value is final; everything after it waits.
        moving = unfrozen & ~(excess <= 0)
        stop = torch.where(moving.any(1), lo + moving.int().argmax(1) + 1, end)
        stop = torch.where(active & ~broken, stop, torch.where(broken, hi, p))
        freezing = unfrozen & (window[None, :] < stop[:, None])
        x_new = torch.where(unfrozen[..., None], proposal, x_old)
        x_new = torch.where(freezing[..., None], f, x_new)
        if problem.tracing:
            residual = (x_new - x_old).abs().amax(-1).amax(-1)
        problem.x[:, lo:end] = x_new
        s.p = stop
        s.iterations += 1
        if problem.tracing:
            problem.record(s.module, s.iterations, residual)
        # The one synchronisation of the iteration: where the next window starts.
        lo_next, alive = torch.stack((stop.min(), problem.alive.any().long())).tolist()
        s.lo, s.any_alive = int(lo_next), bool(alive)
        if s.lo >= hi or s.iterations >= s.cap:
            problem.cap_reached(s.p < hi)
            problem.module_iterations.append(s.iterations)
            _next_module(self, problem, s)
        return s


def _next_module(method: PrefixMethod, problem: Problem, s: PrefixState) -> None:
    """Start the next module, or finish when there is none (or no sample is alive)."""
    s.module += 1
    modules = len(s.edges) - 1
    if s.module >= modules or not s.any_alive:
        # Modules never started (every sample failed) ran zero iterations.
        problem.module_iterations.extend([0] * max(modules - s.module, 0))
        s.finished = True
        return
    s.lo0, s.hi = s.edges[s.module], s.edges[s.module + 1]
    s.cap = method.cap(s.hi - s.lo0)
    s.iterations = 0
    s.p = torch.where(problem.alive, s.lo0, s.hi)
    s.lo = s.lo0
    s.proposer = method.proposer(problem, s.lo0, s.hi)

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

import math
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
    columns: Tensor | None = None  # (1, T): 0 .. T-1
    hi_column: Tensor | None = None  # (B,): hi


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
        state.columns = torch.arange(problem.length, device=problem.device)[None, :]
        _next_module(self, problem, state)
        return state

    def done(self, problem: Problem, state: PrefixState) -> bool:
        return state.finished

    def step(self, problem: Problem, state: PrefixState) -> PrefixState:
        # Written for few tensor operations: on small problems each costs more than the
        # arithmetic (see studies/bench_overhead.py).
        s = state
        lo, hi, p = s.lo, s.hi, s.p
        width = self.window()
        end = hi if width is None else min(hi, lo + width)
        f = problem.evaluate(lo, end)
        x_old = problem.x[:, lo:end]
        problem.count_iteration(p < hi)
        # Sample b's positions before p[b] are frozen.
        unfrozen = s.columns[:, lo:end] >= p[:, None]
        excess = s.tol.excess(x_old, f, lo)
        # A non-finite value stops the sample, which keeps its last finite iterate.  (Its
        # frozen positions are recomputed from final inputs, hence finite: one reduction
        # over the window suffices; NaN compares false.)
        ok = excess.amax(1) < math.inf
        problem.keep_alive(ok)
        # Freeze up to and including the first unfrozen position that moved: its inputs
        # had settled, so its plain value is final; everything after it waits.  Marking
        # the window's last column makes "nothing moved" land on `end`.
        moving = unfrozen & (excess > 0)
        moving[:, -1] = True
        stop = moving.to(torch.uint8).argmax(1) + (lo + 1)
        if end < hi:
            stop = torch.maximum(stop, p)  # frozen samples (p = hi) stay frozen
        stop = torch.where(ok, stop, s.hi_column)
        write = unfrozen & ok[:, None]
        if problem.tracing:
            before = x_old.clone()
        if s.proposer is None:
            torch.where(write[..., None], f, x_old, out=x_old)  # x_old is problem.x's view
        else:
            first = write & (s.columns[:, lo:end] == p[:, None])
            proposal = s.proposer.propose(x_old, f, lo, write, first)
            freezing = write & (s.columns[:, lo:end] < stop[:, None])
            x_new = torch.where(freezing[..., None], f,
                                torch.where(write[..., None], proposal, x_old))
            problem.x[:, lo:end] = x_new
        s.p = stop
        s.iterations += 1
        if problem.tracing:
            residual = (problem.x[:, lo:end] - before).abs().amax(-1).amax(-1)
            problem.record(s.module, s.iterations, residual)
        # The one synchronisation of the iteration: where the next window starts (hi + 1
        # means every sample has failed).
        s.lo = int(torch.where(problem.alive, stop, s.hi_column + 1).min())
        if s.lo >= hi or s.iterations >= s.cap:
            s.any_alive = s.lo <= hi
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
    s.hi_column = torch.full((problem.batch,), s.hi, device=problem.device)
    s.p = torch.where(problem.alive, s.lo0, s.hi_column)
    s.lo = s.lo0
    s.proposer = method.proposer(problem, s.lo0, s.hi)

"""Level scheduling: each dependency level evaluated once, exact in (levels) steps.

The level of position ``t`` is ``level(t) = 1 + max(level(s) for s that t reads)`` (``1``
for a position that reads nothing).  Every position of level ``l`` reads only positions
of lower levels, so once levels ``1 .. l-1`` are final one evaluation makes all of level
``l`` final.  The schedule is therefore exact in exactly (number of levels) dependent
steps, from any start, and never recomputes a position that is already final: the number
of levels is the longest dependency chain (for a linear map, the nilpotency index of its
matrix).  Jacobi reaches the same solution after as many iterations, but recomputes every
unfrozen position at every iteration, and without knowing the levels it needs one more
iteration to see that it has converged.  For a FInC convolution the levels are the
anti-diagonals of the image (the wavefront).

Where the levels come from: ``LevelSchedule(levels=tensor)``, else the map's own
``levels(length)`` method (a map that knows its structure declares it), else a
``TypeError``.  :func:`fixedpoint.levels_probe.dependency_levels` finds them for small
maps by probing.  Any ``levels`` with ``level(t) > level(s)`` for every dependence
``t <- s`` is a valid schedule; a tensor that violates this gives a wrong answer without
any sign of it (the schedule trusts its levels, that is where its speed comes from):
:func:`fixedpoint.levels_probe.check_levels` tests a tensor against a probed map.

How one level is evaluated: a map that can evaluate an arbitrary set of positions
(:class:`PositionMap`: ``evaluate_at(x, positions)``) computes just those positions;
any other map is called through the ordinary window interface on the smallest window
holding the level (``[min, max + 1)``) and only the level's positions are written.  Every
position before a level's first position has a lower level (a position of level
``m > l`` has a dependency chain through a position of level ``l`` before it), so that
window's committed prefix is final.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from .base import Method, Problem

__all__ = ["LevelSchedule", "PositionMap"]


@runtime_checkable
class PositionMap(Protocol):
    """A map that evaluates any set of positions, reading the iterate directly."""

    def evaluate_at(self, x: Tensor, positions: Tensor) -> Tensor:
        """``F(x)[:, positions]`` (shape ``(B, len(positions), d)``)."""


@dataclass(eq=False)
class _State:
    groups: list[Tensor]
    windows: list[tuple[int, int]]
    direct: bool
    next: int = 0
    finished: bool = False


@dataclass(frozen=True, eq=False)
class LevelSchedule(Method):
    """Evaluate each dependency level once, in order (see the module docstring).

    ``levels``: a 1-D integer tensor of length ``T`` (levels from 1), or None to use the
    map's ``levels(length)``.  No tolerance: the schedule is exact by construction.
    """

    levels: Tensor | None = None

    def __post_init__(self) -> None:
        if self.levels is not None:
            _check_levels(self.levels, None)

    def init(self, problem: Problem) -> _State:
        levels = self.levels
        if levels is None:
            declare = getattr(problem.fmap, "levels", None)
            if not callable(declare):
                raise TypeError(
                    f"{type(problem.fmap).__name__} declares no levels(length); pass "
                    "LevelSchedule(levels=...) (fixedpoint.levels_probe.dependency_levels "
                    "finds them for small maps)"
                )
            levels = declare(problem.length)
        _check_levels(levels, problem.length)
        levels = levels.to(device=problem.device, dtype=torch.long)
        order = torch.argsort(levels, stable=True)
        values, counts = torch.unique_consecutive(levels[order], return_counts=True)
        groups = list(torch.split(order, counts.tolist()))
        windows = [(int(g.min()), int(g.max()) + 1) for g in groups]
        # Decided once: a runtime protocol check is slow enough to show in a step.
        return _State(groups, windows, direct=isinstance(problem.fmap, PositionMap))

    def done(self, problem: Problem, state: _State) -> bool:
        if state.finished:
            return True
        if state.next < len(state.groups):
            return False
        problem.module_iterations.append(len(state.groups))
        state.finished = True
        return True

    def step(self, problem: Problem, state: _State) -> _State:
        positions = state.groups[state.next]
        lo, hi = state.windows[state.next]
        if state.direct:
            # Positions straight from the map: cost is exactly the level's positions.
            problem.dependent_steps += 1
            problem.token_evals += problem.batch * problem.rows * len(positions)
            f = problem.fmap.evaluate_at(problem.x, positions)
        else:
            f = problem.evaluate(lo, hi)[:, positions - lo]
        alive = problem.alive
        broken = ~torch.isfinite(f).flatten(1).all(1) & alive
        problem.fail(broken)
        keep = (alive & ~broken)[:, None, None]
        old = problem.x[:, positions]
        new = torch.where(keep, f, old)  # a failed sample keeps its last finite iterate
        problem.x[:, positions] = new
        problem.count_iteration(alive & ~broken)
        if problem.tracing:
            problem.record(0, state.next + 1, (new - old).abs().flatten(1).amax(1))
        state.next += 1
        return state


def _check_levels(levels: Tensor, length: int | None) -> None:
    if not isinstance(levels, Tensor) or levels.ndim != 1:
        raise ValueError("levels must be a 1-D tensor with one level per position")
    if levels.is_floating_point() or levels.is_complex() or levels.dtype == torch.bool:
        raise ValueError(f"levels must be an integer tensor, got {levels.dtype}")
    if length is not None and levels.shape[0] != length:
        raise ValueError(f"levels has {levels.shape[0]} positions, the system {length}")
    if levels.numel() == 0:
        return
    # Necessary for any causal map: position t has at most t positions before it.
    bound = torch.arange(1, levels.shape[0] + 1, device=levels.device)
    if bool((levels < 1).any()) or bool((levels > bound).any()):
        t = int(((levels < 1) | (levels > bound)).nonzero()[0])
        raise ValueError(
            f"level {int(levels[t])} at position {t} is impossible: levels start at 1 and "
            f"position t can be at most at level t + 1"
        )

"""Dependency levels of a strictly causal map, found by probing (for small maps).

The level of position ``t`` is ``1 + max(level(s) for s that t reads)`` (``1`` for a
position that reads nothing).  Evaluating all positions of one level at once, level after
level, solves ``x = F(x)`` exactly in (number of levels) dependent steps: the schedule of
:class:`fixedpoint.methods.levels.LevelSchedule`.  The number of levels is the length of
the longest dependency chain; for a linear map it is the nilpotency index of its matrix.

Maps that know their structure should declare it (a ``levels(length)`` method); the
probe here is for small maps whose structure is unknown.  It perturbs one input position
at a time (``T + 1`` evaluations, like :func:`fixedpoint.check_causal`) and records which
outputs move.  A dependence that is invisible at the probed point (a ReLU that is off for
every sample, a weight that is exactly zero) is not found, and a level schedule built on
missed dependencies is wrong: probe at a batch of generic points.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .result import NonCausalError

__all__ = ["check_levels", "dependency_levels", "dependency_matrix", "levels_from_dependencies"]


def dependency_matrix(F: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """Boolean ``(T, T)``: entry ``[t, s]`` is True when output ``t`` moved with input ``s``.

    Raises :class:`NonCausalError` if an output moves with an input at the same or a later
    position.  Any sample of the batch revealing a dependence counts.
    """
    if not isinstance(x, Tensor) or x.ndim != 3:
        raise ValueError("dependency_matrix needs a tensor x of shape (B, T, d)")
    length = x.shape[1]
    deps = torch.zeros(length, length, dtype=torch.bool)
    with torch.no_grad():
        base = F(x)
        if base.shape != x.shape:
            raise ValueError(f"F returned shape {tuple(base.shape)}, expected {tuple(x.shape)}")
        for s in range(length):
            bumped = x.clone()
            bumped[:, s] += 0.5 + 0.5 * bumped[:, s].abs()
            moved = (F(bumped) != base).flatten(2).any(-1).any(0).cpu()
            if bool(moved[: s + 1].any()):
                raise NonCausalError(int(moved[: s + 1].nonzero()[0]), s)
            deps[:, s] = moved
    return deps


def levels_from_dependencies(deps: Tensor) -> Tensor:
    """Levels ``(T,)`` (from 1) of a strictly lower-triangular boolean dependency matrix."""
    if deps.ndim != 2 or deps.shape[0] != deps.shape[1] or deps.dtype != torch.bool:
        raise ValueError("deps must be a square boolean matrix")
    if bool(torch.triu(deps).any()):
        raise ValueError("deps must be strictly lower triangular (a causal map)")
    length = deps.shape[0]
    levels = torch.ones(length, dtype=torch.long)
    for t in range(1, length):
        reads = deps[t, :t]
        if bool(reads.any()):
            levels[t] = 1 + int(levels[:t][reads].max())
    return levels


def dependency_levels(F: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """The dependency level of every position of ``F``, probed at ``x``: ``(T,)`` long."""
    return levels_from_dependencies(dependency_matrix(F, x))


def check_levels(F: Callable[[Tensor], Tensor], x: Tensor, levels: Tensor) -> None:
    """Raise ValueError unless ``levels`` is a valid schedule for ``F`` probed at ``x``.

    Valid: ``levels[t] > levels[s]`` for every dependence of output ``t`` on input ``s``
    (the levels need not be the smallest ones).  The message names a violated dependence.
    """
    deps = dependency_matrix(F, x)
    if not isinstance(levels, Tensor) or levels.shape != (deps.shape[0],):
        raise ValueError(f"levels must have shape ({deps.shape[0]},)")
    lv = levels.cpu().long()
    bad = deps & (lv[:, None] <= lv[None, :])
    if bool(bad.any()):
        t, s = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"position {t} (level {int(lv[t])}) reads position {s} (level {int(lv[s])}): "
            "a position's level must exceed the levels of everything it reads"
        )

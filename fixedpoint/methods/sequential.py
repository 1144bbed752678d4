"""Forward substitution: the baseline every speed-up is measured against."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Method, Problem

__all__ = ["Sequential"]


@dataclass(frozen=True)
class Sequential(Method):
    """Forward substitution (Gauss-Seidel, "the for loop"): one position per step.

    ``T`` iterations; on an incremental map about one full pass of work.  A position
    whose value needs no network call (TarFlow's ``x_0 = z_0``) is not a dependent
    step.  The loop is lean on purpose: one map call and one copy per position, and the
    finiteness check once at the end.  A sample that turned non-finite keeps its last
    finite iterate: the solved positions before the first non-finite value, and its
    initial guess from there on (later positions were computed from the bad value).
    """

    def init(self, problem: Problem) -> list[int]:
        return [0]  # the next position

    def done(self, problem: Problem, state: list[int]) -> bool:
        if state[0] < problem.length:
            return False
        _keep_last_finite(problem)
        problem.count_iteration(torch.ones_like(problem.alive))  # one iteration per position
        problem.sample_iterations += problem.length - 1
        problem.module_iterations.extend([1] * problem.length)
        return True

    def step(self, problem: Problem, state: list[int]) -> list[int]:
        t = state[0]
        f = problem.evaluate(t, t + 1)
        if problem.tracing:
            change = (f - problem.x[:, t : t + 1]).abs().flatten(1).amax(1)
        problem.x[:, t : t + 1] = f
        if problem.tracing:
            problem.record(t, 1, change)
        state[0] = t + 1
        return state


def _keep_last_finite(problem: Problem) -> None:
    bad = ~torch.isfinite(problem.x).all(-1)  # (B, T)
    if not bool(bad.any()):
        return
    failed = bad.any(1)
    first = bad.int().argmax(1)
    later = torch.arange(problem.length, device=problem.device)[None, :] >= first[:, None]
    restore = (failed[:, None] & later)[..., None]
    problem.x = torch.where(restore, problem.x0, problem.x)
    problem.fail(failed)

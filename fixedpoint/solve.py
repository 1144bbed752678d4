"""The one iteration driver: ``init``, then ``step`` until ``done``, for any method."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from .causality import check_causal
from .maps import IncrementalMap, as_incremental
from .methods.base import Method, Problem, clock
from .precision import (
    PrecisionWarning,
    arithmetic_name,
    iterate_scale,
    low_tolerances,
    precision_message,
    rounding_unit,
)
from .result import Result, SolveError, Status

__all__ = ["solve"]


def solve(
    F: Callable[[Tensor], Tensor] | IncrementalMap,
    x0: Tensor,
    method: Method,
    *,
    throw: bool = False,
    trace: bool = False,
    reference: Tensor | None = None,
    check_causality: bool = False,
    check_precision: bool = True,
) -> Result:
    """Solve the strictly causal system ``x = F(x)`` starting from ``x0``.

    Args:
        F: a callable on ``(B, T, d)`` tensors, strictly causal along dimension 1, or an
            :class:`~fixedpoint.IncrementalMap` that can evaluate windows from a cache.
        x0: initial guess, shape ``(B, T, d)``, floating point, finite; never modified.
        method: a :class:`~fixedpoint.Method`, e.g. ``Jacobi()``.
        throw: raise :class:`SolveError` when the status is not SUCCESS instead of
            returning the result with that status.
        trace: record one :class:`TraceRow` per iteration.
        reference: the known solution; with ``trace`` each row records the error to it.
        check_causality: probe ``F`` at a few positions before solving (a handful of
            extra evaluations, not counted in the cost) and raise
            :class:`NonCausalError` if it looks ahead.  :func:`check_causal` does the
            complete check.
        check_precision: warn (:class:`~fixedpoint.PrecisionWarning`) when an explicit
            ``atol``/``rtol`` of the method sits below the rounding floor of the
            arithmetic at the scale of ``x0`` (it is used as given).  Callers that
            checked already (``tarflow.reverse``) pass False.

    Failure contract (every method): a sample whose map value turns non-finite stops
    with status NONFINITE and keeps its last finite iterate; ``converged`` is False
    for it.  Costs are in the :class:`Result`.
    """
    _check_inputs(x0, method, reference)
    fmap = as_incremental(F)
    eps = rounding_unit(x0)
    if check_precision:
        _warn_low_tolerances(method, x0, eps)
    if check_causality:
        length = x0.shape[1]
        check_causal(fmap, x0, positions={0, length // 2, length - 1})
    with torch.no_grad():
        problem = Problem(fmap, x0, eps=eps, trace=trace, reference=reference)
        start = clock(x0.device)
        state = method.init(problem)
        steps = 0
        while not method.done(problem, state):
            state = method.step(problem, state)
            steps += 1
        if not problem.module_iterations:  # a method that does not report modules
            problem.module_iterations.append(steps)
        wall_time = clock(x0.device) - start
    result = problem.result(wall_time)
    if throw and result.status is not Status.SUCCESS:
        raise SolveError(result)
    return result


def _warn_low_tolerances(method: Method, x0: Tensor, eps: float) -> None:
    scale = iterate_scale(x0)
    low = low_tolerances(method, eps, scale)
    if low:
        text = precision_message(type(method).__name__, low, eps, False, arithmetic_name(x0))
        warnings.warn(text, PrecisionWarning, stacklevel=3)


def _check_inputs(x0: Tensor, method: Method, reference: Tensor | None) -> None:
    if not isinstance(method, Method):
        raise TypeError(
            "method must be a fixedpoint.Method (e.g. fp.Jacobi()); got "
            f"{type(method).__name__}"
        )
    if not isinstance(x0, Tensor):
        raise TypeError(f"x0 must be a torch.Tensor, got {type(x0).__name__}")
    if x0.ndim != 3:
        raise ValueError(f"x0 must have shape (B, T, d), got {tuple(x0.shape)}")
    if min(x0.shape) < 1:
        raise ValueError(f"x0 must be non-empty in every dimension, got {tuple(x0.shape)}")
    if not x0.is_floating_point():
        raise TypeError(f"x0 must be a floating-point tensor, got {x0.dtype}")
    bad = int((~torch.isfinite(x0)).sum())
    if bad:
        raise ValueError(f"x0 has {bad} non-finite entries; the initial guess must be finite")
    if reference is not None:
        if not isinstance(reference, Tensor) or reference.shape != x0.shape:
            got = tuple(reference.shape) if isinstance(reference, Tensor) else type(reference)
            raise ValueError(f"reference must have the shape of x0 {tuple(x0.shape)}, got {got}")

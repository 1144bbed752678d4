"""Assertions that compare a solve with an independent forward substitution.

No hypothesis here: these work in any test framework (or none).

Agreement tolerances (:func:`default_rtol`), as ``|x - x_ref| <= rtol * max(1, |x_ref|)``
per element:

* float64: ``1e-10``.  Solvers that freeze positions computed from a frozen prefix
  agree with forward substitution to rounding.  Measured (every triangular method, plain
  and incremental maps, toughness up to the caps in
  :data:`fixedpoint.testing.strategies.MAX_TOUGHNESS`, ``T`` up to 256, attention up to
  128): worst 6e-14; plain maps of affine/Markov kind agree to the bit.  A real error is
  of the order of an update, far above the bound.
* float32: ``1e-4``.  Forward substitution and a parallel solve round differently (a
  different reduction order, a different kernel for a window); the difference then
  propagates down the sequence with the system's sensitivity.  Measured on the same
  grid: worst 1.3e-5 relative (attention), 3.6e-6 (linear), 2.5e-7 (affine).
* bfloat16 / float16: ``5e-2``, an unmeasured sanity bound (the tests do not use it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..causality import check_causal
from ..maps import IncrementalMap
from ..methods import Jacobi, Method
from ..result import NonCausalError, Result, Status
from ..solve import solve
from .systems import TriangularSystem, forward_substitution

__all__ = [
    "EXACT",
    "default_rtol",
    "relative_error",
    "assert_close",
    "assert_matches_sequential",
    "assert_finite_termination",
    "assert_batch_independent",
    "assert_causal",
]

EXACT = {"atol": 0.0, "rtol": 0.0}
"""Tolerances that ask for exact agreement (finite termination decides)."""


def default_rtol(dtype: torch.dtype) -> float:
    """The documented agreement tolerance for ``dtype`` (see the module docstring)."""
    if dtype == torch.float64:
        return 1e-10
    if dtype == torch.float32:
        return 1e-4
    return 5e-2


def relative_error(x: Tensor, ref: Tensor) -> Tensor:
    """Elementwise ``|x - ref| / max(1, |ref|)`` (computed in float64)."""
    x64, r64 = x.double(), ref.double()
    return (x64 - r64).abs() / r64.abs().clamp(min=1.0)


def assert_close(x: Tensor, ref: Tensor, rtol: float | None = None, what: str = "x") -> None:
    """Assert ``|x - ref| <= rtol * max(1, |ref|)`` everywhere, naming the worst element."""
    if x.shape != ref.shape:
        raise AssertionError(f"{what}: shape {tuple(x.shape)} != {tuple(ref.shape)}")
    rtol = default_rtol(x.dtype) if rtol is None else rtol
    if x.numel() == 0:
        return
    if not bool(torch.isfinite(x).all()):
        where = tuple((~torch.isfinite(x)).nonzero()[0].tolist())
        raise AssertionError(f"{what}: non-finite value at (sample, position, dim) {where}")
    err = relative_error(x, ref)
    worst = float(err.max())
    if not worst <= rtol:
        where = tuple(int(i) for i in _unravel(int(err.argmax()), err.shape))
        raise AssertionError(
            f"{what}: relative error {worst:.3g} > rtol {rtol:.1g} at (sample, position, dim) "
            f"{where}: got {float(x[where]):.17g}, expected {float(ref[where]):.17g}"
        )


def _unravel(flat: int, shape: Sequence[int]) -> tuple[int, ...]:
    out = []
    for n in reversed(shape):
        flat, r = divmod(flat, n)
        out.append(r)
    return tuple(reversed(out))


def _reference(F: Any, x0: Tensor, reference: Tensor | None) -> Tensor:
    if reference is not None:
        return reference
    return forward_substitution(F, x0)


def assert_matches_sequential(
    F: Callable[[Tensor], Tensor] | IncrementalMap,
    x0: Tensor,
    method: Method,
    *,
    rtol: float | None = None,
    reference: Tensor | None = None,
    **solve_options: Any,
) -> Result:
    """Solve with ``method`` and assert SUCCESS and agreement with forward substitution.

    The reference is :func:`~fixedpoint.testing.systems.forward_substitution` (``T`` full
    evaluations of ``F``, independent of :func:`fixedpoint.solve`) unless ``reference``
    is given.  ``rtol`` defaults to :func:`default_rtol` of the dtype.  Works for any
    :class:`~fixedpoint.Method`, including one written outside the package.  Returns the
    result.
    """
    ref = _reference(F, x0, reference)
    res = solve(F, x0, method, **solve_options)
    if res.status is not Status.SUCCESS or not bool(res.converged.all()):
        raise AssertionError(f"{method}: {res.summary()}; sample status {res.sample_status}")
    assert_close(res.x, ref, rtol, what=f"{method}")
    return res


def _default_steps(length: int) -> list[int]:
    return sorted({k for k in (1, 2, 3, length // 2, length - 1, length) if 1 <= k <= length})


def assert_finite_termination(
    F: Callable[[Tensor], Tensor] | IncrementalMap,
    x0: Tensor,
    length: int | None = None,
    *,
    steps: Iterable[int] | None = None,
    rtol: float | None = None,
    reference: Tensor | None = None,
) -> None:
    """Assert Jacobi's finite termination from ``x0``.

    * ``fp.Jacobi(atol=0, rtol=0)`` succeeds within ``length`` iterations (default ``T``)
      and matches forward substitution;
    * for each ``k`` in ``steps`` (default ``1, 2, 3, T//2, T-1, T``),
      ``fp.Jacobi(max_iter=k)`` runs at most ``k`` iterations and positions ``< k``
      already match forward substitution; for ``k >= T`` everything matches and the
      status is SUCCESS.
    """
    T = x0.shape[1]
    bound = T if length is None else length
    ref = _reference(F, x0, reference)
    full = solve(F, x0, Jacobi(**EXACT))
    if full.status is not Status.SUCCESS or full.iterations > bound:
        raise AssertionError(f"Jacobi() did not finish within {bound} iterations: {full.summary()}")
    assert_close(full.x, ref, rtol, what="Jacobi()")
    for k in _default_steps(T) if steps is None else steps:
        res = solve(F, x0, Jacobi(max_iter=k, **EXACT))
        if res.iterations > k:
            raise AssertionError(f"Jacobi(max_iter={k}) ran {res.iterations} iterations")
        assert_close(res.x[:, :k], ref[:, :k], rtol, what=f"Jacobi(max_iter={k}) positions < {k}")
        if k >= T:
            if res.status is not Status.SUCCESS:
                raise AssertionError(f"Jacobi(max_iter={k} >= T) did not succeed: {res.summary()}")
            assert_close(res.x, ref, rtol, what=f"Jacobi(max_iter={k})")


def assert_batch_independent(
    system: TriangularSystem | Callable[[list[int]], Any],
    x0: Tensor,
    method: Method,
    *,
    rtol: float | None = None,
    iterations: bool | None = None,
    samples: Iterable[int] | None = None,
) -> None:
    """Assert that a sample's outcome does not depend on the other samples of the batch.

    ``system`` is a :class:`~fixedpoint.testing.systems.TriangularSystem` (its ``select``
    gives a sample alone) or a factory ``make(indices) -> F`` building the map for those
    samples.  Each sample (or those in ``samples``) is solved alone and compared with its
    row of the batched solve: the iterate (to ``rtol``), ``converged`` and the per-sample
    status, and with ``iterations`` the per-sample iteration count
    (``sample_iterations``) and, per module, that the batch ran exactly as long as its
    slowest sample.

    Exact iteration counts need evaluations that are batch-independent to the bit: with
    ``atol = rtol = 0`` a one-ulp difference can settle a position one iteration earlier.
    The plain maps of :mod:`fixedpoint.testing.systems` are (their products keep the batch
    dimension out of the kernel's shape); an *incremental* map is not, because the solver
    evaluates one window for the whole batch, starting at the slowest sample's first
    unfrozen position, and the window changes the rounding (measured: about one attention
    case in five differs by one iteration, either way).  So ``iterations=None`` checks
    the counts unless the map is an :class:`~fixedpoint.IncrementalMap` of its own.
    """
    make = system.select if isinstance(system, TriangularSystem) else system
    B = x0.shape[0]
    full_F = system if isinstance(system, TriangularSystem) else make(list(range(B)))
    if iterations is None:
        iterations = not isinstance(full_F, IncrementalMap)
    full = solve(full_F, x0, method)
    picked = range(B) if samples is None else samples
    singles = []
    for b in picked:
        one = solve(make([b]), x0[b : b + 1], method)
        singles.append(one)
        tag = f"{method}, sample {b} of {B}"
        if one.sample_status[0] is not full.sample_status[b]:
            raise AssertionError(
                f"{tag}: status alone {one.sample_status[0]} != in batch {full.sample_status[b]}"
            )
        if bool(one.converged[0]) != bool(full.converged[b]):
            raise AssertionError(f"{tag}: converged alone {bool(one.converged[0])} != in batch")
        if one.sample_status[0] is Status.SUCCESS:
            assert_close(full.x[b : b + 1], one.x, rtol, what=tag)
        if iterations:
            a, c = one.sample_iterations[0], full.sample_iterations[b]
            if a != c:
                raise AssertionError(f"{tag}: {a} iterations alone, {c} in the batch")
    if iterations and samples is None:
        for i, n in enumerate(full.module_iterations):
            slowest = max(one.module_iterations[i] for one in singles)
            if n != slowest:
                raise AssertionError(
                    f"{method}: module {i} ran {n} iterations in the batch, but its slowest "
                    f"sample alone needs {slowest}"
                )


def assert_causal(
    F: Callable[[Tensor], Tensor], x: Tensor, positions: Iterable[int] | None = None
) -> None:
    """Assert ``F`` is strictly causal around ``x`` (wraps :func:`fixedpoint.check_causal`)."""
    try:
        check_causal(F, x, positions)
    except NonCausalError as e:
        raise AssertionError(str(e)) from e

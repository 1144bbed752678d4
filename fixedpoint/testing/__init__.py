"""Helpers to property-test a solver or a map in a few lines (needs ``hypothesis``).

Strategies draw synthetic systems (:mod:`fixedpoint.systems`), initial guesses and
method configurations; assertions compare a solve with an independent forward
substitution::

    from hypothesis import given
    import fixedpoint as fp
    from fixedpoint import testing as fpt

    @given(fpt.solver_cases(max_length=64))
    def test_my_method(case):
        fpt.assert_matches_sequential(case.F, case.x0, case.method)

    def test_my_map_is_causal():
        fpt.assert_causal(my_map, torch.randn(2, 16, 3))

Tolerances (:func:`default_rtol`), as ``|x - x_ref| <= rtol * max(1, |x_ref|)`` per
element:

* float64: ``1e-10``.  Solvers that freeze positions computed from a frozen prefix
  agree with forward substitution to rounding.  Measured (every triangular method, plain
  and incremental maps, toughness up to the caps in :data:`MAX_TOUGHNESS`, ``T`` up to
  256, attention up to 128): worst 6e-14; plain maps of affine/Markov kind agree to
  the bit.  A real error is of the order of an update, far above the bound.
* float32: ``1e-4``.  Forward substitution and a parallel solve round differently
  (a different reduction order, a different kernel for a window); the difference then
  propagates down the sequence with the system's sensitivity.  Measured on the same
  grid: worst 1.3e-5 relative (attention), 3.6e-6 (linear), 2.5e-7 (affine).
* bfloat16 / float16: ``5e-2``, an unmeasured sanity bound (the tests do not use it).

The caps in :data:`MAX_TOUGHNESS` matter: beyond them the systems amplify rounding
along the sequence so much that two correct solvers can disagree at any tolerance.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from hypothesis import strategies as st
from torch import Tensor

from . import systems as _systems
from .causality import check_causal
from .maps import IncrementalMap
from .methods import Anderson, GSJacobi, Jacobi, Method, Sequential, TriangularAnderson
from .result import NonCausalError, Result, Status
from .solve import solve
from .systems import TriangularSystem, forward_substitution

__all__ = [
    "SYSTEM_KINDS",
    "EXACT_METHOD_KINDS",
    "METHOD_KINDS",
    "SolverCase",
    "make_system",
    "systems",
    "initial_guesses",
    "methods",
    "solver_cases",
    "default_rtol",
    "relative_error",
    "assert_close",
    "assert_matches_sequential",
    "assert_finite_termination",
    "assert_batch_independent",
    "assert_causal",
    "forward_substitution",
]

SYSTEM_KINDS = ("linear", "affine", "attention", "markov")
"""Kinds accepted by :func:`make_system` and :func:`systems`."""

EXACT_METHOD_KINDS = ("sequential", "jacobi", "gsjacobi", "triangular_anderson")
"""Methods that end exact (tol 0) within ``T`` iterations on any strictly causal map."""

METHOD_KINDS = (*EXACT_METHOD_KINDS, "anderson")

#: Largest toughness drawn per kind.  Beyond these the systems become chaotic along the
#: sequence: a perturbation of 1e-9 at position 0 moves position 255 by a factor 50 to 1e8
#: more (measured: linear 1.5 -> 1e2, 2.0 -> 3e3; affine 3.0 -> 750; attention 1.5 -> 55;
#: markov 2.0 -> 56, 3.0 -> 4e8), so any two correct solvers, rounding differently, may
#: disagree far beyond rounding.  At these caps the amplification is below ~10.
MAX_TOUGHNESS = {"linear": 1.0, "affine": 2.0, "attention": 1.2, "markov": 1.5}

#: Dense linear systems keep a (T*d)^2 matrix: cap T*d.
LINEAR_MAX_SIZE = 1024


# ----------------------------------------------------------------------------------------
# Tolerances
# ----------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------
# Systems
# ----------------------------------------------------------------------------------------
def make_system(
    kind: str,
    batch: int,
    length: int,
    dim: int,
    *,
    toughness: float = 1.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: Any = None,
) -> TriangularSystem:
    """Build a random system of ``kind`` (one of :data:`SYSTEM_KINDS`)."""
    kw = dict(toughness=toughness, seed=seed, dtype=dtype, device=device)
    if kind == "linear":
        return _systems.LinearSystem.random(batch, length, dim, **kw)
    if kind == "affine":
        return _systems.AffineAutoregressive.random(batch, length, dim, **kw)
    if kind == "attention":
        return _systems.AttentionAutoregressive.random(batch, length, dim, **kw)
    if kind == "markov":
        return _systems.MarkovSystem.random(batch, length, dim, **kw)
    raise ValueError(f"unknown system kind {kind!r}; expected one of {SYSTEM_KINDS}")


@st.composite
def systems(
    draw,
    *,
    min_length: int = 1,
    max_length: int = 64,
    max_batch: int = 4,
    max_dim: int = 8,
    kinds: Sequence[str] = SYSTEM_KINDS,
    dtypes: Sequence[torch.dtype] = (torch.float64,),
    max_toughness: float | None = None,
    device: Any = None,
) -> TriangularSystem:
    """Draw a random synthetic system (a :class:`~fixedpoint.systems.TriangularSystem`).

    Short sequences (``T <= 12``, where edge cases live) are drawn more often than
    long ones, but the whole range up to ``max_length`` is covered.
    Linear systems keep ``T * d <= 1024``.
    """
    kind = draw(st.sampled_from(tuple(kinds)))
    small = min(max_length, max(min_length, 12))
    length = draw(st.integers(min_length, small) | st.integers(min_length, max_length))
    batch = draw(st.integers(1, max_batch))
    dim = draw(st.integers(1, max_dim))
    if kind == "linear":
        dim = max(1, min(dim, LINEAR_MAX_SIZE // length))
    top = MAX_TOUGHNESS[kind] if max_toughness is None else min(max_toughness, MAX_TOUGHNESS[kind])
    typical = tuple(v for v in (0.0, 0.3, 1.0) if v < top) + (top,)
    toughness = draw(st.sampled_from(typical) | st.floats(0.0, top))
    seed = draw(st.integers(0, 2**31 - 1))
    dtype = draw(st.sampled_from(tuple(dtypes)))
    return make_system(
        kind, batch, length, dim, toughness=toughness, seed=seed, dtype=dtype, device=device
    )


GUESS_KINDS = ("zeros", "noise", "solution", "prefix", "near", "consistent")


@st.composite
def initial_guesses(draw, system: TriangularSystem, kinds: Sequence[str] = GUESS_KINDS) -> Tensor:
    """Draw an initial guess for ``system``, chosen per sample among ``kinds``.

    ``zeros``; ``noise`` (Gaussian, scale 0.1 to 10); ``solution`` (the exact solution);
    ``prefix`` (exact on a random prefix, noise after); ``near`` (solution plus 1e-9 noise);
    ``consistent`` (the solution with position ``k`` moved, and positions after ``k``
    recomputed by forward substitution from the moved value: an adversarial start whose
    suffix already satisfies ``x_t = F(x)_t`` exactly, so a solver that freezes a
    position merely because its update was zero stops at a wrong answer; for ``T > 64``
    it falls back to ``prefix``, to bound the cost);
    ``huge`` (not drawn by default: scale 1e3, overflows ``overflow=True`` systems).
    """
    B, T, _ = system.shape
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(system.shape, generator=g, dtype=torch.float64)
    needs_solution = any(k in kinds for k in ("solution", "prefix", "near", "consistent"))
    consistent: list[tuple[int, int]] = []
    sol = system.solution().double().cpu() if needs_solution else None
    x = torch.zeros(system.shape, dtype=torch.float64)
    for b in range(B):
        kind = draw(st.sampled_from(tuple(kinds)))
        if kind == "zeros":
            continue
        if kind == "noise":
            x[b] = draw(st.sampled_from((0.1, 1.0, 10.0))) * noise[b]
        elif kind == "huge":
            x[b] = 1e3 * noise[b]
        elif kind == "solution":
            x[b] = sol[b]
        elif kind == "prefix":
            k = draw(st.integers(0, T))
            x[b] = noise[b]
            x[b, :k] = sol[b, :k]
        elif kind == "near":
            x[b] = sol[b] + 1e-9 * noise[b]
        elif kind == "consistent" and T > 64:
            # Too many map evaluations to build; an exact prefix is the closest cheap start.
            k = draw(st.integers(0, T))
            x[b] = noise[b]
            x[b, :k] = sol[b, :k]
        elif kind == "consistent":
            k = draw(st.integers(0, T - 1))
            x[b] = sol[b]
            x[b, k] += 1.0 + noise[b, k].abs()
            consistent.append((b, k))
        else:
            raise ValueError(f"unknown guess kind {kind!r}; expected one of {GUESS_KINDS}")
    if needs_solution and not bool(torch.isfinite(x).all()):
        x = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    x = x.to(dtype=system.dtype, device=system.device)
    if consistent:
        # Recompute each moved sample's suffix with full evaluations of the map, as a
        # solver does, so that x_t == F(x)_t holds to the bit after the moved position.
        start = min(k for _, k in consistent)
        with torch.no_grad():
            for t in range(start + 1, T):
                f = system(x)[:, t]
                for b, k in consistent:
                    if t > k:
                        x[b, t] = f[b]
        if not bool(torch.isfinite(x).all()):
            x = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    return x


@st.composite
def _boundaries(draw, length: int) -> tuple[int, ...]:
    inner = draw(st.sets(st.integers(1, length - 1), max_size=min(length - 1, 12)))
    return (0, *sorted(inner))


EXACT = {"atol": 0.0, "rtol": 0.0}
"""Tolerances that ask for exact agreement (finite termination decides)."""


@st.composite
def methods(
    draw,
    length: int,
    kinds: Sequence[str] = EXACT_METHOD_KINDS,
    dtype: torch.dtype = torch.float64,
) -> Method:
    """Draw a method configuration for sequences of ``length`` positions.

    Exact kinds use ``atol = rtol = 0`` and the default caps, so they must end at the
    sequential solution.  GS-Jacobi draws module counts (divisors of ``T`` or not) and
    explicit boundaries.  ``anderson`` (not in the default ``kinds``) draws a safeguarded
    Anderson with a tolerance a little above the dtype's rounding and a generous cap.
    """
    kind = draw(st.sampled_from(tuple(kinds)))
    if kind == "sequential":
        return Sequential()
    if kind == "jacobi":
        return draw(st.sampled_from((Jacobi(**EXACT), Jacobi(max_iter=length, **EXACT))))
    if kind == "gsjacobi":
        if length > 1 and draw(st.booleans()):
            return GSJacobi(modules=draw(_boundaries(length)), **EXACT)
        divisors = [g for g in range(1, length + 1) if length % g == 0]
        count = draw(st.sampled_from(divisors) | st.integers(1, length))
        return GSJacobi(modules=count, **EXACT)
    if kind == "triangular_anderson":
        memory = draw(st.integers(1, 5))
        ridge = draw(st.sampled_from((1e-8, 1e-4, 0.0)))
        return TriangularAnderson(memory=memory, ridge=ridge, **EXACT)
    if kind == "anderson":
        memory = draw(st.integers(1, 6))
        damping = draw(st.sampled_from((1.0, 0.7)))
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        return Anderson(memory=memory, damping=damping, atol=tol, max_iter=max(200, 4 * length))
    raise ValueError(f"unknown method kind {kind!r}; expected one of {METHOD_KINDS}")


@dataclass(frozen=True)
class SolverCase:
    """A system, the map handed to the solver (the system, or its plain view), a start
    and a method."""

    system: TriangularSystem
    F: Callable[[Tensor], Tensor] | IncrementalMap
    x0: Tensor
    method: Method

    @property
    def incremental(self) -> bool:
        return isinstance(self.F, IncrementalMap)


@st.composite
def solver_cases(
    draw,
    *,
    method_kinds: Sequence[str] = EXACT_METHOD_KINDS,
    guess_kinds: Sequence[str] = GUESS_KINDS,
    **system_options: Any,
) -> SolverCase:
    """Draw a :class:`SolverCase`; ``system_options`` go to :func:`systems`.

    Attention systems are handed over either as the incremental map itself or as a plain
    callable, so both evaluation paths of the solver are exercised.
    """
    system = draw(systems(**system_options))
    x0 = draw(initial_guesses(system, guess_kinds))
    F: Any = system
    if isinstance(system, _systems.AttentionAutoregressive) and draw(st.booleans()):
        F = system.plain()
    method = draw(methods(system.length, method_kinds, system.dtype))
    return SolverCase(system, F, x0, method)


# ----------------------------------------------------------------------------------------
# Assertions
# ----------------------------------------------------------------------------------------
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

    The reference is :func:`~fixedpoint.systems.forward_substitution` (``T`` full
    evaluations of ``F``, independent of :func:`fixedpoint.solve`) unless ``reference``
    is given.  ``rtol`` defaults to :func:`default_rtol` of the dtype.  Returns the result.
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

    * ``fp.Jacobi(atol=0, rtol=0)`` succeeds within ``length`` iterations (default ``T``) and
      matches forward substitution;
    * for each ``k`` in ``steps`` (default ``1, 2, 3, T//2, T-1, T``), ``fp.Jacobi(max_iter=k)``
      runs at most ``k`` iterations and positions ``< k`` already match forward
      substitution; for ``k >= T`` everything matches and the status is SUCCESS.
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

    ``system`` is a :class:`~fixedpoint.systems.TriangularSystem` (its ``select`` gives a
    sample alone) or a factory ``make(indices) -> F`` building the map for those samples.
    Each sample (or those in ``samples``) is solved alone and compared with its row of the
    batched solve: the iterate (to ``rtol``), ``converged`` and the per-sample status, and
    with ``iterations`` the per-sample iteration count (``sample_iterations``) and, per
    module, that the batch ran exactly as long as its slowest sample.

    Exact iteration counts need evaluations that are batch-independent to the bit: with
    ``tol = 0`` a one-ulp difference can settle a position one iteration earlier.  Plain
    maps in :mod:`fixedpoint.systems` are; an *incremental* map is not, because the solver
    evaluates one window for the whole batch, starting at the slowest sample's first
    unfrozen position, and the window changes the rounding (measured: about one attention
    case in five differs by one iteration, either way).  So ``iterations=None`` checks the
    counts unless the map is an :class:`~fixedpoint.IncrementalMap` of its own.
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
        if iterations and hasattr(one, "sample_iterations"):
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

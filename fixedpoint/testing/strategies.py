"""Hypothesis strategies: random systems, initial guesses, method configurations.

The only module of :mod:`fixedpoint.testing` that imports ``hypothesis``.  Each ``kinds``
selector names entries of one dict (name -> constructor): :data:`RANDOM_SYSTEMS` for
systems, :data:`GUESSES` for initial guesses, :data:`METHODS` for methods.

The caps in :data:`MAX_TOUGHNESS` matter: beyond them the systems amplify rounding along
the sequence so much that two correct solvers can disagree at any tolerance.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from hypothesis import strategies as st
from torch import Tensor

from ..maps import IncrementalMap
from ..methods import Anderson, GSJacobi, Jacobi, Method, Sequential, TriangularAnderson
from .assertions import EXACT
from .systems import RANDOM_SYSTEMS, SYSTEM_KINDS, AttentionAutoregressive, TriangularSystem

__all__ = [
    "EXACT_METHOD_KINDS",
    "GUESSES",
    "GUESS_KINDS",
    "LINEAR_MAX_SIZE",
    "MAX_TOUGHNESS",
    "METHODS",
    "METHOD_KINDS",
    "SolverCase",
    "initial_guesses",
    "methods",
    "solver_cases",
    "systems",
]

#: Largest toughness drawn per kind.  Beyond these the systems become chaotic along the
#: sequence: a perturbation of 1e-9 at position 0 moves position 255 by a factor 50 to 1e8
#: more (measured: linear 1.5 -> 1e2, 2.0 -> 3e3; affine 3.0 -> 750; attention 1.5 -> 55;
#: markov 2.0 -> 56, 3.0 -> 4e8), so any two correct solvers, rounding differently, may
#: disagree far beyond rounding.  At these caps the amplification is below ~10.
MAX_TOUGHNESS = {"linear": 1.0, "affine": 2.0, "attention": 1.2, "markov": 1.5}

#: Dense linear systems keep a (T*d)^2 matrix: cap T*d.
LINEAR_MAX_SIZE = 1024


# ----------------------------------------------------------------------------------------
# Systems
# ----------------------------------------------------------------------------------------
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
    """Draw a random synthetic system (a :class:`~fixedpoint.testing.systems.TriangularSystem`).

    ``kinds`` are keys of :data:`~fixedpoint.testing.systems.RANDOM_SYSTEMS`.  Short
    sequences (``T <= 12``, where edge cases live) are drawn more often than long ones,
    but the whole range up to ``max_length`` is covered.  Linear systems keep
    ``T * d <= 1024``.
    """
    unknown = [k for k in kinds if k not in RANDOM_SYSTEMS]
    if unknown:
        raise ValueError(f"unknown system kinds {unknown}; expected some of {SYSTEM_KINDS}")
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
    return RANDOM_SYSTEMS[kind](
        batch, length, dim, toughness=toughness, seed=seed, dtype=dtype, device=device
    )


# ----------------------------------------------------------------------------------------
# Initial guesses: one function per kind, drawing one sample's row
# ----------------------------------------------------------------------------------------
@dataclass
class _GuessContext:
    draw: Any
    noise: Tensor  # (T, d) float64
    solution: Tensor | None  # (T, d) float64
    length: int
    moved: int | None = None  # set by "consistent": the moved position


def _zeros(c: _GuessContext) -> Tensor:
    return torch.zeros_like(c.noise)


def _noise(c: _GuessContext) -> Tensor:
    return c.draw(st.sampled_from((0.1, 1.0, 10.0))) * c.noise


def _huge(c: _GuessContext) -> Tensor:
    return 1e3 * c.noise


def _solution(c: _GuessContext) -> Tensor:
    return c.solution.clone()


def _prefix(c: _GuessContext) -> Tensor:
    k = c.draw(st.integers(0, c.length))
    x = c.noise.clone()
    x[:k] = c.solution[:k]
    return x


def _near(c: _GuessContext) -> Tensor:
    return c.solution + 1e-9 * c.noise


def _consistent(c: _GuessContext) -> Tensor:
    if c.length > 64:
        # Too many map evaluations to build; an exact prefix is the closest cheap start.
        return _prefix(c)
    k = c.draw(st.integers(0, c.length - 1))
    x = c.solution.clone()
    x[k] += 1.0 + c.noise[k].abs()
    c.moved = k
    return x


GUESSES: dict[str, Callable[[_GuessContext], Tensor]] = {
    "zeros": _zeros,
    "noise": _noise,
    "solution": _solution,
    "prefix": _prefix,
    "near": _near,
    "consistent": _consistent,
    "huge": _huge,
}
"""Initial-guess kinds (see :func:`initial_guesses`)."""

GUESS_KINDS = ("zeros", "noise", "solution", "prefix", "near", "consistent")
"""The kinds :func:`initial_guesses` draws by default (all but ``huge``)."""

_NEEDS_SOLUTION = frozenset(("solution", "prefix", "near", "consistent"))


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
    unknown = [k for k in kinds if k not in GUESSES]
    if unknown:
        raise ValueError(f"unknown guess kinds {unknown}; expected some of {tuple(GUESSES)}")
    B, T, _ = system.shape
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(system.shape, generator=g, dtype=torch.float64)
    sol = system.solution().double().cpu() if _NEEDS_SOLUTION & set(kinds) else None
    x = torch.zeros(system.shape, dtype=torch.float64)
    consistent: list[tuple[int, int]] = []
    for b in range(B):
        kind = draw(st.sampled_from(tuple(kinds)))
        ctx = _GuessContext(draw, noise[b], None if sol is None else sol[b], T)
        x[b] = GUESSES[kind](ctx)
        if ctx.moved is not None:
            consistent.append((b, ctx.moved))
    if sol is not None and not bool(torch.isfinite(x).all()):
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


# ----------------------------------------------------------------------------------------
# Methods: one strategy builder per kind
# ----------------------------------------------------------------------------------------
@st.composite
def _boundaries(draw, length: int) -> tuple[int, ...]:
    inner = draw(st.sets(st.integers(1, length - 1), max_size=min(length - 1, 12)))
    return (0, *sorted(inner))


def _sequential(length: int, dtype: torch.dtype) -> st.SearchStrategy[Method]:
    return st.just(Sequential())


def _jacobi(length: int, dtype: torch.dtype) -> st.SearchStrategy[Method]:
    return st.sampled_from((Jacobi(**EXACT), Jacobi(max_iter=length, **EXACT)))


def _gsjacobi(length: int, dtype: torch.dtype) -> st.SearchStrategy[Method]:
    divisors = [g for g in range(1, length + 1) if length % g == 0]
    counts = (st.sampled_from(divisors) | st.integers(1, length)).map(
        lambda g: GSJacobi(modules=g, **EXACT)
    )
    if length == 1:
        return counts
    explicit = _boundaries(length).map(lambda m: GSJacobi(modules=m, **EXACT))
    return explicit | counts


def _triangular_anderson(length: int, dtype: torch.dtype) -> st.SearchStrategy[Method]:
    return st.builds(
        lambda memory, ridge: TriangularAnderson(memory=memory, ridge=ridge, **EXACT),
        st.integers(1, 5),
        st.sampled_from((1e-8, 1e-4, 0.0)),
    )


def _anderson(length: int, dtype: torch.dtype) -> st.SearchStrategy[Method]:
    atol = 1e-12 if dtype == torch.float64 else 1e-5
    return st.builds(
        lambda memory, damping: Anderson(
            memory=memory, damping=damping, atol=atol, max_iter=max(200, 4 * length)
        ),
        st.integers(1, 6),
        st.sampled_from((1.0, 0.7)),
    )


METHODS: dict[str, Callable[[int, torch.dtype], st.SearchStrategy[Method]]] = {
    "sequential": _sequential,
    "jacobi": _jacobi,
    "gsjacobi": _gsjacobi,
    "triangular_anderson": _triangular_anderson,
    "anderson": _anderson,
}
"""Method kinds: name -> ``(length, dtype) -> strategy`` (see :func:`methods`)."""

EXACT_METHOD_KINDS = ("sequential", "jacobi", "gsjacobi", "triangular_anderson")
"""Methods that end exact (tol 0) within ``T`` iterations on any strictly causal map."""

METHOD_KINDS = tuple(METHODS)


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
    unknown = [k for k in kinds if k not in METHODS]
    if unknown:
        raise ValueError(f"unknown method kinds {unknown}; expected some of {METHOD_KINDS}")
    kind = draw(st.sampled_from(tuple(kinds)))
    return draw(METHODS[kind](length, dtype))


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
    if isinstance(system, AttentionAutoregressive) and draw(st.booleans()):
        F = system.plain()
    method = draw(methods(system.length, method_kinds, system.dtype))
    return SolverCase(system, F, x0, method)

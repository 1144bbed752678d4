"""Solver configurations: small frozen objects, validated on construction.

A method says *how* to iterate; :func:`fixedpoint.solve` does the iterating.  Every
method here reaches the unique solution of a strictly causal system ``x = F(x)``.

Tolerance semantics (shared by all methods): position ``t`` of sample ``b`` has settled
when every component of its last update satisfies ``|x_new - x_old| <= tol + rtol*|x_new|``.
With ``tol = rtol = 0`` only exact agreement settles a position, and the finite-termination
argument still ends every triangular method after at most ``T`` iterations.
"""

from __future__ import annotations

from dataclasses import dataclass


def _check_tolerances(tol: float, rtol: float) -> None:
    for name, value in (("tol", tol), ("rtol", rtol)):
        if not isinstance(value, (int, float)) or value != value or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if value == float("inf"):
            raise ValueError(f"{name} must be finite, got inf")


def _check_max_iter(max_iter: int | None) -> None:
    if max_iter is None:
        return
    if not isinstance(max_iter, int) or isinstance(max_iter, bool) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive int or None, got {max_iter!r}")


@dataclass(frozen=True)
class Sequential:
    """Forward substitution (Gauss-Seidel, "the for loop"): one position per step.

    Costs ``T`` dependent steps; on an incremental map about one full pass of work.
    """


@dataclass(frozen=True)
class Jacobi:
    """Parallel fixed-point iteration ``x <- F(x)`` on all unsettled positions at once.

    ``max_iter=None`` means ``T``: the finite-termination bound, so with the default the
    iteration always ends exact.  A smaller cap trades accuracy for steps.
    """

    tol: float = 0.0
    rtol: float = 0.0
    max_iter: int | None = None

    def __post_init__(self) -> None:
        _check_tolerances(self.tol, self.rtol)
        _check_max_iter(self.max_iter)


Modules = int | tuple[int, ...]


@dataclass(frozen=True)
class GSJacobi:
    """Block Gauss-Seidel over modules, Jacobi inside each module.

    ``modules`` is either a count ``G`` (``T`` need not be divisible by it: the first
    ``T % G`` modules are one position longer) or a tuple of module start indices that
    begins with 0.  ``max_iter`` caps the Jacobi iterations of *each* module
    (``None``: the module width, which is always enough).  ``modules=1`` is Jacobi;
    ``modules=T`` is sequential.
    """

    modules: Modules = 1
    max_iter: int | None = None
    tol: float = 0.0
    rtol: float = 0.0

    def __post_init__(self) -> None:
        _check_tolerances(self.tol, self.rtol)
        _check_max_iter(self.max_iter)
        m = self.modules
        if isinstance(m, bool) or not isinstance(m, (int, tuple)):
            raise TypeError(f"modules must be an int or a tuple of start indices, got {m!r}")
        if isinstance(m, int):
            if m < 1:
                raise ValueError(f"modules must be >= 1, got {m}")
        else:
            if not m or m[0] != 0:
                raise ValueError(f"module boundaries must start with 0, got {m}")
            if any(not isinstance(b, int) or isinstance(b, bool) for b in m):
                raise TypeError(f"module boundaries must be ints, got {m}")
            if any(b >= a for a, b in zip(m[1:], m)):
                raise ValueError(f"module boundaries must be strictly increasing, got {m}")

    def boundaries(self, length: int) -> tuple[int, ...]:
        """Module edges ``(0, e_1, ..., length)`` for a sequence of ``length`` positions."""
        if isinstance(self.modules, int):
            g = self.modules
            if g > length:
                raise ValueError(f"modules={g} exceeds the sequence length T={length}")
            size, extra = divmod(length, g)
            edges = [0]
            for i in range(g):
                edges.append(edges[-1] + size + (1 if i < extra else 0))
            return tuple(edges)
        if self.modules[-1] >= length:
            raise ValueError(
                f"module start {self.modules[-1]} is outside the sequence length T={length}"
            )
        return (*self.modules, length)


@dataclass(frozen=True)
class Anderson:
    """Type-II Anderson acceleration over the whole sequence, safeguarded.

    Each sample keeps its own history of the last ``memory`` iterate and residual
    differences and mixes them by ridge-regularised least squares.  Mixing couples
    later positions into earlier ones, so the triangular structure and its finite
    termination are lost; the safeguards make failure visible instead of silent: a
    non-finite mixed step, or one whose residual grew by more than ``growth``, is
    rejected in favour of the plain step and the history restarts.  A sample converges
    when every component of its residual ``F(x) - x`` meets the tolerance.
    """

    memory: int = 5
    ridge: float = 1e-8
    damping: float = 1.0
    tol: float = 1e-6
    rtol: float = 0.0
    max_iter: int = 100
    growth: float = 2.0

    def __post_init__(self) -> None:
        _check_tolerances(self.tol, self.rtol)
        _check_max_iter(self.max_iter)
        if not isinstance(self.memory, int) or self.memory < 1:
            raise ValueError(f"memory must be a positive int, got {self.memory!r}")
        if not self.ridge >= 0:
            raise ValueError(f"ridge must be >= 0, got {self.ridge!r}")
        if not 0 < self.damping <= 1:
            raise ValueError(f"damping must be in (0, 1], got {self.damping!r}")
        if not self.growth >= 1:
            raise ValueError(f"growth must be >= 1, got {self.growth!r}")


@dataclass(frozen=True)
class TriangularAnderson:
    """Triangular Anderson acceleration (ParaTAA, Tang et al. 2024).

    Position ``t`` mixes its history with coefficients fitted on the causal prefix
    ``s <= t`` only, so no position looks ahead.  The first unsettled position takes the
    plain step, which keeps Jacobi's finite termination (at most ``T`` iterations).
    """

    memory: int = 3
    ridge: float = 1e-8
    tol: float = 0.0
    rtol: float = 0.0
    max_iter: int | None = None

    def __post_init__(self) -> None:
        _check_tolerances(self.tol, self.rtol)
        _check_max_iter(self.max_iter)
        if not isinstance(self.memory, int) or self.memory < 1:
            raise ValueError(f"memory must be a positive int, got {self.memory!r}")
        if not self.ridge >= 0:
            raise ValueError(f"ridge must be >= 0, got {self.ridge!r}")


Method = Sequential | Jacobi | GSJacobi | Anderson | TriangularAnderson

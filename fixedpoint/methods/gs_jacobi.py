"""Block Gauss-Seidel over modules, Jacobi inside each (the GS-Jacobi of Liu & Qin 2025)."""

from __future__ import annotations

from dataclasses import dataclass

from .sweep import PrefixMethod
from .tolerance import ToleranceLike, check_max_iter, check_tolerance

__all__ = ["GSJacobi", "Modules"]

Modules = int | tuple[int, ...]


@dataclass(frozen=True)
class GSJacobi(PrefixMethod):
    """Block Gauss-Seidel over modules, Jacobi inside each module.

    ``modules`` is either a count ``G`` (``T`` need not be divisible by it: the first
    ``T % G`` modules are one position longer) or a tuple of module start indices that
    begins with 0.  ``max_iter`` caps the Jacobi iterations of *each* module (``None``:
    the module width, which is always enough).  ``modules=1`` is Jacobi; ``modules=T``
    is sequential.  Block Picard (Chen et al. 2024) is this method with a fixed
    iteration count per module: ``GSJacobi(modules=N, max_iter=K, atol=0, rtol=0)``.
    """

    modules: Modules = 1
    max_iter: int | None = None
    atol: ToleranceLike = None
    rtol: ToleranceLike = None

    def __post_init__(self) -> None:
        check_tolerance("atol", self.atol)
        check_tolerance("rtol", self.rtol)
        check_max_iter(self.max_iter)
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

    def edges(self, length: int) -> tuple[int, ...]:
        return self.boundaries(length)

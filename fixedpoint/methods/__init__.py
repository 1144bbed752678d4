"""Solver methods: small frozen configuration objects on one protocol.

A method says *how* to iterate; :func:`fixedpoint.solve` does the iterating.  The
protocol (``init`` / ``step`` / ``done`` on a :class:`Problem`) is documented in
:mod:`fixedpoint.methods.base`; the frozen-prefix machinery shared by the triangular
methods in :mod:`fixedpoint.methods.sweep`; tolerances in
:mod:`fixedpoint.methods.tolerance`.  One file per method.
"""

from .anderson import Anderson
from .base import Method, Problem
from .gs_jacobi import GSJacobi, Modules
from .jacobi import Jacobi
from .levels import LevelSchedule, PositionMap
from .newton import Newton
from .sequential import Sequential
from .sweep import PrefixMethod, PrefixState, Proposer
from .tolerance import Tolerance, ToleranceLike
from .triangular_anderson import TriangularAnderson
from .window import SlidingWindow

__all__ = [
    "Anderson",
    "GSJacobi",
    "Jacobi",
    "LevelSchedule",
    "Method",
    "Modules",
    "Newton",
    "PositionMap",
    "PrefixMethod",
    "PrefixState",
    "Problem",
    "Proposer",
    "Sequential",
    "SlidingWindow",
    "Tolerance",
    "ToleranceLike",
    "TriangularAnderson",
]

"""fixedpoint: parallel solvers for triangular (causal) nonlinear systems ``x = F(x)``.

>>> import fixedpoint as fp
>>> result = fp.solve(F, x0, fp.GSJacobi(modules=4))   # doctest: +SKIP
"""

from .causality import check_causal
from .levels_probe import check_levels, dependency_levels
from .maps import IncrementalMap, PlainMap, as_incremental
from .methods import (
    Anderson,
    GSJacobi,
    Jacobi,
    LevelSchedule,
    Method,
    Newton,
    PrefixMethod,
    Problem,
    Sequential,
    SlidingWindow,
    TriangularAnderson,
)
from .precision import PrecisionWarning, meaningful_tolerance, noise_floor, rounding_unit
from .result import NonCausalError, Result, SolveError, Status, TraceRow
from .solve import solve

__version__ = "0.1.0"

__all__ = [
    "Anderson",
    "GSJacobi",
    "IncrementalMap",
    "Jacobi",
    "LevelSchedule",
    "Method",
    "Newton",
    "NonCausalError",
    "PlainMap",
    "PrecisionWarning",
    "PrefixMethod",
    "Problem",
    "Result",
    "Sequential",
    "SlidingWindow",
    "SolveError",
    "Status",
    "TraceRow",
    "TriangularAnderson",
    "as_incremental",
    "check_causal",
    "check_levels",
    "dependency_levels",
    "meaningful_tolerance",
    "noise_floor",
    "rounding_unit",
    "solve",
]

"""Helpers to test a solver, a method or a map in a few lines.

Three modules, layered on the core (``fixedpoint`` itself) and below everything else:

* :mod:`fixedpoint.testing.systems`: synthetic triangular systems with known solutions
  (no hypothesis needed);
* :mod:`fixedpoint.testing.assertions`: comparisons with an independent forward
  substitution, at the documented tolerances (:func:`default_rtol`; no hypothesis);
* :mod:`fixedpoint.testing.strategies`: hypothesis strategies drawing systems, initial
  guesses and method configurations (the only module that imports ``hypothesis``; its
  names are loaded from here on first use).

::

    from hypothesis import given
    import fixedpoint as fp
    from fixedpoint import testing as fpt

    @given(fpt.solver_cases(max_length=64))
    def test_my_method(case):
        fpt.assert_matches_sequential(case.F, case.x0, case.method)

    def test_my_map_is_causal():
        fpt.assert_causal(my_map, torch.randn(2, 16, 3))

``fpt.systems`` is both the module of synthetic systems (``fpt.systems.LinearSystem``)
and, called, the hypothesis strategy drawing one (``fpt.systems(max_length=64)``, i.e.
:func:`fixedpoint.testing.strategies.systems`).
"""

from __future__ import annotations

import importlib
import types
from typing import Any

from . import systems
from .assertions import (
    EXACT,
    assert_batch_independent,
    assert_causal,
    assert_close,
    assert_finite_termination,
    assert_matches_sequential,
    default_rtol,
    relative_error,
)
from .systems import RANDOM_SYSTEMS, SYSTEM_KINDS, TriangularSystem, forward_substitution

__all__ = [
    "EXACT",
    "EXACT_METHOD_KINDS",
    "GUESS_KINDS",
    "LINEAR_MAX_SIZE",
    "MAX_TOUGHNESS",
    "METHOD_KINDS",
    "RANDOM_SYSTEMS",
    "SYSTEM_KINDS",
    "SolverCase",
    "TriangularSystem",
    "assert_batch_independent",
    "assert_causal",
    "assert_close",
    "assert_finite_termination",
    "assert_matches_sequential",
    "default_rtol",
    "forward_substitution",
    "initial_guesses",
    "methods",
    "relative_error",
    "solver_cases",
    "systems",
]

# Names of the strategies module, imported on first access so that the systems and the
# assertions work without hypothesis installed.
_STRATEGY_NAMES = frozenset(
    {
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
    }
)


class _SystemsModule(types.ModuleType):
    """The module :mod:`fixedpoint.testing.systems`, callable as the strategy
    :func:`fixedpoint.testing.strategies.systems`.

    Why: ``fpt.systems`` must be that module (``from fixedpoint.testing import systems;
    systems.LinearSystem``: a package attribute named like a submodule *is* the submodule
    once it is imported), yet ``fpt.systems(max_length=64)`` is the strategy of the public
    API, and an attribute can only be one object.  Calling it imports hypothesis on first
    use, so the systems themselves never need it.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return importlib.import_module(".strategies", __name__).systems(*args, **kwargs)


systems.__class__ = _SystemsModule


def __getattr__(name: str) -> Any:
    if name in _STRATEGY_NAMES:
        return getattr(importlib.import_module(".strategies", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _STRATEGY_NAMES)


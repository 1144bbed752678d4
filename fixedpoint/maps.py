"""The two ways a triangular map can be handed to :func:`fixedpoint.solve`.

A *plain* map is any callable ``F(x) -> y`` on tensors of shape ``(B, T, d)`` that is
strictly causal along dimension 1: ``y[:, t]`` depends only on ``x[:, :t]``.  Every
solver works with it, but each evaluation costs a full pass over all ``T`` positions.

An *incremental* map (a subclass of :class:`IncrementalMap`) can also evaluate a window
of positions given a state (for attention: a key/value cache) that holds everything
before the window.  Sequential and block solvers on such a map cost about one full pass
in total instead of one pass per step.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

from torch import Tensor

__all__ = ["IncrementalMap", "PlainMap", "as_incremental"]


class IncrementalMap(ABC):
    """A strictly causal map that can be evaluated window by window.

    The solver owns a *state* created by :meth:`init_state`.  The state remembers how
    many leading positions are *committed*: final, never to change again.  One call of
    :meth:`advance` does two things in a single pass of the underlying network:

    1. commits ``x[:, n:lo]`` where ``n`` is the state's committed length (``n <= lo``);
    2. returns ``F(x)[:, lo:hi]``.

    Because ``F(x)[:, t]`` depends only on ``x[:, :t]``, the returned window depends on
    the committed prefix and on ``x[:, lo:hi-1]`` only.  Implementations must not write
    into ``x``.  The state may be mutated in place: it belongs to the solver.
    """

    @abstractmethod
    def __call__(self, x: Tensor) -> Tensor:
        """Full evaluation ``F(x)`` on a ``(B, T, d)`` tensor."""

    @abstractmethod
    def init_state(self, x: Tensor) -> Any:
        """A fresh state with nothing committed, for a batch shaped like ``x``."""

    @abstractmethod
    def advance(self, state: Any, x: Tensor, lo: int, hi: int) -> Tensor:
        """Commit ``x[:, n:lo]`` into ``state`` and return ``F(x)[:, lo:hi]``."""

    @abstractmethod
    def committed(self, state: Any) -> int:
        """How many leading positions ``state`` holds."""

    rows_per_sample: int = 1
    """Network rows one sample costs (2 when classifier-free guidance runs a conditional
    and an unconditional pass): ``token_evals`` counts rows x positions read."""

    def positions_read(self, committed: int, lo: int, hi: int, length: int) -> int:
        """Input positions one :meth:`advance` call pushes through the network.

        Used for the cost: ``token_evals`` counts them (times ``rows_per_sample``), and a
        call that reads none is not a dependent step.  The default assumes the call
        reads the new inputs ``committed .. hi - 1``; a map that needs fewer (a right
        shift: output ``t`` from input ``t - 1``, as in TarFlow) says so by overriding.
        """
        return max(hi - committed, 0)


class PlainMap(IncrementalMap):
    """Adapter giving a plain callable the incremental interface.

    Every :meth:`advance` evaluates the whole sequence, so its cost is ``T`` positions per
    sample whatever the window: honest accounting for a map that cannot do better.
    """

    def __init__(self, fn: Callable[[Tensor], Tensor]):
        self.fn = fn

    def __call__(self, x: Tensor) -> Tensor:
        return self.fn(x)

    def init_state(self, x: Tensor) -> list[int]:
        return [0]

    def advance(self, state: list[int], x: Tensor, lo: int, hi: int) -> Tensor:
        state[0] = lo
        return self.fn(x)[:, lo:hi]

    def committed(self, state: list[int]) -> int:
        return state[0]

    def positions_read(self, committed: int, lo: int, hi: int, length: int) -> int:
        return length


def as_incremental(F: Callable[[Tensor], Tensor] | IncrementalMap) -> IncrementalMap:
    """Return ``F`` itself if it is incremental, else wrap it in :class:`PlainMap`."""
    if isinstance(F, IncrementalMap):
        return F
    if not callable(F):
        raise TypeError(f"F must be callable or an IncrementalMap, got {type(F).__name__}")
    return PlainMap(F)



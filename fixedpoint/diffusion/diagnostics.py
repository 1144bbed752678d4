"""Looking inside a parallel solve of a sampler chain: iterates, wavefront, batch scaling.

* :class:`RecordingMap` wraps a chain map and keeps a copy of the iterate every time the
  solver evaluates it, so the error of every step after every iteration (the
  *wavefront*: an iteration x step picture of how exactness spreads along the chain)
  can be computed against the sequential solution with :func:`error_by_step`.
* :func:`network_call_seconds` times one call of the noise predictor on ``rows`` rows:
  the batch scaling that decides whether fewer dependent calls of more rows each are
  faster in wall-clock.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor

from ..maps import IncrementalMap
from .maps import ChainMap, Denoiser

__all__ = ["RecordingMap", "error_by_step", "network_call_seconds"]


class RecordingMap(IncrementalMap):
    """``inner`` unchanged, plus ``iterates``: the iterate at each evaluation."""

    def __init__(self, inner: ChainMap):
        self.inner = inner
        self.rows_per_sample = inner.rows_per_sample
        self.iterates: list[Tensor] = []

    def __call__(self, x: Tensor) -> Tensor:
        return self.inner(x)

    # What solve_chain needs of a chain map, forwarded.
    def initial_guess(self) -> Tensor:
        return self.inner.initial_guess()

    def final(self, x: Tensor) -> Tensor:
        return self.inner.final(x)

    @property
    def count(self) -> Any:
        return self.inner.count

    def init_state(self, x: Tensor) -> Any:
        self.iterates = []
        return self.inner.init_state(x)

    def advance(self, state: Any, x: Tensor, lo: int, hi: int) -> Tensor:
        self.iterates.append(x.detach().clone())
        return self.inner.advance(state, x, lo, hi)

    def committed(self, state: Any) -> int:
        return self.inner.committed(state)

    def positions_read(self, committed: int, lo: int, hi: int, length: int) -> int:
        return self.inner.positions_read(committed, lo, hi, length)


def error_by_step(iterates: list[Tensor], final: Tensor, exact: Tensor) -> Tensor:
    """``(iterations + 1, N)``: max error of each step's state after each iteration.

    Row 0 is the initial guess, row ``k`` the iterate after ``k`` evaluations, the last
    row the solver's result ``final``.
    """
    states = [*iterates[1:], final] if iterates else [final]
    rows = [iterates[0]] if iterates else []
    rows += states
    return torch.stack([(x - exact).abs().amax(dim=(0, 2)) for x in rows])


@torch.no_grad()
def network_call_seconds(
    denoiser: Denoiser, rows: int, *, repeats: int = 5, timestep: int = 500
) -> float:
    """Median seconds of one noise-predictor call on ``rows`` rows (after a warm-up)."""
    x = torch.randn(rows, *denoiser.sample_shape)
    t = torch.full((rows,), timestep, dtype=torch.long)
    labels = None
    if denoiser.num_classes is not None:
        labels = torch.zeros(rows, dtype=torch.long)
    denoiser(x, t, labels)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        denoiser(x, t, labels)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]

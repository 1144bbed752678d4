"""A measured cost model: the latency of one network call as a function of its tokens.

One call of a block's inverse map pushes ``n`` samples x positions through the network
(CFG doubles the rows inside the call, identically for every method).  On this device
the call takes about ``alpha + beta * n`` seconds: ``alpha`` is the fixed per-call
latency (Python, kernel launches, small-matrix overheads), ``beta`` the marginal cost
of a token.  A strategy with ``S`` dependent steps and ``N`` token evaluations is then
predicted to take ``alpha * S + beta * N``.  On a latency-bound device (a GPU at small
batch) ``beta * N`` is negligible and the speed-up is the ratio of dependent steps.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from torch import Tensor

import fixedpoint as fp
from fixedpoint.tarflow.model import TarFlow
from fixedpoint.tarflow.sampling import BlockInverse

from .lib import GUIDANCE


@dataclass(frozen=True)
class CostModel:
    alpha: float  # seconds per network call
    beta: float  # seconds per token evaluation
    overhead: float  # seconds of solver bookkeeping per dependent step
    points: tuple[tuple[int, float], ...]  # measured (tokens, seconds per call)

    def predict(self, steps: int, tokens: int) -> float:
        return (self.alpha + self.overhead) * steps + self.beta * tokens

    def to_dict(self) -> dict:
        return {"alpha_s": self.alpha, "beta_s_per_token": self.beta,
                "overhead_s_per_step": self.overhead,
                "points": [list(p) for p in self.points]}


def _per_call(fn: Callable[[], object], repeats: int, inner: int = 5) -> float:
    """Median over ``repeats`` loops of the mean time of ``inner`` back-to-back calls."""
    fn()  # warm-up
    loops = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        loops.append((time.perf_counter() - start) / inner)
    return statistics.median(loops)


def solver_overhead(batch: int, length: int, dim: int, repeats: int) -> float:
    """Bookkeeping per Jacobi iteration, timed on a map that costs almost nothing."""

    def shift(x: Tensor) -> Tensor:  # x_t = x_{t-1}: exactly `length` iterations
        return torch.cat([torch.ones_like(x[:, :1]), x[:, :-1]], 1)

    x0 = torch.zeros(batch, length, dim)
    per_solve = _per_call(lambda: fp.solve(shift, x0, fp.Jacobi()), repeats, inner=1)
    map_only = _per_call(lambda: shift(x0), repeats, inner=20)
    return max(per_solve / length - map_only, 0.0)


def fit(model: TarFlow, batches: tuple[int, ...], repeats: int = 5, block: int = 0) -> CostModel:
    """Time calls of growing windows at several batch sizes; fit ``alpha + beta * tokens``."""
    c = model.config
    windows = sorted({2, 3, 5, max(2, c.seq_len // 4), max(2, c.seq_len // 2), c.seq_len})
    points = []
    with torch.no_grad():
        for b in batches:
            g = torch.Generator().manual_seed(1)
            z = torch.randn(b, c.seq_len, c.token_dim, generator=g)
            y = torch.arange(b) % max(c.num_classes, 1) if c.num_classes else None
            fmap = BlockInverse(model, block, z, y, guidance=GUIDANCE)
            state = fmap.init_state(z)
            for hi in windows:
                tokens = b * fmap.positions_read(0, 0, hi, c.seq_len)
                # lo = 0 commits nothing, so the same call can be repeated on one state.
                call = partial(fmap.advance, state, z, 0, hi)
                seconds = _per_call(call, repeats)
                points.append((tokens, seconds))
        overhead = statistics.median(
            solver_overhead(b, c.seq_len, c.token_dim, repeats) for b in batches)
    n = np.array([p[0] for p in points], dtype=float)
    t = np.array([p[1] for p in points], dtype=float)
    # Relative least squares: small calls matter as much as big ones.
    A = np.stack([np.ones_like(n), n], 1) / t[:, None]
    coef, *_ = np.linalg.lstsq(A, np.ones_like(t), rcond=None)
    alpha, beta = (max(float(v), 0.0) for v in coef)
    return CostModel(alpha, beta, overhead, tuple(points))

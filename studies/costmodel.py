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
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from fixedpoint.tarflow.model import TarFlow
from fixedpoint.tarflow.sampling import BlockInverse

from .lib import GUIDANCE


@dataclass(frozen=True)
class CostModel:
    alpha: float  # seconds per call
    beta: float  # seconds per token evaluation
    points: tuple[tuple[int, float], ...]  # measured (tokens, seconds)

    def predict(self, steps: int, tokens: int) -> float:
        return self.alpha * steps + self.beta * tokens

    def to_dict(self) -> dict:
        return {"alpha_s": self.alpha, "beta_s_per_token": self.beta,
                "points": [list(p) for p in self.points]}


def _time_call(fmap: BlockInverse, x: Tensor, hi: int, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):
        state = fmap.init_state(x)
        start = time.perf_counter()
        fmap.advance(state, x, 0, hi)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])  # the first call warms up


def fit(model: TarFlow, batches: tuple[int, ...], repeats: int = 5, block: int = 0) -> CostModel:
    """Time single calls of growing windows at several batch sizes; least-squares fit."""
    c = model.config
    windows = sorted({2, 3, 5, max(2, c.seq_len // 4), max(2, c.seq_len // 2), c.seq_len})
    points = []
    with torch.no_grad():
        for b in batches:
            g = torch.Generator().manual_seed(1)
            z = torch.randn(b, c.seq_len, c.token_dim, generator=g)
            y = torch.arange(b) % max(c.num_classes, 1) if c.num_classes else None
            fmap = BlockInverse(model, block, z, y, guidance=GUIDANCE)
            for hi in windows:
                tokens = b * fmap.positions_read(0, 0, hi, c.seq_len)
                points.append((tokens, _time_call(fmap, z, hi, repeats)))
    n = np.array([p[0] for p in points], dtype=float)
    t = np.array([p[1] for p in points], dtype=float)
    # Relative least squares: small calls matter as much as big ones.
    A = np.stack([np.ones_like(n), n], 1) / t[:, None]
    coef, *_ = np.linalg.lstsq(A, np.ones_like(t), rcond=None)
    alpha, beta = (max(float(v), 0.0) for v in coef)
    return CostModel(alpha, beta, tuple(points))

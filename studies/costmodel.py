"""A measured cost model that keeps network time and solver overhead apart.

A sampling run is predicted as

    per_run + f * sum over blocks k of [ per_solve + alpha * S_k + beta * N_k + o_m * S_k ]

with ``S_k`` the block's dependent steps, ``N_k`` its token evaluations (network rows:
samples x positions x 2 under classifier-free guidance) and ``m`` its method.  The
constants are measured on the model itself, at the batch size being predicted, on a
calibration noise draw, in three separate experiments:

* **network** (``alpha`` seconds per call, ``beta`` per token row): bare calls of a
  block's map, no solver: full windows of growing width (the calls of a Jacobi sweep)
  and the one-position cached calls of forward substitution, fitted by relative least
  squares;
* **solver overhead** (``o_m`` per dependent step, per method class, and ``per_solve``
  once per solve): ``fp.solve`` on one block with calibration methods, minus the network
  time the first fit predicts for the same steps and tokens.  Two Jacobi runs with
  different iteration caps separate the per-solve from the per-step part;
* **per_run** and **f**: two whole sampling runs (Jacobi with two iteration caps on every
  block) against the sum of their predicted solves: ``per_run`` is what a run costs
  outside its solves (patchify, permutations, map set-up), ``f`` how much slower a solve
  is inside a run, where the blocks' weights take turns in the caches, than alone
  (about 1).

None of the strategies a study validates the model on is used to fit it.  On a
latency-bound device (a GPU at small batch) ``beta * N`` is negligible and the speed-up
is the ratio of dependent steps.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import Tensor

import fixedpoint as fp
from fixedpoint.benchmark import interleaved_medians
from fixedpoint.tarflow import BlockInverse, Sample, Strategy, TarFlow, reverse

from .lib import GUIDANCE

CALIBRATION_SEED = 1


@dataclass(frozen=True)
class CostModel:
    batch: int
    alpha: float  # seconds per network call
    beta: float  # seconds per token row through the network
    overhead: dict[str, float]  # seconds of solver work per dependent step, per method class
    per_solve: float  # seconds per solve outside its steps (setup, result)
    per_run: float  # seconds per sampling run outside the solves (patchify, permutations)
    in_run: float  # a solve inside a run / the same solve alone (caches shared by blocks)
    points: tuple[tuple[int, float], ...]  # measured (tokens per call, seconds per call)
    solves: tuple[dict[str, Any], ...]  # the calibration solves the overheads come from

    def network(self, steps: int, tokens: int) -> float:
        """Seconds of bare network calls for ``steps`` calls pushing ``tokens`` rows."""
        return self.alpha * steps + self.beta * tokens

    def predict_solve(self, method: fp.Method, steps: int, tokens: int) -> float:
        """Seconds of one ``fp.solve`` with ``method`` that took ``steps`` and ``tokens``."""
        name = type(method).__name__
        if name not in self.overhead:
            raise KeyError(f"no overhead measured for {name}; measured: {sorted(self.overhead)}")
        return self.per_solve + self.network(steps, tokens) + self.overhead[name] * steps

    def predict_run(self, blocks: Sequence[tuple[fp.Method, int, int]]) -> float:
        """Seconds of a sampling run; ``blocks``: (method, dependent steps, token evals)."""
        return self.per_run + self.in_run * sum(self.predict_solve(m, s, n)
                                                for m, s, n in blocks)

    def predict_sample(self, sample: Sample) -> float:
        """The prediction for a run whose costs ``sample`` reports."""
        assert sample.strategy is not None
        return self.predict_run([(p.method, r.dependent_steps, r.token_evals)
                                 for p, r in zip(sample.strategy.plans, sample.blocks,
                                                 strict=True)])

    def to_dict(self) -> dict[str, Any]:
        return {"batch": self.batch, "alpha_s": self.alpha, "beta_s_per_token": self.beta,
                "overhead_s_per_step": dict(self.overhead), "per_solve_s": self.per_solve,
                "per_run_s": self.per_run, "in_run_factor": self.in_run,
                "points": [list(p) for p in self.points],
                "calibration_solves": list(self.solves)}


def _calibration_methods(length: int) -> list[fp.Method]:
    """Exact termination with caps, so each run's steps are fixed and affordable."""
    cap = min(length - 1, 8)
    exact = {"atol": 0.0, "rtol": 0.0}
    return [
        fp.Sequential(),
        fp.Jacobi(max_iter=1, **exact),
        fp.Jacobi(max_iter=max(1, cap // 2), **exact),
        fp.Jacobi(max_iter=cap, **exact),
        fp.GSJacobi(modules=min(4, length), max_iter=max(1, cap // 2), **exact),
        fp.TriangularAnderson(max_iter=cap, **exact),
        fp.Anderson(max_iter=cap, **exact),
    ]


def _bare_sequential(fmap: BlockInverse, z: Tensor) -> None:
    """Forward substitution by hand: one cached call per position, no solver."""
    x = z.clone()
    state = fmap.init_state(x)
    for t in range(1, z.shape[1]):  # x_0 = z_0 needs no call
        x[:, t : t + 1] = fmap.advance(state, x, t, t + 1)


def _network_points(fmap: BlockInverse, z: Tensor, repeats: int,
                    timer: Callable[..., dict[str, float]]) -> list[tuple[int, float]]:
    batch, T = z.shape[0], z.shape[1]
    rows = batch * fmap.rows_per_sample
    windows = sorted({min(w, T) for w in (3, 5, T // 4, T // 2, T) if w >= 2})
    state = fmap.init_state(z)
    # lo = 0 commits nothing, so the same call can be repeated on one state.
    calls = {hi: partial(fmap.advance, state, z, 0, hi) for hi in windows}
    calls["sequential"] = partial(_bare_sequential, fmap, z)
    times = timer(calls, repeats, inner=3)
    points = [(rows * fmap.positions_read(0, 0, hi, T), times[hi]) for hi in windows]
    points.append((rows, times["sequential"] / (T - 1)))  # per cached one-position call
    return points


def _fit_network(points: list[tuple[int, float]]) -> tuple[float, float]:
    n = np.array([p[0] for p in points], dtype=float)
    t = np.array([p[1] for p in points], dtype=float)
    # Relative least squares: small calls matter as much as big ones.
    A = np.stack([np.ones_like(n), n], 1) / t[:, None]
    coef, *_ = np.linalg.lstsq(A, np.ones_like(t), rcond=None)
    alpha, beta = (max(float(v), 0.0) for v in coef)
    return alpha, beta


def fit(model: TarFlow, batch: int, repeats: int = 5, block: int = 0,
        clock: Callable[[], float] = time.perf_counter) -> CostModel:
    """Measure every constant of the model at ``batch`` on calibration noise.

    ``clock`` as in :func:`fixedpoint.benchmark.interleaved_medians`; predictions are in
    the seconds of that clock.
    """
    timer = partial(interleaved_medians, clock=clock)
    c = model.config
    g = torch.Generator().manual_seed(CALIBRATION_SEED)
    z = torch.randn(batch, c.seq_len, c.token_dim, generator=g)
    y = torch.arange(batch) % max(c.num_classes, 1) if c.num_classes else None
    with torch.no_grad():
        fmap = BlockInverse(model, block, z, y, guidance=GUIDANCE)
        points = _network_points(fmap, z, repeats, timer)
        alpha, beta = _fit_network(points)

        methods = _calibration_methods(c.seq_len)
        times = timer({m.describe(): partial(fp.solve, fmap, z, m) for m in methods},
                      repeats, inner=2)
        solves = []
        for m in methods:
            r = fp.solve(fmap, z, m)
            solves.append({"method": m.describe(), "class": type(m).__name__,
                           "dependent_steps": r.dependent_steps, "token_evals": r.token_evals,
                           "seconds": times[m.describe()],
                           "network_s": alpha * r.dependent_steps + beta * r.token_evals})
        # Jacobi at several caps: seconds - network = per_solve + o * steps, least squares.
        beyond = [s["seconds"] - s["network_s"] for s in solves]
        jac = [(s["dependent_steps"], b) for s, b in zip(solves, beyond, strict=True)
               if s["class"] == "Jacobi"]
        A = np.array([[1.0, steps] for steps, _ in jac])
        (per_solve, o_jacobi), *_ = np.linalg.lstsq(A, np.array([b for _, b in jac]), rcond=None)
        per_solve, o_jacobi = float(per_solve), float(o_jacobi)
        overhead: dict[str, list[float]] = {}
        for s, b in zip(solves, beyond, strict=True):
            if s["class"] != "Jacobi":
                overhead.setdefault(s["class"], []).append((b - per_solve) / s["dependent_steps"])
        per_step = {"Jacobi": o_jacobi, **{k: float(np.median(v)) for k, v in overhead.items()}}

        # Two whole runs, Jacobi capped at 1 and at `cap` iterations on every block:
        # seconds = per_run + in_run * (sum of the blocks' predicted solves).
        runs = {m.describe(): Strategy.uniform(m, c.blocks) for m in methods[1:4:2]}
        run_s = timer({n: partial(reverse, model, z, y, strategy=s, guidance=GUIDANCE)
                       for n, s in runs.items()}, repeats)
        alone = []
        for s in runs.values():
            sample = reverse(model, z, y, strategy=s, guidance=GUIDANCE)
            alone.append(sum(per_solve + alpha * r.dependent_steps + beta * r.token_evals
                             + o_jacobi * r.dependent_steps for r in sample.blocks))
    measured = list(run_s.values())
    in_run = (measured[1] - measured[0]) / (alone[1] - alone[0])
    per_run = measured[0] - in_run * alone[0]
    return CostModel(batch, alpha, beta, per_step, per_solve, per_run, in_run, tuple(points),
                     tuple(solves))


def prediction_errors(predicted: Sequence[float], measured: Sequence[float]) -> dict[str, float]:
    """Mean and max of ``|predicted / measured - 1|``."""
    errs = [abs(p / m - 1) for p, m in zip(predicted, measured, strict=True)]
    return {"mean_abs": float(np.mean(errs)), "max_abs": float(np.max(errs))}

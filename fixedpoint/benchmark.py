"""Measure methods side by side on one system: the shared engine of the demo and benchmarks.

Wall-clock numbers are medians over repeats taken in the same process, so ratios
between rows are meaningful; absolute values belong to the device, dtype and batch
size printed with them.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .methods import Method
from .solve import solve


@dataclass(frozen=True)
class Row:
    """One method on one system."""

    name: str
    status: str
    iterations: int
    dependent_steps: int
    token_evals: int
    wall_ms: float
    max_error: float

    def cells(self) -> list[str]:
        return [
            self.name,
            self.status,
            str(self.iterations),
            str(self.dependent_steps),
            str(self.token_evals),
            f"{self.wall_ms:.2f}",
            f"{self.max_error:.1e}",
        ]


HEADER = ["method", "status", "iterations", "dependent steps", "token evals", "ms", "max error"]


def describe(method: Method) -> str:
    """A short readable label showing the non-default fields, e.g. ``GSJacobi(modules=4)``."""
    default = type(method)()
    fields = {k: v for k, v in vars(method).items() if v != getattr(default, k)}
    inner = ", ".join(f"{k}={v}" for k, v in fields.items())
    return f"{type(method).__name__}({inner})"


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def compare(
    F: Callable[[Tensor], Tensor],
    x0: Tensor,
    methods: Sequence[Method],
    solution: Tensor,
    repeats: int = 5,
) -> list[Row]:
    """Solve with every method; errors are max-abs against ``solution``."""
    rows = []
    for method in methods:
        result = solve(F, x0, method)
        wall = _median_ms(lambda m=method: solve(F, x0, m), repeats)
        rows.append(
            Row(
                describe(method),
                result.status.name,
                result.iterations,
                result.dependent_steps,
                result.token_evals,
                wall,
                float((result.x - solution).abs().max()),
            )
        )
    return rows


def scipy_anderson_row(
    F: Callable[[Tensor], Tensor],
    x0: Tensor,
    solution: Tensor,
    f_tol: float = 1e-10,
    memory: int = 5,
    max_iter: int = 500,
    repeats: int = 3,
) -> Row:
    """``scipy.optimize.anderson`` on ``x - F(x) = 0`` (the whole batch as one vector).

    An outside reference: it counts as one dependent step per evaluation of ``F``.
    """
    from scipy.optimize import NoConvergence, anderson

    shape, dtype = x0.shape, x0.dtype
    calls = [0]

    def residual(v: np.ndarray) -> np.ndarray:
        calls[0] += 1
        x = torch.from_numpy(np.asarray(v).reshape(shape)).to(dtype)
        with torch.no_grad():
            return (x - F(x)).reshape(-1).double().numpy()

    def run() -> tuple[np.ndarray, str]:
        calls[0] = 0
        try:
            out = anderson(residual, x0.reshape(-1).double().numpy(), M=memory,
                           f_tol=f_tol, maxiter=max_iter)
            return out, "SUCCESS"
        except NoConvergence as exc:
            return np.asarray(exc.args[0]), "MAX_ITER"
        except (ValueError, FloatingPointError, np.linalg.LinAlgError) as exc:
            return np.full(x0.numel(), np.nan), f"FAILED ({type(exc).__name__})"

    x, status = run()
    evaluations = calls[0]
    wall = _median_ms(run, repeats)
    error = float(np.abs(x.reshape(shape) - solution.double().numpy()).max())
    batch, length = shape[0], shape[1]
    return Row("scipy.optimize.anderson", status, evaluations, evaluations,
               evaluations * batch * length, wall, error)


def markdown(rows: Sequence[Row]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + " --- |" * len(HEADER)]
    lines += ["| " + " | ".join(r.cells()) + " |" for r in rows]
    return "\n".join(lines)

"""Measure methods side by side: the one timer and table printer of the demo and studies.

Wall-clock numbers are medians over repeats taken in the same process, so ratios
between rows are meaningful; absolute values belong to the device, dtype and batch
size printed with them.  :func:`interleaved_medians` is the only timer (the studies
import it); :func:`markdown_table` the only table printer.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .methods import Method
from .solve import solve

__all__ = ["HEADER", "Row", "compare", "interleaved_medians", "markdown", "markdown_table",
           "scipy_anderson_row"]


def interleaved_medians(fns: Mapping[str, Callable[[], object]], repeats: int,
                        inner: int = 1, clock: Callable[[], float] = time.perf_counter
                        ) -> dict[str, float]:
    """Median seconds per call of each function, timed round-robin in this process.

    One warm-up call each, then ``repeats`` rounds that time every function once (as the
    mean of ``inner`` back-to-back calls, for calls too short to time alone), so slow
    drifts of a shared machine (load, frequency, allocator state) hit every function
    alike instead of whichever happened to be measured first.  ``clock`` is wall-clock by
    default; ``time.process_time`` (CPU seconds of this process) leaves out the time spent
    waiting for a core on a shared machine, which otherwise weighs long calls more than
    short ones (a short call often fits in one scheduler slice).
    """
    if repeats < 1 or inner < 1:
        raise ValueError(f"repeats and inner must be >= 1, got {repeats} and {inner}")
    for fn in fns.values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = clock()
            for _ in range(inner):
                fn()
            samples[name].append((clock() - start) / inner)
    return {name: statistics.median(v) for name, v in samples.items()}


def markdown_table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; cells are written with ``str``."""
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in rows:
        if len(row) != len(head):
            raise ValueError(f"a row has {len(row)} cells, the header {len(head)}")
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines)


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


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    return 1e3 * interleaved_medians({"fn": fn}, repeats)["fn"]


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
                method.describe(),
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
    """The rows of :func:`compare` as a markdown table."""
    return markdown_table(HEADER, [r.cells() for r in rows])

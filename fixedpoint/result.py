"""What a solve returns: the solution, a status, and honest cost statistics."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from torch import Tensor


class Status(enum.Enum):
    """Outcome of a solve, per sample and overall (the worst over samples)."""

    SUCCESS = 0
    MAX_ITER = 1
    NONFINITE = 2

    @property
    def message(self) -> str:
        return {
            Status.SUCCESS: "converged",
            Status.MAX_ITER: "stopped at the iteration cap before converging",
            Status.NONFINITE: "the map produced a non-finite value (overflow or NaN)",
        }[self]


@dataclass(frozen=True)
class TraceRow:
    """One iteration of one module.

    ``residual`` is the per-sample max-abs change of the iterate in this iteration;
    ``error`` the per-sample max-abs distance to the reference solution, when one was
    given to :func:`fixedpoint.solve`.
    """

    module: int
    iteration: int
    residual: Tensor
    error: Tensor | None


@dataclass(frozen=True)
class Result:
    """The outcome of :func:`fixedpoint.solve`.

    * ``x``: the solution (or, for failed samples, their last finite iterate);
      ``converged``, ``status`` (the worst over samples), ``sample_status``.
    * ``iterations``: the method's iterations (map evaluations), summed over modules;
      ``module_iterations`` per module; ``sample_iterations`` per sample, the iterations
      in which it was still active (independent of the other samples in the batch).
    * ``dependent_steps``: evaluations that had to wait on each other (the latency
      proxy); an evaluation that pushes no input through the network is not one, so
      this can be less than ``iterations``.
    * ``token_evals``: token rows the network processed (samples x rows per sample x
      input positions read), summed over evaluations (the arithmetic proxy).
    * ``wall_time``: seconds inside the solver, the device synchronised at both ends.
    """

    x: Tensor
    converged: Tensor
    status: Status
    sample_status: tuple[Status, ...]
    iterations: int
    module_iterations: tuple[int, ...]
    dependent_steps: int
    token_evals: int
    wall_time: float
    trace: tuple[TraceRow, ...] | None = None
    sample_iterations: tuple[int, ...] = ()

    @property
    def success(self) -> bool:
        return self.status is Status.SUCCESS

    def summary(self) -> str:
        n_ok = int(self.converged.sum())
        return (
            f"{self.status.name}: {n_ok}/{len(self.converged)} samples converged, "
            f"{self.iterations} iterations, {self.dependent_steps} dependent steps, "
            f"{self.token_evals} token evaluations, {self.wall_time * 1e3:.1f} ms"
        )


class SolveError(RuntimeError):
    """Raised by ``solve(..., throw=True)`` when the status is not SUCCESS."""

    def __init__(self, result: Result):
        self.result = result
        bad = [i for i, s in enumerate(result.sample_status) if s is not Status.SUCCESS]
        shown = ", ".join(map(str, bad[:10])) + (" ..." if len(bad) > 10 else "")
        super().__init__(
            f"solve failed: {result.status.message} (samples {shown}); {result.summary()}"
        )


class NonCausalError(ValueError):
    """The map is not strictly causal: ``position`` depends on ``source`` >= position."""

    def __init__(self, position: int, source: int):
        self.position = position
        self.source = source
        super().__init__(
            f"the map is not strictly causal: output position {position} depends on "
            f"input position {source} (outputs may only depend on earlier positions)"
        )

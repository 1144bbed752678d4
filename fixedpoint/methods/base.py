"""The method protocol: what a solver method is, and the problem it works on.

A *method* is a small frozen configuration object (a dataclass) with three calls, in the
spirit of optimistix and ``scipy.optimize``'s solver objects::

    state = method.init(problem)           # before the first evaluation
    while not method.done(problem, state):
        state = method.step(problem, state)  # one dependent evaluation of F, one update

:func:`fixedpoint.solve` is that loop and nothing more: it names no concrete method.
The *problem* (:class:`Problem`) is owned by the driver.  It holds the iterate
``problem.x`` (a private copy of the caller's ``x0``), evaluates the map with honest cost
accounting (:meth:`Problem.evaluate`), and keeps per-sample status and counters as
device tensors.  A method reads and writes ``problem.x`` only through its own positions,
reports failures with :meth:`Problem.fail` and caps with :meth:`Problem.cap_reached`,
and counts its iterations with :meth:`Problem.count_iteration`.

Contracts every method keeps (the property suite checks them for each method):

* it reaches the sequential (forward-substitution) solution as its tolerance goes to 0;
* a sample whose map value turns non-finite is stopped with status ``NONFINITE`` and
  keeps its **last finite iterate** (nothing non-finite is ever written to ``x``);
* ``done`` is the only place that may need a device-to-host synchronisation, and needs
  at most one per iteration (the stopping test).

:mod:`fixedpoint.methods.sweep` holds the machinery shared by the triangular
(frozen-prefix) methods; a new method of that family is a few lines on top of it (the
README shows damped Jacobi written outside the package).
"""

from __future__ import annotations

import dataclasses
import time
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor

from ..maps import IncrementalMap
from ..result import Result, Status, TraceRow

__all__ = ["Method", "Problem"]

_SUCCESS, _MAX_ITER, _NONFINITE = (s.value for s in Status)


class Method(ABC):
    """Base class of every solver method (see the module docstring for the protocol).

    Subclasses are frozen dataclasses: configuration only, validated on construction.
    All per-solve state lives in the object returned by :meth:`init`.
    """

    @abstractmethod
    def init(self, problem: Problem) -> Any:
        """The method's state before the first step."""

    @abstractmethod
    def step(self, problem: Problem, state: Any) -> Any:
        """One iteration: (usually) one evaluation of the map and one update."""

    @abstractmethod
    def done(self, problem: Problem, state: Any) -> bool:
        """Whether to stop; a plain Python bool."""

    def describe(self) -> str:
        """``Name(field=value, ...)`` listing the fields that differ from the defaults."""
        if not dataclasses.is_dataclass(self):
            return type(self).__name__
        parts = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            default = f.default if f.default is not dataclasses.MISSING else None
            if isinstance(value, Tensor) or value != default:
                shown = "tensor" if isinstance(value, Tensor) else repr(value)
                parts.append(f"{f.name}={shown}")
        return f"{type(self).__name__}({', '.join(parts)})"


class Problem:
    """The driver's side of a solve: iterate, map state, statuses and cost counters.

    Attributes a method may read: ``x`` (the iterate, ``(B, T, d)``, solver-owned),
    ``x0`` (the caller's initial guess, read-only), ``batch``, ``length``, ``dim``,
    ``device``, ``dtype``, ``eps`` (the rounding unit of the arithmetic the map runs in,
    see :func:`fixedpoint.precision.rounding_unit`), ``alive`` (per-sample bool: not
    failed) and ``tracing``.
    """

    def __init__(
        self,
        fmap: IncrementalMap,
        x0: Tensor,
        *,
        eps: float,
        trace: bool = False,
        reference: Tensor | None = None,
    ):
        self.fmap = fmap
        self.x0 = x0
        self.x = x0.clone()  # our own buffer: the caller's tensor is never written
        self.batch, self.length, self.dim = x0.shape
        self.device, self.dtype = x0.device, x0.dtype
        self.eps = eps
        self.state = fmap.init_state(self.x)
        self.rows = int(getattr(fmap, "rows_per_sample", 1))
        # Per-sample outcome as device masks (no host round trip while iterating).
        self.alive = torch.ones(self.batch, dtype=torch.bool, device=self.device)
        self.capped = torch.zeros_like(self.alive)
        self.sample_iterations = torch.zeros(self.batch, dtype=torch.long, device=self.device)
        self.module_iterations: list[int] = []
        self.dependent_steps = 0
        self.token_evals = 0
        self.tracing = trace
        self._rows: list[TraceRow] = []
        self.reference = reference

    # ---- evaluating the map ----------------------------------------------------------

    def evaluate(self, lo: int, hi: int) -> Tensor:
        """``F(x)[:, lo:hi]``, committing the frozen prefix ``x[:, committed:lo]``.

        Costs: ``token_evals`` grows by the rows the network actually processes (samples
        x the map's ``rows_per_sample`` x positions read); ``dependent_steps`` by one,
        unless the call reads no position at all (a value that needs no network call,
        such as TarFlow's ``x_0 = z_0``, is not a step).
        """
        read = self.fmap.positions_read(self.fmap.committed(self.state), lo, hi, self.length)
        if read > 0:
            self.dependent_steps += 1
            self.token_evals += self.batch * self.rows * read
        f = self.fmap.advance(self.state, self.x, lo, hi)
        if not isinstance(f, Tensor):
            raise TypeError(f"the map returned {type(f).__name__}, expected a torch.Tensor")
        if f.shape != (self.batch, hi - lo, self.dim):
            raise ValueError(
                f"the map returned shape {tuple(f.shape)} for positions {lo}:{hi}, "
                f"expected {(self.batch, hi - lo, self.dim)}"
            )
        if f.dtype != self.dtype or f.device != self.device:
            raise TypeError(
                f"the map returned {f.dtype} on {f.device}, expected {self.dtype} on "
                f"{self.device} (the dtype and device of x0)"
            )
        if f.untyped_storage().data_ptr() == self.x.untyped_storage().data_ptr():
            f = f.clone()  # a view of the iterate: methods update the iterate in place
        return f

    # ---- per-sample bookkeeping (device tensors, no synchronisation) -----------------

    def fail(self, samples: Tensor) -> None:
        """Mark ``samples`` (a bool mask) NONFINITE."""
        self.alive &= ~samples

    def keep_alive(self, ok: Tensor) -> None:
        """Mark the samples *not* in ``ok`` NONFINITE (one op fewer than :meth:`fail`)."""
        self.alive &= ok

    def cap_reached(self, samples: Tensor) -> None:
        """Mark ``samples`` MAX_ITER (a failure, if any, takes precedence)."""
        self.capped |= samples

    def count_iteration(self, active: Tensor) -> None:
        """One more iteration for the samples in ``active``."""
        self.sample_iterations += active

    def record(self, module: int, iteration: int, residual: Tensor) -> None:
        """A trace row (only when tracing): per-sample largest update, and error."""
        if not self.tracing:
            return
        error = None
        if self.reference is not None:
            error = (self.x - self.reference).abs().flatten(1).amax(1).cpu()
        self._rows.append(TraceRow(module, iteration, residual.cpu(), error))

    # ---- the result -------------------------------------------------------------------

    def result(self, wall_time: float) -> Result:
        codes = torch.where(self.alive, torch.where(self.capped, _MAX_ITER, _SUCCESS), _NONFINITE)
        statuses = tuple(Status(c) for c in codes.tolist())
        # A sample reported converged must be finite everywhere: guard the contract.
        converged = (codes == _SUCCESS) & torch.isfinite(self.x).flatten(1).all(1)
        return Result(
            x=self.x,
            converged=converged.cpu(),
            status=max(statuses, key=lambda s: s.value),
            sample_status=statuses,
            iterations=sum(self.module_iterations),
            module_iterations=tuple(self.module_iterations),
            dependent_steps=self.dependent_steps,
            token_evals=self.token_evals,
            wall_time=wall_time,
            trace=tuple(self._rows) if self.tracing else None,
            sample_iterations=tuple(self.sample_iterations.tolist()),
        )


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(device: torch.device) -> float:
    """A wall-clock reading after the device's queued work is done."""
    synchronize(device)
    return time.perf_counter()

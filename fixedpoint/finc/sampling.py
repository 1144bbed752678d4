"""Sampling FInC Flow: every FInC unit's inverse solved by a core method or a baseline.

Each FInC unit of the flow is one triangular system (its four orientations stacked, see
:class:`fixedpoint.finc.model.FInCUnit`); the other layers invert in closed form.  An
*inverter* turns a system into its solution; :func:`core_inverter` wraps
:func:`fixedpoint.solve` with any method and records every :class:`fixedpoint.Result`, and
:func:`baseline_inverter` wraps a library solve from :mod:`fixedpoint.finc.baselines`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

import fixedpoint as fp

from .inverse import FInCSystem
from .model import FInCFlow, Inverter, Layout

__all__ = ["Sample", "baseline_inverter", "core_inverter", "reconstruction_error", "sample"]


def start_from_y(system: FInCSystem) -> Tensor:
    """The initial guess ``x0 = y``: exact for the identity part of ``M = I + N``."""
    return system.from_image(system.y)


def core_inverter(method, results: list[fp.Result] | None = None,
                  start: Callable[[FInCSystem], Tensor] = start_from_y,
                  throw: bool = True) -> Inverter:
    """Solve each system with ``fp.solve(system, start(system), method, throw=throw)``;
    append every result to ``results`` if given."""

    def invert(system: FInCSystem) -> Tensor:
        result = fp.solve(system, start(system), method, throw=throw)
        if results is not None:
            results.append(result)
        return result.x

    return invert


def baseline_inverter(solve: Callable[[FInCSystem], Tensor]) -> Inverter:
    """An inverter from a function returning the canonical image (the baselines)."""
    return lambda system: system.from_image(solve(system))


@dataclass(frozen=True)
class Sample:
    """Images in [-1, 1] on the data grid, the continuous ``u``, and the solver record."""

    images: Tensor
    u: Tensor
    results: tuple[fp.Result, ...]
    wall_time: float

    @property
    def dependent_steps(self) -> int:
        """Sum over the FInC units (solved one after another) of their dependent steps."""
        return sum(r.dependent_steps for r in self.results)


@torch.no_grad()
def sample(
    model: FInCFlow,
    n: int,
    inverter: Inverter | None = None,
    *,
    method=None,
    generator: torch.Generator | None = None,
    temperature: float = 1.0,
    layout: Layout = Layout.PIXEL,
    latents: list[Tensor] | None = None,
) -> Sample:
    """Draw ``n`` samples.  Give either an ``inverter`` or a core ``method``."""
    if (inverter is None) == (method is None):
        raise ValueError("give exactly one of inverter and method")
    results: list[fp.Result] = []
    if method is not None:
        inverter = core_inverter(method, results)
    model.eval()
    if latents is None:
        latents = model.sample_latents(n, generator, temperature)
    start = time.perf_counter()
    u = model.reverse(latents, inverter, layout)
    wall = time.perf_counter() - start
    return Sample(model.quantize(u), u, tuple(results), wall)


@torch.no_grad()
def reconstruction_error(model: FInCFlow, u: Tensor, inverter: Inverter,
                         layout: Layout = Layout.PIXEL) -> float:
    """``max |reverse(forward(u)) - u|``: how exactly the inverse undoes the flow."""
    model.eval()
    latents, _ = model(u)
    return float((model.reverse(latents, inverter, layout) - u).abs().max())

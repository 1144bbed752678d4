"""Sampling a chain: the plain loop, the solver-core route, and diffusers' own loop.

* :func:`sample_loop` is the sequential sampler, ``x <- Phi_n(x)`` for ``n = 0..N-1``:
  the baseline every parallel method is measured against.
* :func:`solve_chain` poses the chain as a triangular system (Markov or Picard form,
  :mod:`fixedpoint.diffusion.maps`) and hands it to :func:`fixedpoint.solve` with any
  method of the core.
* :func:`diffusers_loop` runs diffusers' ``DDIMScheduler`` / ``DDPMScheduler`` ``step``
  on the same UNet, the reference for parity: it is not used to sample, only to check.
  :func:`diffusers_ddpm_noise` draws, from a generator, exactly the noise the DDPM loop
  would draw, so the two can be compared on the same noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..methods import GSJacobi
from ..result import Result
from ..solve import solve
from .chain import Chain, DDPMChain
from .maps import ChainMap, Denoiser, MarkovMap, NetworkCount
from .model import DiffusionModel

__all__ = [
    "ChainSample",
    "block_picard",
    "paradigms_tolerance",
    "diffusers_ddpm_noise",
    "diffusers_loop",
    "sample_loop",
    "solve_chain",
]


def sample_loop(
    chain: Chain,
    denoiser: Denoiser,
    x_init: Tensor,
    noise: Tensor | None = None,
    *,
    labels: Tensor | None = None,
    guidance: float | None = None,
    trajectory: bool = False,
) -> Tensor:
    """The sequential sampler: ``N`` steps, one network call (per stage) each.

    Returns the sample (shaped like ``x_init``), or with ``trajectory`` the states after
    every step, ``(B, N, d)``: the solution of the triangular system.
    """
    fmap = MarkovMap(chain, denoiser, x_init, noise, labels=labels, guidance=guidance)
    x = fmap.x_init[:, None]
    states = []
    with torch.no_grad():
        for n in range(len(chain)):
            x = fmap._phi(x, n)
            if trajectory:
                states.append(x)
    return torch.cat(states, 1) if trajectory else fmap.final(x)


@dataclass
class ChainSample:
    """A solved chain: the sample, the solver's result and the network calls it made."""

    sample: Tensor
    result: Result
    network: NetworkCount
    map: ChainMap


def solve_chain(
    fmap: ChainMap,
    method: object,
    *,
    x0: Tensor | None = None,
    trace: bool = False,
    reference: Tensor | None = None,
) -> ChainSample:
    """Solve the chain posed by ``fmap`` with a core method (e.g. ``fp.Jacobi()``).

    ``x0`` defaults to the initial noise at every position.
    """
    start = fmap.initial_guess() if x0 is None else x0
    result = solve(fmap, start, method, trace=trace, reference=reference)
    return ChainSample(fmap.final(result.x), result, fmap.count, fmap)


def diffusers_ddpm_noise(
    generator: torch.Generator, chain: DDPMChain, batch: int, shape: tuple[int, ...]
) -> Tensor:
    """The noise diffusers' DDPM loop draws from ``generator``, as ``(B, N, *shape)``.

    ``DDPMScheduler.step`` draws one standard normal tensor of the batch's shape at every
    step whose timestep is above zero, in loop order; the others get zeros here.
    """
    noise = torch.zeros(batch, len(chain), *shape)
    for n, t in enumerate(chain.timesteps.tolist()):
        if t > 0:
            noise[:, n] = torch.randn((batch, *shape), generator=generator)
    return noise


def diffusers_loop(
    model: DiffusionModel,
    scheduler: object,
    steps: int,
    x_init: Tensor,
    *,
    generator: torch.Generator | None = None,
    labels: Tensor | None = None,
    guidance: float | None = None,
) -> Tensor:
    """Sample with a diffusers scheduler's own ``step`` loop (the parity reference).

    ``scheduler`` is a ``DDIMScheduler`` (run with ``eta = 0``) or a ``DDPMScheduler``
    (pass ``generator`` for its noise).  Guidance is the usual classifier-free mix
    ``uncond + guidance * (cond - uncond)`` with both halves in one batch.
    """
    from diffusers import DDIMScheduler

    unet = model.unet
    scheduler.set_timesteps(steps)
    x = x_init.clone()
    null = model.num_classes
    with torch.no_grad():
        for t in scheduler.timesteps:
            if guidance is None:
                eps = unet(x, t, class_labels=labels).sample
            else:
                both = torch.cat([labels, torch.full_like(labels, null)])
                out = unet(torch.cat([x, x]), t, class_labels=both).sample
                cond, uncond = out.chunk(2)
                eps = uncond + guidance * (cond - uncond)
            if isinstance(scheduler, DDIMScheduler):
                x = scheduler.step(eps, t, x, eta=0.0).prev_sample
            else:
                x = scheduler.step(eps, t, x, generator=generator).prev_sample
    return x


def paradigms_tolerance(chain: Chain, tau: float = 0.1, floor: float = 1e-5) -> Tensor:
    """Per-position ``atol`` for ParaDiGMS's stopping rule, for ``SlidingWindow(rms=True)``.

    ParaDiGMS stops step ``n`` when ``||dx_n||^2 / (d sigma_n^2) <= tau^2``, with
    ``sigma_n^2`` the step's noise variance (:attr:`Chain.variance`): an RMS update of at
    most ``tau * sigma_n``.  A step whose variance vanishes (the last one, which ends at
    the clean sample) would ask for a tolerance no float32 iterate can meet; it gets
    ``floor`` instead.  Returned as a float64 tensor over the ``N`` positions.
    """
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau!r}")
    return (tau * chain.variance.sqrt()).clamp(min=floor)


def block_picard(blocks: int, iterations: int) -> GSJacobi:
    """Chen et al.'s block Picard iteration as a core method (use it on a :class:`PicardMap`).

    The horizon is split into ``blocks`` consecutive blocks of steps, solved in order;
    inside each, ``iterations`` Picard (Jacobi-on-the-integral-form) sweeps update all
    of the block's grid points at once, from the block's (already final) start state.
    That is block Gauss-Seidel over modules with a fixed iteration count per module:
    ``GSJacobi(modules=blocks, max_iter=iterations)`` with a zero tolerance, so each
    block runs its ``iterations`` unless it is exact sooner.  A block that did not
    converge leaves the status ``MAX_ITER``: the fixed count, not a tolerance, is the
    stopping rule.
    """
    return GSJacobi(modules=blocks, max_iter=iterations, atol=0.0, rtol=0.0)

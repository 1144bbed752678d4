"""Sampler chains: the ``N`` steps ``x_{n+1} = Phi_n(x_n)`` of a diffusion sampler.

A chain knows the arithmetic of its steps and nothing about solving: given a batch of
rows, each a state ``x`` with its own step index ``n`` (and, for a stochastic sampler,
its own pre-drawn noise ``z``), :meth:`Chain.step` applies ``Phi_n`` to every row with
one batched call of the noise predictor per stage.  Rows at different steps can share a
call, which is what lets a window of steps be one network evaluation.

Every chain also names the linear part ``a_n`` of its step (``Phi_n(x) = a_n x +
(nonlinear rest)``), the coefficient the Picard form integrates out (see ``maps.py``),
and a per-step noise variance for the ParaDiGMS stopping rule.

The four samplers (all on the timestep grid diffusers would use for the same config):

* :class:`DDIMChain`: deterministic DDIM, diffusers' ``DDIMScheduler.step`` with
  ``eta = 0``.  It is the exponential integrator of the probability-flow ODE, i.e.
  Euler's method in the coordinates ``y = x / sqrt(abar)``, ``sigma = sqrt(1/abar - 1)``.
* :class:`DDPMChain`: ancestral DDPM sampling, ``DDPMScheduler.step``, with the noise
  drawn before solving, so the chain is a deterministic function of ``(x_N, noise)``.
* :class:`EulerChain` and :class:`HeunChain`: Euler and Heun (explicit trapezoid) on the
  probability-flow ODE written in the data coordinates ``x`` with time
  ``s = log(abar) / 2``: ``dx/ds = x - eps(x) / sqrt(1 - abar)``.  Unlike DDIM they do
  not integrate the linear part exactly; Heun costs two dependent network evaluations
  per step (one on the last step, which ends at ``abar = 1`` where the noise prediction
  is undefined).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from enum import Enum
from typing import ClassVar

import torch
from torch import Tensor

from .schedule import NoiseSchedule

__all__ = ["Chain", "DDIMChain", "DDPMChain", "EpsFn", "EulerChain", "HeunChain", "Split"]


class Split(Enum):
    """Which linear part ``a_n`` a DDIM or DDPM step is split into (``Phi_n = a_n x + b_n``).

    The step is the same either way; only the Picard form's iteration changes.

    * ``NOISE`` (the default): the rest is a multiple of the noise prediction, ``a_n =
      sqrt(abar_{n+1} / abar_n) > 1``: ParaDiGMS's sum of Euler increments in ``sigma``.
      The products ``A_n / A_m`` amplify early errors by up to ``1/sqrt(abar_T)``, and
      the increments' derivative grows like ``1/sigma`` off the data.
    * ``CLEAN``: the rest is a multiple of the predicted clean sample (DPM-Solver++'s
      coordinates), ``a_n = sqrt((1 - abar_{n+1}) / (1 - abar_n)) < 1`` for DDIM and the
      posterior mean's coefficient of ``x_t`` for DDPM, so ``A_n / A_m <= 1`` damps early
      errors; the clean prediction's derivative is bounded (near a projection) when the
      network predicts ``eps ~ x`` at high noise, as the exact score does, and up to
      ``1/sqrt(abar)`` when it does not.  Measured on DDIM-100, Picard to ``atol =
      1e-4``: 6-12 iterations against 23 on exact-score mixtures (``d = 784``); on the
      digits UNet (guidance 2, within a 1e-3 deviation) 11.5 against 21; on a 300-step
      (undertrained) digits UNet, DDIM-20, it is the noise split that needs fewer.  The
      last step lands on ``abar = 1``, where this ``a_n`` is 0 (the Picard form divides by
      ``A_n``); that step keeps the noise split's ``a_n``.
    """

    NOISE = "noise"
    CLEAN = "clean"


EpsFn = Callable[..., Tensor]
"""``eps(x (R', d), timesteps (R',), rows=None) -> (R', d)``: the (guided) noise prediction.

``rows`` (an index into the ``R`` rows of the current :meth:`Chain.step` call) says which
rows ``x`` holds when it is a subset; ``None`` means all of them, in order."""


def _take(coef: Tensor, n: Tensor, like: Tensor) -> Tensor:
    """Per-row coefficient column ``coef[n]`` in the dtype and device of ``like``."""
    return coef.to(like.device)[n].to(like.dtype)[:, None]


class Chain(ABC):
    """``N`` sampler steps on a fixed grid; ``step`` applies ``Phi_n`` row by row."""

    stochastic: ClassVar[bool] = False
    stages: ClassVar[int] = 1  # dependent network evaluations per step

    def __init__(self, timesteps: Tensor, abar: Tensor, abar_next: Tensor):
        self.timesteps = timesteps.long()
        # The coefficients of DDIM and DDPM are computed in the schedule's own dtype
        # (float32 in diffusers) in diffusers' order of operations: a random test UNet
        # amplifies even one-ulp differences along the chain.  float64 copies serve the
        # Picard form's linear parts and everything not taken from diffusers.
        self.abar32 = abar.float()
        self.abar_next32 = abar_next.float()
        self.abar = abar.double()
        self.abar_next = abar_next.double()
        if self.timesteps.ndim != 1 or len(self.timesteps) == 0:
            raise ValueError("a chain needs at least one step")

    def __len__(self) -> int:
        return len(self.timesteps)

    @property
    def name(self) -> str:
        return type(self).__name__.removesuffix("Chain").lower()

    @abstractmethod
    def step(self, x: Tensor, n: Tensor, eps: EpsFn, z: Tensor | None = None) -> Tensor:
        """``Phi_n(x)`` for rows ``x`` (``(R, d)``) at step indices ``n`` (``(R,)``)."""

    @property
    @abstractmethod
    def linear(self) -> Tensor:
        """``a_n`` (``(N,)``, float64): the linear part of step ``n``."""

    @property
    def variance(self) -> Tensor:
        """The DDPM posterior variance of each step's noise-level pair (``(N,)``).

        The ParaDiGMS stopping rule scales step ``n``'s update by it, for every sampler.
        """
        a, a_next = self.abar, self.abar_next
        beta = 1 - a / a_next
        return ((1 - a_next) / (1 - a) * beta).clamp(min=1e-20)


class _PredictsClean(Chain):
    """Steps that go through the predicted clean sample, optionally clamped."""

    def __init__(
        self,
        timesteps: Tensor,
        abar: Tensor,
        abar_next: Tensor,
        clip: float | None,
        split: Split = Split.NOISE,
    ):
        super().__init__(timesteps, abar, abar_next)
        self.clip = clip
        try:
            self.split = Split(split)
        except ValueError:
            names = ", ".join(f"Split.{s.name}" for s in Split)
            raise ValueError(f"split must be one of {names}, got {split!r}") from None
        self.sqrt_abar = self.abar32**0.5
        self.sqrt_one_minus = (1 - self.abar32) ** 0.5

    def _clean(self, x: Tensor, e: Tensor, n: Tensor) -> Tensor:
        x0 = (x - _take(self.sqrt_one_minus, n, x) * e) / _take(self.sqrt_abar, n, x)
        return x0 if self.clip is None else x0.clamp(-self.clip, self.clip)

    @property
    def linear(self) -> Tensor:
        noise = self._noise_linear()
        if self.split is Split.NOISE:
            return noise
        clean = self._clean_linear()
        return torch.where(clean > 0, clean, noise)

    @abstractmethod
    def _noise_linear(self) -> Tensor: ...

    @abstractmethod
    def _clean_linear(self) -> Tensor: ...


class DDIMChain(_PredictsClean):
    """Deterministic DDIM (``eta = 0``), step for step as ``DDIMScheduler.step``."""

    @classmethod
    def from_schedule(
        cls, schedule: NoiseSchedule, steps: int, split: Split = Split.NOISE
    ) -> DDIMChain:
        timesteps, abar_next = schedule.ddim_grid(steps)
        abar = schedule.alphas_cumprod[timesteps]
        return cls(timesteps, abar, abar_next, schedule.clip_range, split)

    def step(self, x: Tensor, n: Tensor, eps: EpsFn, z: Tensor | None = None) -> Tensor:
        e = eps(x, self.timesteps.to(x.device)[n])
        x0 = self._clean(x, e, n)
        a_next = self.abar_next32
        return _take(a_next**0.5, n, x) * x0 + _take((1 - a_next) ** 0.5, n, x) * e

    def _noise_linear(self) -> Tensor:
        return (self.abar_next / self.abar).sqrt()

    def _clean_linear(self) -> Tensor:
        return ((1 - self.abar_next) / (1 - self.abar)).sqrt()


class DDPMChain(_PredictsClean):
    """Ancestral DDPM, step for step as ``DDPMScheduler.step``, noise given per row.

    ``z`` is the standard normal noise of each row's step; steps at timestep 0 add none
    (as in diffusers), so their noise is ignored.
    """

    stochastic = True

    def __init__(
        self,
        timesteps: Tensor,
        abar: Tensor,
        abar_next: Tensor,
        clip: float | None,
        fixed_large: bool = False,
        split: Split = Split.NOISE,
    ):
        super().__init__(timesteps, abar, abar_next, clip, split)
        a, a_next = self.abar32, self.abar_next32
        alpha = a / a_next
        beta = 1 - alpha
        self.coef_clean = (a_next**0.5 * beta) / (1 - a)
        self.coef_sample = alpha**0.5 * (1 - a_next) / (1 - a)
        var = beta if fixed_large else ((1 - a_next) / (1 - a) * beta).clamp(min=1e-20)
        self.std = torch.where(self.timesteps > 0, var**0.5, torch.zeros_like(var))

    @classmethod
    def from_schedule(
        cls, schedule: NoiseSchedule, steps: int, split: Split = Split.NOISE
    ) -> DDPMChain:
        timesteps, prev = schedule.ddpm_grid(steps)
        abar_all = schedule.alphas_cumprod
        abar_next = torch.where(prev >= 0, abar_all[prev.clamp(min=0)], torch.ones(()))
        fixed_large = schedule.config.get("variance_type", "fixed_small") == "fixed_large"
        return cls(
            timesteps, abar_all[timesteps], abar_next, schedule.clip_range, fixed_large, split
        )

    def step(self, x: Tensor, n: Tensor, eps: EpsFn, z: Tensor | None = None) -> Tensor:
        if z is None:
            raise ValueError("DDPM sampling needs its noise drawn in advance (z is None)")
        e = eps(x, self.timesteps.to(x.device)[n])
        x0 = self._clean(x, e, n)
        mean = _take(self.coef_clean, n, x) * x0 + _take(self.coef_sample, n, x) * x
        return mean + _take(self.std, n, x) * z

    def _noise_linear(self) -> Tensor:
        return self.coef_clean.double() / self.sqrt_abar.double() + self.coef_sample.double()

    def _clean_linear(self) -> Tensor:
        return self.coef_sample.double()


class _ProbabilityFlow(Chain):
    """The PF-ODE ``dx/ds = x - eps / sqrt(1 - abar)`` on the DDIM grid, ``s = log(abar)/2``."""

    def __init__(self, timesteps: Tensor, abar: Tensor, abar_next: Tensor):
        super().__init__(timesteps, abar, abar_next)
        self.ds = 0.5 * (self.abar_next / self.abar).log()
        self.inv_noise = (1 - self.abar).rsqrt()

    @classmethod
    def from_schedule(cls, schedule: NoiseSchedule, steps: int) -> _ProbabilityFlow:
        timesteps, abar_next = schedule.ddim_grid(steps)
        return cls(timesteps, schedule.alphas_cumprod[timesteps], abar_next)

    def _velocity(self, x: Tensor, e: Tensor, inv_noise: Tensor) -> Tensor:
        return x - inv_noise * e


class EulerChain(_ProbabilityFlow):
    """Euler's method on the probability-flow ODE in data coordinates."""

    def step(self, x: Tensor, n: Tensor, eps: EpsFn, z: Tensor | None = None) -> Tensor:
        e = eps(x, self.timesteps.to(x.device)[n])
        return x + _take(self.ds, n, x) * self._velocity(x, e, _take(self.inv_noise, n, x))

    @property
    def linear(self) -> Tensor:
        return 1 + self.ds


class HeunChain(_ProbabilityFlow):
    """Heun's method (trapezoid with an Euler predictor) on the probability-flow ODE.

    The corrector evaluates the network at the step's end, timestep ``t_{n+1}``; the
    last step ends at the clean sample, where that is undefined, and stays an Euler step.
    """

    stages = 2

    def __init__(self, timesteps: Tensor, abar: Tensor, abar_next: Tensor):
        super().__init__(timesteps, abar, abar_next)
        self.next_timesteps = torch.cat([self.timesteps[1:], self.timesteps.new_tensor([-1])])
        self.inv_noise_next = torch.where(
            self.next_timesteps >= 0, (1 - self.abar_next).clamp(min=1e-30).rsqrt(), 0.0
        )

    def step(self, x: Tensor, n: Tensor, eps: EpsFn, z: Tensor | None = None) -> Tensor:
        e = eps(x, self.timesteps.to(x.device)[n])
        ds = _take(self.ds, n, x)
        v1 = self._velocity(x, e, _take(self.inv_noise, n, x))
        euler = x + ds * v1
        t_next = self.next_timesteps.to(x.device)[n]
        inner = t_next >= 0
        if not bool(inner.any()):
            return euler
        rows = inner.nonzero().flatten()
        pe = euler[rows]
        e2 = eps(pe, t_next[rows], rows)
        v2 = self._velocity(pe, e2, _take(self.inv_noise_next, n[rows], x))
        out = euler.clone()
        out[rows] = x[rows] + ds[rows] * 0.5 * (v1[rows] + v2)
        return out

    @property
    def linear(self) -> Tensor:
        corrected = 1 + self.ds + 0.5 * self.ds**2
        return torch.where(self.next_timesteps >= 0, corrected, 1 + self.ds)

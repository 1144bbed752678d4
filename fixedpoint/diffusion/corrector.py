"""Chen et al.'s parallel predictor-corrector: block Picard, then Langevin at the block's end.

The probability-flow-ODE variant of Chen, Ren, Ying and Rotskoff (NeurIPS 2024,
"PIADM-ODE") splits the ``N`` sampler steps into outer blocks.  Each block is a
*predictor*, the probability-flow ODE over the block's steps solved by Picard
iterations that update all its grid points at once, then a *corrector*: a short run of
**underdamped** Langevin dynamics (the corrector Chen, Chewi, Lee, Li, Lu and Salim
(NeurIPS 2023) use for the probability-flow ODE, whose analysis PIADM-ODE parallelises)
that targets the marginal at the block's end noise level.  With its noise drawn in
advance the corrector is itself a strictly causal chain over its steps, solved by
Picard iterations in parallel.  Here both are ordinary chains, so every core method
(and both fixed-point forms of :mod:`fixedpoint.diffusion.maps`) solves them.

**The corrector.** At a fixed noise level ``abar`` (with ``sigma = sqrt(1 - abar)``) the
score is ``s(x) = -eps(x, t) / sigma`` (the eps-predictor of every chain here).  The
dynamics on position ``x`` and velocity ``v`` (unit mass) are

    dx = v dt,    dv = (-gamma v + s(x)) dt + sqrt(2 gamma) dB,

whose stationary law is ``p_abar(x) N(v; 0, I)``.  One step of length ``h`` freezes the
score at the step's start and integrates the rest exactly (the exponential integrator of
underdamped Langevin Monte Carlo): with ``c = gamma h``,

    v' = e^-c v + (1 - e^-c)/gamma s(x) + noise_v
    x' = x + (1 - e^-c)/gamma v + (h - (1 - e^-c)/gamma)/gamma s(x) + noise_x

with ``(noise_x, noise_v)`` per coordinate jointly Gaussian (covariance of the exact
Ornstein-Uhlenbeck increment), built from two pre-drawn standard normals per coordinate.
``step_size`` and ``friction`` are dimensionless, in units of the noise scale: ``h =
step_size * sigma``, ``gamma = friction / sigma``.  The reason: ``-grad^2 log p_abar`` is
at most ``I / sigma^2`` for any data (Tweedie), so ``sigma`` bounds the length and time
scale of the target, and Chen et al. 2023 tie both the corrector's run time and its
friction to that smoothness constant; one ``step_size`` then suits every level.

**As a chain.** The state is ``(x, v)`` stacked as sample shape ``(2, *shape)``;
:class:`PhaseSpaceDenoiser` lets the usual maps evaluate the noise predictor on the
position half.  The linear part is the identity (``linear = 1``), so the Picard form
is the telescoping sum ``x_0 + sum (Phi_m(s_m) - s_m)``, whose increments are of the
order of the step: Picard converges geometrically here as on the sampler chains.

**Where the corrector runs.** After every block that ends at a training timestep, i.e.
after every block but the last: the last ends at the clean sample (``abar = 1`` on the
DDIM grid), where the noise prediction carries no score (Chen et al. stop the
probability flow early for the same reason).

:func:`predictor_corrector` runs the whole sampler and sums the costs of every solve;
with :class:`fixedpoint.Sequential` for both parts it is the plain sequential
predictor-corrector loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..methods import GSJacobi
from .chain import Chain, EpsFn
from .maps import ChainMap, Denoiser, PicardMap
from .sampling import block_picard, solve_chain

__all__ = [
    "ChainSegment",
    "CorrectedSample",
    "CorrectorNoise",
    "LangevinChain",
    "PhaseSpaceDenoiser",
    "SolveRecord",
    "predictor_corrector",
]


def _positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {value!r}")
    return float(value)


def _count(name: str, value: Any, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < least:
        raise ValueError(f"{name} must be >= {least}, got {value}")
    return value


def _g(c: float) -> float:
    """``c - 2 (1 - e^-c) + (1 - e^-2c) / 2`` without cancellation (it is ``c^3/3 + ..``).

    The series ``sum_{k>=3} (-1)^k (2 - 2^(k-1)) c^k / k!`` for ``c < 1`` (its terms
    shrink at least fourfold beyond ``k = 4``), the closed form above it.
    """
    if c >= 1.0:
        return c + 2.0 * math.expm1(-c) - 0.5 * math.expm1(-2.0 * c)
    total, term = 0.0, c**2 / 2.0  # term = c^k / k!
    for k in range(3, 40):
        term *= c / k
        piece = (2.0 - 2.0 ** (k - 1)) * term
        total += piece if k % 2 == 0 else -piece
        if abs(piece) < 1e-18 * abs(total):
            break
    return total


def _kick(c: float) -> float:
    """``c - (1 - e^-c)`` without cancellation: ``sum_{k>=2} (-1)^k c^k / k!`` below 1."""
    if c >= 1.0:
        return c + math.expm1(-c)
    total, term = 0.0, c
    for k in range(2, 40):
        term *= c / k
        total += term if k % 2 == 0 else -term
        if term < 1e-18 * abs(total):
            break
    return total


@dataclass(frozen=True)
class _Coefficients:
    """The exact-OU step of length ``h`` with friction ``gamma`` (all float64 scalars)."""

    decay: float  # e^-c: velocity kept
    drift: float  # (1 - e^-c)/gamma: v -> x, and s -> v
    kick: float  # (h - drift)/gamma: s -> x
    noise_v: float  # std of the velocity noise
    noise_xv: float  # the position noise's share of the velocity noise's normal
    noise_x: float  # the position noise's own std
    var_x: float
    var_v: float

    @classmethod
    def of(cls, h: float, gamma: float) -> _Coefficients:
        c = gamma * h
        one_minus = -math.expm1(-c)  # 1 - e^-c
        drift = one_minus / gamma
        var_v = -math.expm1(-2.0 * c)
        cov = one_minus**2 / gamma
        var_x = 2.0 * _g(c) / gamma**2
        # Schur complement var_x - cov^2 / var_v, as (2 g - (1-e^-c)^3 / (1+e^-c)) / gamma^2
        schur = (2.0 * _g(c) - one_minus**3 / (1.0 + math.exp(-c))) / gamma**2
        return cls(
            decay=math.exp(-c),
            drift=drift,
            kick=_kick(c) / gamma**2,  # (h - drift) / gamma
            noise_v=math.sqrt(var_v),
            noise_xv=cov / math.sqrt(var_v),
            noise_x=math.sqrt(max(schur, 0.0)),
            var_x=var_x,
            var_v=var_v,
        )


class LangevinChain(Chain):
    """``steps`` underdamped Langevin steps at one noise level, noise given per row.

    Rows are phase-space states ``(x, v)`` flattened (the first half is the position);
    ``z`` holds two standard normals per coordinate, ``z[:, :d]`` for the position and
    ``z[:, d:]`` for the velocity (see the module docstring for the update).  The noise
    level is the training timestep ``timestep`` with cumulative alpha ``abar``; they must
    be the pair the denoiser uses (``alphas_cumprod[timestep] == abar``).
    """

    stochastic = True

    def __init__(
        self,
        timestep: int,
        abar: float,
        steps: int,
        *,
        step_size: float,
        friction: float = 2.0,
    ):
        steps = _count("corrector steps", steps, 1)
        self.step_size = _positive("step_size", step_size)
        self.friction = _positive("friction", friction)
        abar = float(abar)
        if not 0.0 < abar < 1.0:
            raise ValueError(f"the corrector needs a noise level 0 < abar < 1, got {abar}")
        ts = torch.full((steps,), int(timestep), dtype=torch.long)
        level = torch.full((steps,), abar, dtype=torch.float64)
        super().__init__(ts, level, level)
        self.sigma = math.sqrt(1.0 - abar)
        self.h = self.step_size * self.sigma
        self.gamma = self.friction / self.sigma
        self.coef = _Coefficients.of(self.h, self.gamma)

    @classmethod
    def at(
        cls, chain: Chain, position: int, steps: int, *, step_size: float, friction: float = 2.0
    ) -> LangevinChain:
        """The corrector at the noise level where step ``position`` of ``chain`` starts."""
        if not 0 <= position < len(chain):
            raise ValueError(f"position {position} is outside the chain's {len(chain)} steps")
        return cls(
            int(chain.timesteps[position]),
            float(chain.abar[position]),
            steps,
            step_size=step_size,
            friction=friction,
        )

    @property
    def name(self) -> str:
        return "langevin"

    def step(self, x: Tensor, n: Tensor, eps: EpsFn, z: Tensor | None = None) -> Tensor:
        if z is None:
            raise ValueError("the Langevin corrector needs its noise drawn in advance (z is None)")
        d = x.shape[1] // 2
        k = self.coef
        pos, vel = x[:, :d], x[:, d:]
        score = eps(x, self.timesteps.to(x.device)[n]) * (-1.0 / self.sigma)
        zx, zv = z[:, :d], z[:, d:]
        new_vel = k.decay * vel + k.drift * score + k.noise_v * zv
        new_pos = pos + k.drift * vel + k.kick * score + k.noise_xv * zv + k.noise_x * zx
        return torch.cat([new_pos, new_vel], 1)

    @property
    def linear(self) -> Tensor:
        # Identity: the Picard form is then the plain telescoping sum of the increments.
        return torch.ones(len(self), dtype=torch.float64)

    @property
    def variance(self) -> Tensor:
        """Per-step noise variance, averaged over the position and velocity coordinates."""
        v = 0.5 * (self.coef.var_x + self.coef.var_v)
        return torch.full((len(self),), v, dtype=torch.float64)


class PhaseSpaceDenoiser:
    """A denoiser on phase-space states ``(R, 2, *shape)`` that reads the position half.

    Lets :class:`LangevinChain` run through the usual maps (batching, guidance, network
    counts): the network sees the positions only, one row per state.
    """

    def __init__(self, denoiser: Denoiser):
        self.denoiser = denoiser
        self.sample_shape: tuple[int, ...] = (2, *denoiser.sample_shape)
        self.num_classes = denoiser.num_classes
        self.null_label = denoiser.null_label

    def __call__(self, x: Tensor, timesteps: Tensor, labels: Tensor | None) -> Tensor:
        return self.denoiser(x[:, 0], timesteps, labels)


class ChainSegment(Chain):
    """Steps ``lo .. hi-1`` of a chain, as a chain of their own (an outer block).

    Delegates every step to the parent at the shifted index, so any chain (Heun's
    end-of-step evaluation included) is cut exactly where the whole-chain loop would be.
    """

    def __init__(self, chain: Chain, lo: int, hi: int):
        if not 0 <= lo < hi <= len(chain):
            raise ValueError(f"segment [{lo}, {hi}) is not inside the chain's {len(chain)} steps")
        super().__init__(chain.timesteps[lo:hi], chain.abar32[lo:hi], chain.abar_next32[lo:hi])
        self.abar, self.abar_next = chain.abar[lo:hi], chain.abar_next[lo:hi]
        self.parent, self.lo, self.hi = chain, lo, hi
        self.stochastic = chain.stochastic  # type: ignore[misc]
        self.stages = chain.stages  # type: ignore[misc]

    @property
    def name(self) -> str:
        return self.parent.name

    def step(self, x: Tensor, n: Tensor, eps: EpsFn, z: Tensor | None = None) -> Tensor:
        return self.parent.step(x, n + self.lo, eps, z)

    @property
    def linear(self) -> Tensor:
        return self.parent.linear[self.lo : self.hi]

    @property
    def variance(self) -> Tensor:
        return self.parent.variance[self.lo : self.hi]


@dataclass(frozen=True)
class CorrectorNoise:
    """The correctors' noise, drawn before solving.

    ``velocity`` (``(B, J, *shape)``): each corrector's initial velocity (standard
    normal, the stationary law of ``v``); ``steps`` (``(B, J, M, 2, *shape)``): the two
    standard normals per coordinate of each of the ``M`` steps of each of the ``J``
    correctors.
    """

    velocity: Tensor
    steps: Tensor

    @classmethod
    def draw(
        cls,
        batch: int,
        correctors: int,
        steps: int,
        shape: tuple[int, ...],
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
    ) -> CorrectorNoise:
        kw: dict[str, Any] = dict(generator=generator, dtype=dtype, device=device)
        velocity = torch.randn(batch, correctors, *shape, **kw)
        return cls(velocity, torch.randn(batch, correctors, steps, 2, *shape, **kw))

    def check(self, batch: int, correctors: int, steps: int, shape: tuple[int, ...]) -> None:
        want_v, want_s = (batch, correctors, *shape), (batch, correctors, steps, 2, *shape)
        if tuple(self.velocity.shape) != want_v:
            raise ValueError(
                f"corrector velocity noise must have shape {want_v}, "
                f"got {tuple(self.velocity.shape)}"
            )
        if tuple(self.steps.shape) != want_s:
            raise ValueError(
                f"corrector step noise must have shape {want_s}, got {tuple(self.steps.shape)}"
            )
        for part in (self.velocity, self.steps):
            if not part.is_floating_point() or not bool(torch.isfinite(part).all()):
                raise ValueError("corrector noise must be finite floating-point numbers")


@dataclass(frozen=True)
class SolveRecord:
    """One solve of :func:`predictor_corrector`: a predictor block or a corrector."""

    kind: str  # "predictor" or "corrector"
    block: int
    length: int  # positions of the solve (block steps, or corrector steps)
    iterations: int
    dependent_steps: int
    network_calls: int  # batched network calls, each waiting on the last
    network_rows: int
    status: str


@dataclass
class CorrectedSample:
    """The predictor-corrector sample and the summed costs of all its solves."""

    sample: Tensor
    solves: list[SolveRecord] = field(default_factory=list)

    def _total(self, attr: str, kind: str | None = None) -> int:
        return sum(getattr(s, attr) for s in self.solves if kind is None or s.kind == kind)

    @property
    def network_calls(self) -> int:
        """Dependent network evaluations: every batched call waits on the one before."""
        return self._total("network_calls")

    @property
    def network_rows(self) -> int:
        return self._total("network_rows")

    @property
    def dependent_steps(self) -> int:
        return self._total("dependent_steps")

    @property
    def iterations(self) -> int:
        return self._total("iterations")

    def cost(self, kind: str) -> dict[str, int]:
        """Summed ``network_calls``, ``network_rows``, ``iterations`` of one ``kind``."""
        return {a: self._total(a, kind) for a in ("network_calls", "network_rows", "iterations")}


def predictor_corrector(
    chain: Chain,
    denoiser: Denoiser,
    x_init: Tensor,
    *,
    blocks: int | tuple[int, ...],
    corrector_steps: int,
    step_size: float = 0.2,
    friction: float = 2.0,
    iterations: int = 8,
    corrector_iterations: int | None = None,
    predictor: object | None = None,
    corrector: object | None = None,
    corrector_noise: CorrectorNoise | None = None,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
    form: type[ChainMap] = PicardMap,
    labels: Tensor | None = None,
    guidance: float | None = None,
) -> CorrectedSample:
    """Chen et al.'s sampler: per outer block a predictor solve, then a corrector solve.

    ``blocks`` splits the chain's ``N`` steps as :class:`fixedpoint.GSJacobi` splits
    positions (a count, the first ``N % blocks`` one step longer, or start indices).
    Each block is solved from the previous block's result by ``predictor`` (default:
    block Picard, ``iterations`` Picard sweeps over the whole block, see
    :func:`~fixedpoint.diffusion.block_picard`) on the ``form`` of its steps; then, if
    the block ends at a training timestep and ``corrector_steps > 0``, by
    ``corrector_steps`` underdamped Langevin steps at that level (:class:`LangevinChain`,
    ``step_size`` and ``friction`` in units of the noise scale) solved by ``corrector``
    (default: block Picard with ``corrector_iterations``, default ``iterations``).  Any
    core method fits either slot; :class:`fixedpoint.Sequential` in both is the plain
    loop.

    The corrector noise is ``corrector_noise`` or drawn from ``generator`` before any
    solve; ``noise`` is a stochastic chain's own noise (``(B, N, *shape)``).  Returns the
    sample and one :class:`SolveRecord` per solve.
    """
    corrector_steps = _count("corrector steps", corrector_steps, 0)
    step_size = _positive("step_size", step_size)
    friction = _positive("friction", friction)
    iterations = _count("iterations", iterations, 1)
    if corrector_iterations is not None:
        corrector_iterations = _count("corrector_iterations", corrector_iterations, 1)
    edges = GSJacobi(modules=blocks).boundaries(len(chain))
    shape = tuple(denoiser.sample_shape)
    if tuple(x_init.shape[1:]) != shape:
        raise ValueError(
            f"x_init has sample shape {tuple(x_init.shape[1:])}, but the model takes {shape}"
        )
    batch = x_init.shape[0]
    ends = [hi for hi in edges[1:] if hi < len(chain)]  # block ends with a noise level
    for hi in ends:
        if abs(float(chain.abar_next[hi - 1]) - float(chain.abar[hi])) > 1e-9:
            raise ValueError(
                f"step {hi - 1} ends at abar {float(chain.abar_next[hi - 1])}, but step {hi} "
                f"starts at {float(chain.abar[hi])}: the grid is not continuous"
            )
    if noise is not None and tuple(noise.shape[:2]) != (batch, len(chain)):
        raise ValueError(
            f"noise must have shape {(batch, len(chain), *shape)}, got {tuple(noise.shape)}"
        )
    correctors = len(ends) if corrector_steps > 0 else 0
    if correctors:
        if corrector_noise is None:
            corrector_noise = CorrectorNoise.draw(
                batch,
                correctors,
                corrector_steps,
                shape,
                generator=generator,
                dtype=x_init.dtype,
                device=x_init.device,
            )
        corrector_noise.check(batch, correctors, corrector_steps, shape)
    pred = block_picard(1, iterations) if predictor is None else predictor
    corr = corrector
    if corr is None:
        corr = block_picard(1, corrector_iterations or iterations)
    phase = PhaseSpaceDenoiser(denoiser)
    out = CorrectedSample(x_init)
    x = x_init
    j = 0
    with torch.no_grad():
        for b, (lo, hi) in enumerate(zip(edges, edges[1:])):
            seg = ChainSegment(chain, lo, hi)
            seg_noise = None if noise is None else noise[:, lo:hi]
            fmap = form(seg, denoiser, x, seg_noise, labels=labels, guidance=guidance)
            solved = solve_chain(fmap, pred)
            out.solves.append(_record("predictor", b, hi - lo, solved))
            x = solved.sample
            if j < correctors and hi == ends[j]:
                assert corrector_noise is not None
                lchain = LangevinChain.at(
                    chain, hi, corrector_steps, step_size=step_size, friction=friction
                )
                v0 = corrector_noise.velocity[:, j].to(x.dtype)
                state = torch.stack([x, v0], 1)
                cnoise = corrector_noise.steps[:, j].to(x.dtype)
                cmap = form(lchain, phase, state, cnoise, labels=labels, guidance=guidance)
                solved = solve_chain(cmap, corr)
                out.solves.append(_record("corrector", b, corrector_steps, solved))
                x = solved.sample[:, 0]
                j += 1
    out.sample = x
    return out


def _record(kind: str, block: int, length: int, solved: Any) -> SolveRecord:
    res = solved.result
    return SolveRecord(
        kind,
        block,
        length,
        res.iterations,
        res.dependent_steps,
        solved.network.calls,
        solved.network.rows,
        res.status.name,
    )

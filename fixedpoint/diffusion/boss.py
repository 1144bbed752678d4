"""BOSS: Bellman-optimal step sizes for Euler sampling of a probability-flow ODE.

Nguyen, Nguyen & Nguyen (2024), "Bellman Optimal Step-size Straightening of Flow-Matching
Models".  What no library has and is therefore written here: the ODE of both model kinds
in one time variable, the cost matrix, the dynamic programme and the straightening loop.
The reference trajectories are the fine Euler chain, solved by the core's parallel
methods on its Picard form (:class:`~fixedpoint.diffusion.maps.PicardMap`).

**One time variable for both model kinds.**  State ``y``, time ``t``, ``t = 0`` data,
``dy/dt = v(y, t)``, sampled from ``t_start`` down to 0, along the linear path
``y = (1 - t) x0 + t eps``:

* a flow-matching model (:class:`~fixedpoint.diffusion.flow.FlowModel`) predicts ``v``
  directly (``t_start = 1``, UNet timestep ``1000 t``);
* a noise model (DDPM, ``x = sqrt(abar) x0 + sqrt(1 - abar) eps``) is the same path
  rescaled: ``sigma = sqrt((1 - abar) / abar)``, ``t = sigma / (1 + sigma)``,
  ``y = x sqrt(abar) (1 + sigma)``, and its probability-flow ODE is
  ``v = eps_hat - x0_hat = (eps_hat(x) - y) / (1 - t)``.  Euler in ``(y, t)`` keeps
  ``x0_hat`` and ``eps_hat`` of the step's start fixed, which is exactly DDIM: BOSS on a
  noise model chooses DDIM's times.  The UNet is queried at the continuous timestep
  interpolated in ``log sigma`` over its training schedule (as k-diffusion does).

**BOSS.**  Euler on a fine uniform grid of ``K_max`` steps from noise samples gives
reference states ``x_0 .. x_Kmax``.  One Euler jump from grid time ``t_i`` to ``t_j``
costs ``c[i][j] = mean_b ||x_i + (t_j - t_i) v(x_i, t_i) - x_j||^2``; ``v(x_i, t_i)`` is
read off the reference itself, ``(x_{i+1} - x_i) / (t_{i+1} - t_i)``, so the matrix costs
no network evaluation.  ``dp[k][j] = min_i dp[k-1][i] + c[i][j]`` gives the cheapest
``K``-jump path from ``t_start`` to 0 in ``O(K K_max^2)``.  Straightening (optional)
fine-tunes the network so that the Euler velocity at each chosen time is the chord
``(x_{k+1} - x_k) / (t_{k+1} - t_k)`` of the reference between consecutive chosen times.
"""

from __future__ import annotations

import copy
import math
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..result import Status
from .chain import Chain, EpsFn
from .flow import VELOCITY, FlowModel, load_flow_model
from .maps import PicardMap
from .model import META, DiffusionModel, _read_json, load_model
from .sampling import sample_loop, solve_chain

__all__ = [
    "BossError",
    "BossGrid",
    "FlowEulerChain",
    "NoiseFlow",
    "ProbabilityFlow",
    "Reference",
    "VelocityFlow",
    "boss_grid",
    "boss_grids",
    "cost_matrix",
    "flow_sample",
    "load_flow",
    "optimal_steps",
    "probability_flow",
    "reference_trajectories",
    "straighten",
]


class BossError(ValueError):
    """A BOSS request that cannot be honoured (step counts, time grids, model kinds)."""


# --------------------------------------------------------------------------- the ODE
class ProbabilityFlow(ABC):
    """``dy/dt = v(y, t)`` of a model in the common time (see the module docstring)."""

    prediction: str  # what the network predicts: "velocity" or "epsilon"

    def __init__(self, model: Any):
        if model.prediction != self.prediction:
            raise BossError(
                f"a {model.prediction} model was given where a {self.prediction} model is expected"
            )
        self.model = model
        self.denoiser = model.denoiser()

    @property
    @abstractmethod
    def t_start(self) -> float:
        """The time of pure noise, where sampling starts."""

    @abstractmethod
    def model_timesteps(self, t: Tensor) -> Tensor:
        """The UNet's (continuous) timestep at times ``t``."""

    @abstractmethod
    def network_input(self, y: Tensor, t: Tensor) -> Tensor:
        """What the UNet sees for state ``y`` at ``t`` (rows, flattened), ``t`` as ``(R, 1)``."""

    @abstractmethod
    def velocity(self, out: Tensor, y: Tensor, t: Tensor) -> Tensor:
        """``v(y, t)`` from the UNet's output ``out`` (rows), ``t`` as ``(R, 1)``."""

    @abstractmethod
    def linear(self, t: Tensor) -> Tensor:
        """``lambda(t)`` with ``v = lambda(t) y + (rest)``: integrated out by the Picard form."""

    def start(self, noise: Tensor, t: float | None = None) -> Tensor:
        """The state at time ``t`` (default ``t_start``) that standard normal ``noise`` gives."""
        return noise

    def with_model(self, model: Any) -> ProbabilityFlow:
        """The same ODE for another network of the same kind (a fine-tuned copy)."""
        return type(self)(model)

    def uniform_times(self, steps: int) -> Tensor:
        """``steps + 1`` times, uniform from ``t_start`` to 0 (float64)."""
        _check_count("steps", steps)
        return self.t_start * (1 - torch.arange(steps + 1, dtype=torch.float64) / steps)

    def chain(self, times: Tensor) -> FlowEulerChain:
        return FlowEulerChain(self, times)


class VelocityFlow(ProbabilityFlow):
    """A flow-matching model: ``v`` is the network's output at timestep ``1000 t``."""

    prediction = VELOCITY

    @property
    def t_start(self) -> float:
        return 1.0

    def model_timesteps(self, t: Tensor) -> Tensor:
        return (t * self.model.num_train_timesteps).float()

    def network_input(self, y: Tensor, t: Tensor) -> Tensor:
        return y

    def velocity(self, out: Tensor, y: Tensor, t: Tensor) -> Tensor:
        return out

    def linear(self, t: Tensor) -> Tensor:
        return torch.zeros_like(t, dtype=torch.float64)


class NoiseFlow(ProbabilityFlow):
    """A DDPM noise model's probability-flow ODE in the common time (Euler = DDIM)."""

    prediction = "epsilon"

    def __init__(self, model: DiffusionModel):
        super().__init__(model)
        abar = model.schedule.alphas_cumprod.double()
        # log sigma of the training timesteps, increasing: the table for the timestep.
        self.log_sigma = 0.5 * ((1 - abar) / abar).log()

    @property
    def t_start(self) -> float:
        sigma = math.exp(float(self.log_sigma[-1]))
        return sigma / (1 + sigma)

    @staticmethod
    def time_of(abar: Tensor) -> Tensor:
        """``t`` of noise level(s) ``abar`` (``abar = 1``: ``t = 0``)."""
        abar = torch.as_tensor(abar, dtype=torch.float64)
        sigma = ((1 - abar) / abar).clamp(min=0).sqrt()
        return sigma / (1 + sigma)

    def ddim_times(self, steps: int) -> Tensor:
        """The times of diffusers' DDIM grid of ``steps`` steps (ends at 0 with
        ``set_alpha_to_one``): Euler on them is DDIM."""
        timesteps, abar_next = self.model.schedule.ddim_grid(steps)
        abar = self.model.schedule.alphas_cumprod[timesteps]
        return self.time_of(torch.cat([abar[:1], abar_next]).double())

    def model_timesteps(self, t: Tensor) -> Tensor:
        t = t.double()
        log_sigma = (t / (1 - t)).clamp(min=1e-30).log()
        table = self.log_sigma.to(t.device)
        k = torch.searchsorted(table, log_sigma.contiguous()).clamp(1, len(table) - 1)
        lo, hi = table[k - 1], table[k]
        frac = ((log_sigma - lo) / (hi - lo)).clamp(0, 1)
        return (k - 1 + frac).float()

    def _c_in(self, t: Tensor) -> Tensor:
        sigma = t / (1 - t)
        return (1 + sigma) / (1 + sigma**2).sqrt()

    def network_input(self, y: Tensor, t: Tensor) -> Tensor:
        return y * self._c_in(t.double()).to(y.dtype)

    def velocity(self, out: Tensor, y: Tensor, t: Tensor) -> Tensor:
        return (out - y) * (1 / (1 - t.double())).to(y.dtype)

    def linear(self, t: Tensor) -> Tensor:
        return -1 / (1 - t.double())

    def start(self, noise: Tensor, t: float | None = None) -> Tensor:
        """DDIM's start ``x_T = noise`` in the ``y`` coordinates."""
        t = self.t_start if t is None else t
        return noise / float(self._c_in(torch.tensor(t, dtype=torch.float64)))


_FLOWS: dict[str, type[ProbabilityFlow]] = {VELOCITY: VelocityFlow, "epsilon": NoiseFlow}


def probability_flow(model: DiffusionModel | FlowModel) -> ProbabilityFlow:
    """The ODE of ``model`` in the common time, by what the model predicts."""
    return _FLOWS[model.prediction](model)


def load_flow(directory: str | Path, *, device: str = "cpu") -> ProbabilityFlow:
    """Load either kind of model directory and return its probability-flow ODE."""
    directory = Path(directory)
    meta = _read_json(directory / META) if (directory / META).is_file() else {}
    if meta.get("prediction", "epsilon") == VELOCITY:
        return VelocityFlow(load_flow_model(directory, device=device))
    return NoiseFlow(load_model(directory, device=device))


# ------------------------------------------------------------------- the Euler chain
def check_times(times: Tensor, t_start: float) -> Tensor:
    """A time grid as float64: at least two points, strictly decreasing, in ``[0, t_start]``."""
    times = torch.as_tensor(times, dtype=torch.float64).flatten()
    if len(times) < 2:
        raise BossError(f"a time grid needs at least 2 points, got {len(times)}")
    if not bool(torch.isfinite(times).all()):
        raise BossError("the time grid has non-finite values")
    if not bool((times[1:] < times[:-1]).all()):
        raise BossError("the time grid is not strictly decreasing (noise -> data)")
    if float(times[-1]) < 0 or float(times[0]) > t_start * (1 + 1e-12):
        raise BossError(
            f"the time grid runs from {float(times[0]):g} to {float(times[-1]):g}, outside "
            f"[0, {t_start:g}]"
        )
    return times


class FlowEulerChain(Chain):
    """Euler on ``dy/dt = v(y, t)`` at the given decreasing times: one network call a step.

    A :class:`~fixedpoint.diffusion.chain.Chain`, so it goes through
    :func:`~fixedpoint.diffusion.sampling.sample_loop`, both triangular forms and every core
    method unchanged.  Its start state is :meth:`start` ``(noise)``; its last state is the
    sample at ``times[-1]`` (0: data).  The linear part ``1 + dt lambda(t)`` (zero lambda
    for a flow model, ``-1 / (1 - t)`` for a noise model) is what the Picard form
    integrates out.
    """

    def __init__(self, flow: ProbabilityFlow, times: Tensor):  # noqa: D107 (no Chain.__init__)
        self.flow = flow
        self.times = check_times(times, flow.t_start)
        self.dt = self.times[1:] - self.times[:-1]
        self.timesteps = flow.model_timesteps(self.times[:-1])

    @property
    def name(self) -> str:
        return "flow-euler"

    def start(self, noise: Tensor) -> Tensor:
        return self.flow.start(noise, float(self.times[0]))

    def step(self, x: Tensor, n: Tensor, eps: EpsFn, z: Tensor | None = None) -> Tensor:
        t = self.times.to(x.device)[n][:, None]
        dt = self.dt.to(x.device)[n][:, None]
        out = eps(self.flow.network_input(x, t), self.timesteps.to(x.device)[n])
        return x + dt.to(x.dtype) * self.flow.velocity(out, x, t)

    @property
    def linear(self) -> Tensor:
        return 1 + self.dt * self.flow.linear(self.times[:-1])

    @property
    def variance(self) -> Tensor:
        """No noise is drawn; the squared step size stands in for ParaDiGMS's rule."""
        return self.dt**2


def flow_sample(
    flow: ProbabilityFlow,
    times: Tensor,
    noise: Tensor,
    *,
    labels: Tensor | None = None,
    guidance: float | None = None,
) -> Tensor:
    """Euler on ``times`` from ``noise`` (``(B, *sample_shape)``), sequentially: the sample."""
    chain = FlowEulerChain(flow, times)
    return sample_loop(chain, flow.denoiser, chain.start(noise), labels=labels, guidance=guidance)


# ------------------------------------------------------------------------ reference
@dataclass
class Reference:
    """Fine-grid Euler trajectories: ``states[:, k]`` is the state at ``times[k]``."""

    times: Tensor  # (K_max + 1,) float64, t_start .. 0
    states: Tensor  # (B, K_max + 1, d), the start state included
    calls: int  # dependent (batched) network calls it took
    rows: int  # network rows in total (samples x steps x iterations)
    iterations: int  # solver iterations (K_max for the sequential loop)
    status: Status

    @property
    def k_max(self) -> int:
        return len(self.times) - 1


def reference_trajectories(
    flow: ProbabilityFlow,
    noise: Tensor,
    *,
    steps: int = 100,
    method: object | None = None,
    labels: Tensor | None = None,
    guidance: float | None = None,
) -> Reference:
    """Euler on the uniform ``steps``-step grid from ``noise`` (``(B, *sample_shape)``).

    ``method=None`` runs the sequential loop (``steps`` dependent calls); a core method
    (``fp.Jacobi()``, ``fp.TriangularAnderson()``, ``fp.SlidingWindow(w)``) solves the
    chain's Picard form instead, and ``calls`` says how many dependent calls that took.
    """
    chain = FlowEulerChain(flow, flow.uniform_times(steps))
    x_init = chain.start(noise)
    batch = len(noise)
    if method is None:
        states = sample_loop(
            chain, flow.denoiser, x_init, labels=labels, guidance=guidance, trajectory=True
        )
        per = 2 if guidance is not None else 1
        calls, rows, iterations, status = steps, steps * batch * per, steps, Status.SUCCESS
    else:
        fmap = PicardMap(chain, flow.denoiser, x_init, labels=labels, guidance=guidance)
        with torch.no_grad():
            out = solve_chain(fmap, method)
        states = out.result.x
        calls, rows = out.network.calls, out.network.rows
        iterations, status = out.result.iterations, out.result.status
    full = torch.cat([x_init.reshape(batch, 1, -1).to(states.dtype), states], 1)
    return Reference(chain.times, full, calls, rows, iterations, status)


def _seeded_noise(flow: ProbabilityFlow, samples: int, seed: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((samples, *flow.denoiser.sample_shape), generator=gen)


# ------------------------------------------------------------------- cost and the DP
def cost_matrix(reference: Reference, *, max_elements: int = 1 << 24) -> Tensor:
    """``c[i][j]`` (float64, ``(K_max + 1)^2``): one Euler jump ``t_i -> t_j`` on the reference.

    Mean over samples of the squared error summed over pixels; ``+inf`` where ``j <= i``.
    Rows are processed in chunks of at most ``max_elements`` numbers.
    """
    t = reference.times.double()
    x = reference.states.double()  # (B, K+1, d)
    batch, points, dim = x.shape
    v = (x[:, 1:] - x[:, :-1]) / (t[1:] - t[:-1])[None, :, None]  # the Euler velocities
    cost = torch.full((points, points), math.inf, dtype=torch.float64)
    chunk = max(1, max_elements // max(1, batch * points * dim))
    for lo in range(0, points - 1, chunk):
        hi = min(points - 1, lo + chunk)
        jump = (t[None, :] - t[lo:hi, None])[None, :, :, None]  # (1, c, K+1, 1)
        pred = x[:, lo:hi, None] + jump * v[:, lo:hi, None]  # (B, c, K+1, d)
        err = (pred - x[:, None]).pow(2).sum(-1).mean(0)  # (c, K+1)
        cost[lo:hi] = err
    above = torch.ones(points, points, dtype=torch.bool).triu(1)
    return cost.masked_fill(~above, math.inf)


def _check_count(name: str, value: int, top: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BossError(f"{name} must be an int, got {value!r}")
    if value <= 0:
        raise BossError(f"{name} must be >= 1, got {value}")
    if top is not None and value > top:
        raise BossError(f"{name}={value} exceeds K_max={top} (the reference grid's steps)")
    return value


def optimal_steps(cost: Tensor, steps: int) -> tuple[Tensor, float]:
    """The ``steps``-jump path ``0 = i_0 < ... < i_K = K_max`` of least total cost.

    ``dp[k][j] = min_i dp[k-1][i] + c[i][j]``, one ``(K_max+1)^2`` min per ``k``.
    Returns the indices (``(K + 1,)``, long) and the optimal cost.
    """
    cost = torch.as_tensor(cost, dtype=torch.float64)
    if cost.ndim != 2 or cost.shape[0] != cost.shape[1] or cost.shape[0] < 2:
        raise BossError(f"the cost matrix must be square, at least 2x2, got {tuple(cost.shape)}")
    k_max = cost.shape[0] - 1
    _check_count("K", steps, k_max)
    allowed = torch.ones_like(cost, dtype=torch.bool).triu(1)
    cost = cost.masked_fill(~allowed, math.inf)
    dp = torch.full((k_max + 1,), math.inf, dtype=torch.float64)
    dp[0] = 0.0
    back = torch.empty((steps, k_max + 1), dtype=torch.long)
    for k in range(steps):
        dp, back[k] = (dp[:, None] + cost).min(0)
    total = float(dp[k_max])
    if not math.isfinite(total):
        raise BossError("no finite-cost path: the cost matrix has non-finite entries")
    path = [k_max]
    for k in range(steps - 1, -1, -1):
        path.append(int(back[k, path[-1]]))
    return torch.tensor(path[::-1]), total


@dataclass(frozen=True)
class BossGrid:
    """A BOSS time grid: ``times`` (``(K + 1,)``, float64, decreasing) on the reference."""

    times: Tensor
    indices: Tensor  # into the reference grid of ``k_max`` steps
    cost: float  # the DP optimum (mean squared error summed over the jumps)
    k_max: int

    @property
    def steps(self) -> int:
        return len(self.times) - 1

    def chain(self, flow: ProbabilityFlow) -> FlowEulerChain:
        return FlowEulerChain(flow, self.times)

    def to_json(self) -> dict[str, Any]:
        return {
            "times": self.times.tolist(),
            "indices": self.indices.tolist(),
            "cost": self.cost,
            "k_max": self.k_max,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> BossGrid:
        times = torch.tensor(d["times"], dtype=torch.float64)
        if not bool((times[1:] < times[:-1]).all()):
            raise BossError("the stored BOSS grid is not strictly decreasing")
        return cls(times, torch.tensor(d["indices"]), float(d["cost"]), int(d["k_max"]))


def boss_grids(
    flow: ProbabilityFlow,
    steps: Iterable[int],
    *,
    reference: Reference | None = None,
    k_max: int = 100,
    samples: int = 100,
    seed: int = 0,
    method: object | None = None,
    labels: Tensor | None = None,
) -> dict[int, BossGrid]:
    """BOSS grids for several step counts from one reference (made here if not given:
    ``samples`` seeded noise samples, ``k_max`` uniform Euler steps, ``method`` as in
    :func:`reference_trajectories`)."""
    steps = list(steps)
    if reference is None:
        _check_count("K_max", k_max)
        for k in steps:
            _check_count("K", k, k_max)
        noise = _seeded_noise(flow, samples, seed)
        reference = reference_trajectories(flow, noise, steps=k_max, method=method, labels=labels)
    cost = cost_matrix(reference)
    out = {}
    for k in steps:
        indices, total = optimal_steps(cost, k)
        out[k] = BossGrid(reference.times[indices], indices, total, reference.k_max)
    return out


def boss_grid(flow: ProbabilityFlow, steps: int, **kwargs: Any) -> BossGrid:
    """The BOSS grid of ``steps`` Euler steps (keywords as :func:`boss_grids`)."""
    return boss_grids(flow, [steps], **kwargs)[steps]


# ------------------------------------------------------------------ straightening
def straighten(
    flow: ProbabilityFlow,
    grid: BossGrid,
    *,
    samples: int = 256,
    steps: int = 300,
    batch_size: int = 64,
    lr: float = 1e-4,
    seed: int = 0,
    labels: Tensor | None = None,
) -> ProbabilityFlow:
    """Fine-tune a copy of the network so that Euler on ``grid`` follows the reference.

    Reference trajectories (``samples`` noise samples seeded with ``seed + 1``, the grid's
    ``k_max`` uniform steps, the *original* network) give the states ``x_k`` at the
    chosen times; the loss is ``|| v(x_k, t_k) - (x_{k+1} - x_k) / (t_{k+1} - t_k) ||^2``
    over random (sample, step) pairs.  Adam, ``steps`` updates; the caller's model is
    left untouched.  Returns the ODE of the fine-tuned copy.
    """
    _check_count("steps", steps)
    _check_count("samples", samples)
    _check_count("batch_size", batch_size)
    noise = _seeded_noise(flow, samples, seed + 1)
    ref = reference_trajectories(flow, noise, steps=grid.k_max, labels=labels)
    idx = grid.indices
    states = ref.states[:, idx]  # (B, K+1, d)
    t = grid.times
    targets = (states[:, 1:] - states[:, :-1]) / (t[1:] - t[:-1]).to(states.dtype)[None, :, None]
    inputs = states[:, :-1]
    model = copy.deepcopy(flow.model)
    tuned = flow.with_model(model)
    unet = model.unet
    unet.train()
    unet.requires_grad_(True)
    classes = model.num_classes
    if labels is None and classes is not None:
        labels = torch.full((samples,), classes, dtype=torch.long)  # "no class"
    optimizer = torch.optim.Adam(unet.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed + 2)
    k_steps = len(t) - 1
    shape = flow.denoiser.sample_shape
    for _ in range(steps):
        b = torch.randint(0, samples, (batch_size,), generator=gen)
        k = torch.randint(0, k_steps, (batch_size,), generator=gen)
        y = inputs[b, k]
        tk = t[k][:, None]
        net_in = tuned.network_input(y, tk).reshape(batch_size, *shape)
        lab = None if labels is None else labels[b]
        out = unet(net_in, tuned.model_timesteps(t[k]), class_labels=lab).sample
        v = tuned.velocity(out.reshape(batch_size, -1), y, tk)
        loss = (v - targets[b, k]).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    unet.eval()
    unet.requires_grad_(False)
    return tuned

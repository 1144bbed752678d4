"""Few-step samplers of a noise-predicting (epsilon) DDPM model, behind one interface.

Every sampler here is a small frozen object with ``nfe`` (its network-evaluation budget)
and ``sample(denoiser, x_T, labels=None, guidance=None) -> FewStepSample``, the sample in
the model's (VP) coordinates plus the :class:`~fixedpoint.diffusion.maps.NetworkCount`
of the run (``calls``: dependent network evaluations, ``rows``: rows through the UNet,
doubled by classifier-free guidance), as :class:`~fixedpoint.diffusion.ChainSample` has.
:func:`make_sampler` builds one by name for a model and an NFE budget.

**Taken from diffusers, not rewritten** (schedulers built from the model's scheduler
config): DDIM (``DDIMScheduler``), PNDM / PLMS (``PNDMScheduler``, PRK steps skipped),
DPM-Solver++ 2M and 3M (``DPMSolverMultistepScheduler``), UniPC
(``UniPCMultistepScheduler``), Euler and Heun (``EulerDiscreteScheduler``,
``HeunDiscreteScheduler``).  The loop that drives them (:class:`SchedulerSampler`) is the
standard ``scale_model_input`` / ``step`` loop of a diffusers pipeline.

**Hand-written, because no installed library has them for this model** (diffusers'
``IPNDMScheduler`` is tied to its own cosine schedule with continuous time in [0, 1], not
to a DDPM-trained UNet): iPNDM (Zhang & Chen's improved PNDM: Adams-Bashforth up to
fourth order on the probability-flow ODE in EDM coordinates), the midpoint step AMED's
solver is built on, and an EDM-style Heun used as the distillation teacher and as the
high-accuracy reference (:mod:`fixedpoint.diffusion.amed` builds AMED on them).

**Coordinates.**  The hand-written solvers integrate ``dy/dsigma = eps(x, t(sigma))``
with ``sigma = sqrt((1 - abar) / abar)`` and ``y = x sqrt(1 + sigma^2)`` (Karras et al.'s
EDM form of the same ODE); the UNet is evaluated at the training timestep of ``sigma``,
interpolated linearly in ``log sigma`` between the training timesteps as diffusers does.

**Time grids** (:class:`UniformGrid`, :class:`PolynomialGrid` (``rho = 7``),
:class:`LogSNRGrid`, :class:`CustomGrid`): ``K + 1`` training timesteps, strictly
decreasing from ``T - 1`` to ``0``; a ``K``-interval solver evaluates at the first ``K``
and every sampler here ends at timestep 0, i.e. at ``sigma_min = sigma(t = 0)``, the
smallest noise level the model was trained at (diffusers' ``final_sigmas_type =
"sigma_min"`` / ``set_alpha_to_one = False``).  The one exception is Heun from diffusers,
which always ends at ``sigma = 0`` (:attr:`FewStepSample.end_sigma` says where a sample
ends).  The uniform grid is diffusers' ``"trailing"`` spacing; DDIM and PNDM in diffusers
only take their own spacings, so they run on the uniform grid only (and diffusers' DDIM
steps from ``t`` to ``t - T // K``, which is off that grid when ``K`` does not divide
``T``: a diffusers quirk kept as is).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from .maps import Denoiser, NetworkCount
from .schedule import NoiseSchedule

__all__ = [
    "CustomGrid",
    "FewStepError",
    "FewStepSample",
    "FewStepSampler",
    "Grid",
    "HeunEDM",
    "IPNDM",
    "LogSNRGrid",
    "Midpoint",
    "PolynomialGrid",
    "SAMPLERS",
    "SchedulerSampler",
    "Sigmas",
    "UniformGrid",
    "check_noise_model",
    "make_sampler",
]


class FewStepError(ValueError):
    """A few-step sampler request that cannot be honoured (one line says why)."""


@dataclass
class FewStepSample:
    """A few-step sample: the images, the network calls it made, where it ends."""

    sample: Tensor
    network: NetworkCount
    end_sigma: float


class FewStepSampler(Protocol):
    """What every few-step sampler offers."""

    @property
    def nfe(self) -> int: ...

    def sample(
        self,
        denoiser: Denoiser,
        x_T: Tensor,
        labels: Tensor | None = None,
        guidance: float | None = None,
    ) -> FewStepSample: ...


# ------------------------------------------------------------------------- sigmas


@dataclass(frozen=True)
class Sigmas:
    """The training noise levels of a schedule and the map between sigma and timestep."""

    schedule: NoiseSchedule
    train: Tensor = field(init=False, repr=False)  # (T,) float64, increasing in t

    def __post_init__(self) -> None:
        abar = self.schedule.alphas_cumprod.double()
        object.__setattr__(self, "train", ((1 - abar) / abar).sqrt())

    @property
    def T(self) -> int:
        return len(self.train)

    @property
    def sigma_max(self) -> float:
        return float(self.train[-1])

    @property
    def sigma_min(self) -> float:
        return float(self.train[0])

    def at(self, t: Tensor) -> Tensor:
        """sigma of (integer or fractional) timesteps, interpolated in log sigma."""
        log = self.train.log()
        t = t.double().clamp(0, self.T - 1)
        lo = t.floor().long().clamp(max=self.T - 2)
        w = t - lo
        return ((1 - w) * log[lo] + w * log[lo + 1]).exp()

    def t_of(self, sigma: Tensor) -> Tensor:
        """The (fractional) timestep of ``sigma``: linear in log sigma (diffusers' rule)."""
        log = self.train.log()
        ls = sigma.double().log().clamp(float(log[0]), float(log[-1]))
        hi = torch.searchsorted(log, ls.contiguous()).clamp(1, self.T - 1)
        lo = hi - 1
        w = (ls - log[lo]) / (log[hi] - log[lo])
        return lo.double() + w


# -------------------------------------------------------------------------- grids


def _check_steps(steps: int) -> None:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps <= 0:
        raise FewStepError(f"the number of steps must be a positive int, got {steps!r}")


def _validated(t: Tensor, T: int) -> Tensor:
    if t.ndim != 1 or len(t) < 2:
        raise FewStepError("a time grid needs at least two timesteps")
    if not bool((t[1:] < t[:-1]).all()):
        raise FewStepError(
            f"the time grid is not strictly decreasing: {[round(float(v), 3) for v in t]}"
        )
    if float(t[0]) > T - 1 or float(t[-1]) < 0:
        raise FewStepError(f"grid timesteps must lie in [0, {T - 1}]")
    return t


class Grid:
    """``K + 1`` timesteps from ``T - 1`` down to ``0`` (see the module docstring)."""

    def continuous(self, sig: Sigmas, steps: int) -> Tensor:
        """The grid's (fractional) timesteps, ``(steps + 1,)`` float64."""
        raise NotImplementedError

    def timesteps(self, sig: Sigmas, steps: int) -> Tensor:
        """The grid snapped to training timesteps, ``(steps + 1,)`` long, strictly decreasing."""
        _check_steps(steps)
        t = self.continuous(sig, steps).round().long()
        try:
            return _validated(t, sig.T)
        except FewStepError:
            raise FewStepError(
                f"{self.name} grid with {steps} steps repeats a training timestep; use fewer steps"
            ) from None

    @property
    def name(self) -> str:
        return type(self).__name__.removesuffix("Grid").lower()


@dataclass(frozen=True)
class UniformGrid(Grid):
    """Uniform in the training timestep: diffusers' ``"trailing"`` spacing, then 0."""

    def continuous(self, sig: Sigmas, steps: int) -> Tensor:
        _check_steps(steps)
        i = torch.arange(steps + 1, dtype=torch.float64)
        return (sig.T - i * sig.T / steps - 1).clamp(min=0)


@dataclass(frozen=True)
class PolynomialGrid(Grid):
    """Karras et al.'s ``sigma_i^(1/rho)`` uniform (EDM's grid; ``rho = 7``)."""

    rho: float = 7.0

    def continuous(self, sig: Sigmas, steps: int) -> Tensor:
        _check_steps(steps)
        if not self.rho > 0:
            raise FewStepError(f"rho must be > 0, got {self.rho}")
        i = torch.arange(steps + 1, dtype=torch.float64) / steps
        a, b = sig.sigma_max ** (1 / self.rho), sig.sigma_min ** (1 / self.rho)
        return sig.t_of((a + i * (b - a)) ** self.rho)


@dataclass(frozen=True)
class LogSNRGrid(Grid):
    """Uniform in ``log sigma`` (half the log signal-to-noise ratio): DPM-Solver's grid."""

    def continuous(self, sig: Sigmas, steps: int) -> Tensor:
        _check_steps(steps)
        i = torch.arange(steps + 1, dtype=torch.float64) / steps
        a, b = math.log(sig.sigma_max), math.log(sig.sigma_min)
        return sig.t_of(torch.exp(a + i * (b - a)))


@dataclass(frozen=True)
class CustomGrid(Grid):
    """Given timesteps (strictly decreasing, in ``[0, T - 1]``); ``steps`` must match."""

    values: tuple[float, ...] = ()

    def continuous(self, sig: Sigmas, steps: int) -> Tensor:
        t = _validated(torch.tensor(self.values, dtype=torch.float64), sig.T)
        if steps != len(t) - 1:
            raise FewStepError(f"the custom grid has {len(t) - 1} steps, not {steps}")
        return t


GRIDS: dict[str, Callable[[], Grid]] = {
    "uniform": UniformGrid,
    "polynomial": PolynomialGrid,
    "logsnr": LogSNRGrid,
}


# --------------------------------------------------------------- network calls


class GuidedEps:
    """``eps(x_vp, t)`` for a batch, classifier-free guided, counting calls and rows."""

    def __init__(
        self, denoiser: Denoiser, labels: Tensor | None, guidance: float | None, batch: int
    ):
        from .maps import _check_conditioning

        self.denoiser = denoiser
        try:
            self.labels, self.guidance = _check_conditioning(denoiser, labels, guidance, batch)
        except TypeError as exc:
            raise FewStepError(str(exc)) from None
        self.count = NetworkCount()

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        """``t``: one timestep ``(1,)`` for the whole batch or one per row ``(rows,)``."""
        rows = x.shape[0]
        t = t.reshape(-1)
        if len(t) == 1:
            t = t.expand(rows)
        self.count.calls += 1
        if self.guidance is None:
            self.count.rows += rows
            return self.denoiser(x, t, self.labels)
        self.count.rows += 2 * rows
        null = torch.full_like(self.labels, self.denoiser.null_label)
        out = self.denoiser(torch.cat([x, x]), torch.cat([t, t]), torch.cat([self.labels, null]))
        cond, uncond = out.chunk(2)
        return uncond + self.guidance * (cond - uncond)


def _check_input(denoiser: Denoiser, x_T: Tensor) -> None:
    if getattr(denoiser, "prediction", "epsilon") != "epsilon":
        raise FewStepError(
            "this is a velocity (flow-matching) model; the few-step samplers need a noise "
            "(epsilon) prediction model"
        )
    if not isinstance(x_T, Tensor) or not x_T.is_floating_point():
        raise FewStepError("x_T must be a floating-point tensor")
    if tuple(x_T.shape[1:]) != tuple(denoiser.sample_shape):
        raise FewStepError(
            f"x_T has sample shape {tuple(x_T.shape[1:])}, the model takes "
            f"{tuple(denoiser.sample_shape)}"
        )
    if not bool(torch.isfinite(x_T).all()):
        raise FewStepError("x_T contains non-finite values")


# ------------------------------------------------- samplers from diffusers


@dataclass(frozen=True)
class SchedulerSampler:
    """A diffusers scheduler driven by the standard pipeline loop.

    ``build()`` returns the scheduler with its timesteps set; ``nfe`` is the number of
    network evaluations it will make (its ``timesteps``).  ``end_sigma`` is where its
    last step lands.
    """

    name: str
    build: Callable[[], Any] = field(repr=False, compare=False)
    nfe: int
    end_sigma: float

    def sample(
        self,
        denoiser: Denoiser,
        x_T: Tensor,
        labels: Tensor | None = None,
        guidance: float | None = None,
    ) -> FewStepSample:
        _check_input(denoiser, x_T)
        eps = GuidedEps(denoiser, labels, guidance, len(x_T))
        scheduler = self.build()
        # Sigma-space schedulers (Euler, Heun) hold y = x sqrt(1 + sigma^2).
        x = x_T * scheduler.init_noise_sigma
        with torch.no_grad():
            for t in scheduler.timesteps:
                model_in = scheduler.scale_model_input(x, t)
                e = eps(model_in, t.reshape(1).to(x_T.device))
                x = scheduler.step(e, t, x, return_dict=True).prev_sample
        if hasattr(scheduler, "sigmas"):
            x = x / math.sqrt(1 + self.end_sigma**2) if _sigma_space(scheduler) else x
        return FewStepSample(x.to(x_T.dtype), eps.count, self.end_sigma)


def _sigma_space(scheduler: Any) -> bool:
    return type(scheduler).__name__ in ("EulerDiscreteScheduler", "HeunDiscreteScheduler")


def _config(schedule: NoiseSchedule, **options: Any) -> dict[str, Any]:
    cfg = {k: v for k, v in schedule.config.items() if not k.startswith("_")}
    cfg.update(options)
    return cfg


def _native_uniform(grid: Grid, name: str) -> None:
    if not isinstance(grid, UniformGrid):
        raise FewStepError(
            f"{name} from diffusers supports only its own uniform grid, not the {grid.name} grid"
        )


def _ddim(schedule: NoiseSchedule, nfe: int, grid: Grid) -> SchedulerSampler:
    from diffusers import DDIMScheduler

    _native_uniform(grid, "ddim")

    def build() -> Any:
        s = DDIMScheduler.from_config(
            _config(schedule, timestep_spacing="trailing", set_alpha_to_one=False)
        )
        s.set_timesteps(nfe)
        return s

    return SchedulerSampler("ddim", build, nfe, Sigmas(schedule).sigma_min)


def _pndm(schedule: NoiseSchedule, nfe: int, grid: Grid) -> SchedulerSampler:
    from diffusers import PNDMScheduler

    _native_uniform(grid, "pndm")
    if nfe < 2:
        raise FewStepError("pndm needs an NFE budget of at least 2")

    def build() -> Any:
        s = PNDMScheduler.from_config(
            _config(
                schedule,
                timestep_spacing="trailing",
                set_alpha_to_one=False,
                skip_prk_steps=True,
            )
        )
        s.set_timesteps(nfe - 1)  # PLMS evaluates its first timestep twice
        return s

    return SchedulerSampler("pndm", build, nfe, Sigmas(schedule).sigma_min)


def _dpmpp(order: int) -> Callable[[NoiseSchedule, int, Grid], SchedulerSampler]:
    def make(schedule: NoiseSchedule, nfe: int, grid: Grid) -> SchedulerSampler:
        from diffusers import DPMSolverMultistepScheduler

        sig = Sigmas(schedule)
        ts = grid.timesteps(sig, nfe)[:-1].tolist()

        def build() -> Any:
            s = DPMSolverMultistepScheduler.from_config(
                _config(
                    schedule,
                    algorithm_type="dpmsolver++",
                    solver_order=order,
                    final_sigmas_type="sigma_min",
                    lower_order_final=True,
                )
            )
            s.set_timesteps(timesteps=ts)
            return s

        return SchedulerSampler(f"dpmpp-{order}m", build, nfe, sig.sigma_min)

    return make


def _override(scheduler: Any, ts: list[int], sig: Sigmas) -> None:
    """Put a grid into a multistep scheduler that has no ``timesteps=`` argument (UniPC).

    ``set_timesteps`` ends by storing exactly these two arrays (the evaluation
    timesteps, their sigmas plus the final one); everything else it resets is reset by
    the ``set_timesteps`` call made before this.
    """
    sigmas = sig.train[torch.tensor(ts)].tolist() + [sig.sigma_min]
    scheduler.sigmas = torch.tensor(sigmas, dtype=torch.float32)
    scheduler.timesteps = torch.tensor(ts, dtype=torch.int64)
    scheduler.num_inference_steps = len(ts)


def _unipc(schedule: NoiseSchedule, nfe: int, grid: Grid) -> SchedulerSampler:
    from diffusers import UniPCMultistepScheduler

    sig = Sigmas(schedule)
    ts = grid.timesteps(sig, nfe)[:-1].tolist()

    def build() -> Any:
        s = UniPCMultistepScheduler.from_config(
            _config(schedule, final_sigmas_type="sigma_min", timestep_spacing="trailing")
        )
        s.set_timesteps(nfe)
        _override(s, ts, sig)
        return s

    return SchedulerSampler("unipc", build, nfe, sig.sigma_min)


def _euler(schedule: NoiseSchedule, nfe: int, grid: Grid) -> SchedulerSampler:
    from diffusers import EulerDiscreteScheduler

    sig = Sigmas(schedule)
    ts = grid.timesteps(sig, nfe)[:-1].tolist()

    def build() -> Any:
        s = EulerDiscreteScheduler.from_config(_config(schedule, final_sigmas_type="sigma_min"))
        s.set_timesteps(timesteps=ts)
        return s

    return SchedulerSampler("euler", build, nfe, sig.sigma_min)


def _heun(schedule: NoiseSchedule, nfe: int, grid: Grid) -> SchedulerSampler:
    """diffusers' Heun: ``n`` timesteps cost ``2 n - 1`` evaluations and end at sigma 0."""
    from diffusers import HeunDiscreteScheduler

    if nfe < 3:
        raise FewStepError("heun needs an NFE budget of at least 3 (two timesteps)")
    n = (nfe + 1) // 2
    sig = Sigmas(schedule)
    ts = grid.timesteps(sig, n - 1).tolist()  # n points from T-1 down to 0

    def build() -> Any:
        s = HeunDiscreteScheduler.from_config(_config(schedule))
        s.set_timesteps(timesteps=ts)
        return s

    return SchedulerSampler("heun", build, 2 * n - 1, 0.0)


# ------------------------------------------------------- hand-written solvers


def ab_combination(d: Tensor, history: list[Tensor], order: int) -> Tensor:
    """iPNDM's direction: Adams-Bashforth of order ``min(order, len(history) + 1)``.

    Zhang & Chen use the fixed-step coefficients on any grid ("improved PNDM").
    """
    k = min(order, len(history) + 1)
    if k == 1:
        return d
    if k == 2:
        return (3 * d - history[-1]) / 2
    if k == 3:
        return (23 * d - 16 * history[-1] + 5 * history[-2]) / 12
    return (55 * d - 59 * history[-1] + 37 * history[-2] - 9 * history[-3]) / 24


class _EDM:
    """What the hand-written solvers share: the grid in sigma, the eps call in y."""

    def _setup(self, grid: Grid, steps: int, integer: bool = True) -> None:
        sig = Sigmas(self.schedule)  # type: ignore[attr-defined]
        t = grid.timesteps(sig, steps) if integer else grid.continuous(sig, steps)
        object.__setattr__(self, "_sig", sig)
        object.__setattr__(self, "grid_t", t)
        object.__setattr__(self, "grid_sigma", sig.at(t))

    def _d(self, eps: GuidedEps, y: Tensor, sigma: Tensor, t: Tensor) -> Tensor:
        """``dy/dsigma = eps(y / sqrt(1 + sigma^2), t)``."""
        s = sigma.reshape(-1, *([1] * (y.ndim - 1))).to(y.dtype)
        return eps(y / (1 + s**2).sqrt(), t.to(y.device))

    def _t(self, i: int) -> Tensor:
        t = self.grid_t[i]  # type: ignore[attr-defined]
        return t.reshape(1) if t.dtype == torch.long else t.reshape(1).float()

    def _finish(self, y: Tensor, eps: GuidedEps, x_T: Tensor) -> FewStepSample:
        end = float(self.grid_sigma[-1])  # type: ignore[attr-defined]
        return FewStepSample((y / math.sqrt(1 + end**2)).to(x_T.dtype), eps.count, end)


@dataclass(frozen=True)
class IPNDM(_EDM):
    """iPNDM (order up to ``order``) on ``steps`` intervals: ``steps`` evaluations.

    With ``afs`` the first direction is the analytical first step of AMED (``eps ~ x``
    at the largest noise level), saving one evaluation.
    """

    schedule: NoiseSchedule
    steps: int
    grid: Grid = PolynomialGrid()
    order: int = 4
    afs: bool = False
    integer: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.order <= 4:
            raise FewStepError(f"iPNDM order must be 1..4, got {self.order}")
        self._setup(self.grid, self.steps, self.integer)

    @property
    def nfe(self) -> int:
        return self.steps - int(self.afs)

    def sample(
        self,
        denoiser: Denoiser,
        x_T: Tensor,
        labels: Tensor | None = None,
        guidance: float | None = None,
    ) -> FewStepSample:
        _check_input(denoiser, x_T)
        eps = GuidedEps(denoiser, labels, guidance, len(x_T))
        s = self.grid_sigma
        y = x_T * math.sqrt(1 + float(s[0]) ** 2)
        history: list[Tensor] = []
        with torch.no_grad():
            for i in range(self.steps):
                if self.afs and i == 0:
                    d = y / math.sqrt(1 + float(s[0]) ** 2)
                else:
                    d = self._d(eps, y, s[i : i + 1], self._t(i))
                y = y + float(s[i + 1] - s[i]) * ab_combination(d, history, self.order)
                history = (history + [d])[-(self.order - 1) :] if self.order > 1 else []
        return self._finish(y, eps, x_T)


@dataclass(frozen=True)
class Midpoint(_EDM):
    """The midpoint step AMED-Solver learns to correct: Euler to ``sqrt(s_i s_{i+1})``,
    evaluate there, and take the whole step in that direction (2 evaluations per step,
    one less with ``afs``)."""

    schedule: NoiseSchedule
    steps: int
    grid: Grid = PolynomialGrid()
    afs: bool = False

    def __post_init__(self) -> None:
        self._setup(self.grid, self.steps)

    @property
    def nfe(self) -> int:
        return 2 * self.steps - int(self.afs)

    def sample(
        self,
        denoiser: Denoiser,
        x_T: Tensor,
        labels: Tensor | None = None,
        guidance: float | None = None,
    ) -> FewStepSample:
        _check_input(denoiser, x_T)
        eps = GuidedEps(denoiser, labels, guidance, len(x_T))
        s, sig = self.grid_sigma, self._sig
        y = x_T * math.sqrt(1 + float(s[0]) ** 2)
        with torch.no_grad():
            for i in range(self.steps):
                if self.afs and i == 0:
                    d = y / math.sqrt(1 + float(s[0]) ** 2)
                else:
                    d = self._d(eps, y, s[i : i + 1], self._t(i))
                mid = (s[i] * s[i + 1]).sqrt().reshape(1)
                y_mid = y + float(mid - s[i]) * d
                d_mid = self._d(eps, y_mid, mid, sig.t_of(mid).float())
                y = y + float(s[i + 1] - s[i]) * d_mid
        return self._finish(y, eps, x_T)


@dataclass(frozen=True)
class HeunEDM(_EDM):
    """EDM's Heun (trapezoid with an Euler predictor) on ``steps`` intervals ending at
    ``sigma_min``: ``2 steps`` evaluations.  The AMED teacher and, with many steps on a
    continuous grid (``integer=False``), the high-accuracy reference solution."""

    schedule: NoiseSchedule
    steps: int
    grid: Grid = PolynomialGrid()
    integer: bool = True

    def __post_init__(self) -> None:
        self._setup(self.grid, self.steps, self.integer)

    @property
    def nfe(self) -> int:
        return 2 * self.steps

    def trajectory(
        self,
        denoiser: Denoiser,
        x_T: Tensor,
        labels: Tensor | None = None,
        guidance: float | None = None,
    ) -> tuple[Tensor, NetworkCount]:
        """The states ``y`` at every grid point, ``(B, steps + 1, *shape)`` (EDM's y)."""
        _check_input(denoiser, x_T)
        eps = GuidedEps(denoiser, labels, guidance, len(x_T))
        s = self.grid_sigma
        y = x_T * math.sqrt(1 + float(s[0]) ** 2)
        states = [y]
        with torch.no_grad():
            for i in range(self.steps):
                h = float(s[i + 1] - s[i])
                d = self._d(eps, y, s[i : i + 1], self._t(i))
                y_e = y + h * d
                d2 = self._d(eps, y_e, s[i + 1 : i + 2], self._t(i + 1))
                y = y + h * 0.5 * (d + d2)
                states.append(y)
        return torch.stack(states, 1), eps.count

    def sample(
        self,
        denoiser: Denoiser,
        x_T: Tensor,
        labels: Tensor | None = None,
        guidance: float | None = None,
    ) -> FewStepSample:
        states, count = self.trajectory(denoiser, x_T, labels, guidance)
        end = float(self.grid_sigma[-1])
        return FewStepSample((states[:, -1] / math.sqrt(1 + end**2)).to(x_T.dtype), count, end)


# ------------------------------------------------------------------ registry


def _ipndm(schedule: NoiseSchedule, nfe: int, grid: Grid) -> IPNDM:
    return IPNDM(schedule, nfe, grid)


SAMPLERS: dict[str, Callable[[NoiseSchedule, int, Grid], FewStepSampler]] = {
    "ddim": _ddim,
    "pndm": _pndm,
    "dpmpp-2m": _dpmpp(2),
    "dpmpp-3m": _dpmpp(3),
    "unipc": _unipc,
    "euler": _euler,
    "heun": _heun,
    "ipndm": _ipndm,
}
"""Name -> ``factory(schedule, nfe, grid)``; AMED lives in :mod:`.amed` (it needs a
trained predictor)."""


def make_sampler(name: str, model: Any, nfe: int, grid: Grid | None = None) -> FewStepSampler:
    """The few-step sampler ``name`` for ``model`` with an NFE budget of ``nfe`` on ``grid``.

    ``model`` is a noise-prediction :class:`~fixedpoint.diffusion.DiffusionModel` (a
    velocity model is refused).  ``grid`` defaults to the uniform grid for DDIM and PNDM
    (their only one) and to the polynomial (``rho = 7``) grid otherwise.
    """
    if name not in SAMPLERS:
        raise FewStepError(f"unknown few-step sampler {name!r} (one of {', '.join(SAMPLERS)})")
    check_noise_model(model)
    _check_steps(nfe)
    if grid is None:
        grid = UniformGrid() if name in ("ddim", "pndm") else PolynomialGrid()
    return SAMPLERS[name](model.schedule, nfe, grid)


def check_noise_model(model: Any) -> None:
    """Refuse a velocity (flow-matching) model where a noise-prediction one is needed."""
    prediction = getattr(model, "prediction", "epsilon")
    if prediction != "epsilon":
        raise FewStepError(
            f"a {prediction} (flow-matching) model was given; the few-step samplers need a "
            "noise (epsilon) prediction model"
        )

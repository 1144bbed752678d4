"""AMED: a learned intermediate time and step scale on top of a few-step solver.

Zhou et al. (CVPR 2024, "Fast ODE-based sampling for diffusion models in around 5
steps", code in zju-pi/diff-sampler).  On the probability-flow ODE in EDM coordinates
(``dy/dsigma = eps``, see :mod:`.fewstep`), each interval ``[s_i, s_{i+1}]`` gets an
intermediate noise level ``s_mid = s_{i+1}^r s_i^(1 - r)`` and a scale ``c`` of the
step's direction, both predicted per sample by a tiny network from

* the UNet's bottleneck features at ``s_i`` (a forward hook on ``unet.mid_block``,
  pooled to a few dozen numbers: the per-channel mean plus the channel mean pooled to
  4 x 4), and
* embeddings of the current and next timestep.

``r`` lies in (0, 1) (a sigmoid), ``c`` in ``[1 - band, 1 + band]`` (``band = 0.01``, as
the authors use).  The last layer starts at zero, so an untrained predictor outputs the
**neutral** values ``r = 1/2``, ``c = 1``, at which each sampler is its base solver:

* :class:`AMEDSolver`: Euler to ``s_mid``, evaluate, ``y_{i+1} = y_i + c (s_{i+1} - s_i)
  d_mid``; neutral, it is :class:`~.fewstep.Midpoint`.
* :class:`AMEDPlugin` (on iPNDM): iPNDM steps to ``s_mid`` and on to ``s_{i+1}`` (scaled
  by ``c``), the multistep history running over both; neutral, it is
  :class:`~.fewstep.IPNDM` on the grid with the geometric midpoints inserted.
* :class:`AMEDPluginDPMpp` (on multistep DPM-Solver++, data prediction, order 2 by
  default, 3 allowed): the same two sub-steps as DPM-Solver++ updates in
  ``lambda = -log sigma`` on the denoised ``D = y - sigma eps``, the history of ``(D,
  sigma)`` running over every evaluated point (the per-sample ``s_mid`` included), ``c``
  scaling the model term of the second sub-step (what the authors' ``scale_dir`` does);
  neutral, it is diffusers' ``DPMSolverMultistepScheduler`` (``dpmsolver++``,
  ``solver_type="midpoint"``, ``lower_order_final``) on the grid with the geometric
  midpoints inserted.  The order is lowered at the start (warm-up) and, as diffusers does
  below 15 sub-steps, at the end (the authors' code always lowers it at the end; the two
  agree up to 7 intervals, i.e. NFE 13), so that neutral it is the library baseline at
  any budget.

All three take the analytical first step (``afs``: ``eps ~ x`` at the largest noise level),
so ``S`` intervals cost ``2 S - 1`` evaluations; an odd NFE budget ``k`` gives
``S = (k + 1) / 2`` with it, an even one ``S = k / 2`` without.

Training (:func:`train_amed`) is AMED's distillation: a teacher (EDM Heun with ``M``
extra grid points between the student's) gives reference states at the student's grid
points for a pool of starting noises; per interval, the student's step is compared with
the teacher's state (squared error) and the predictor takes an Adam step.  The AMED
solver starts each interval from the teacher's state, the plugins from their own (their
history must be their own), as in the authors' training loop.  The checkpoint is written
atomically (:mod:`fixedpoint.atomic`) with a fingerprint of the model's weights and
scheduler; :func:`load_amed` refuses a predictor trained for another model.

What is left out: the authors' optional second scale (on the time fed to the network at
``s_mid``; off, ``scale_time=0``, in their recommended training flags, which also take
the teacher's ``M = 1``, this module's default ``teacher_extra``); in the DPM-Solver++
plugin, their dynamic thresholding of ``D`` (a clip at the 0.995 quantile, off in
diffusers by default and in this project's DPM-Solver++ baseline), their noise-
prediction variant (``predict_x0=False``, which their latent-model runs use) and their
DPM-Solver++ teacher: every AMED predictor here is distilled from the same Heun teacher.
"""

from __future__ import annotations

import hashlib
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as nnf
from torch import Tensor, nn

from ..atomic import atomic_torch_save
from .fewstep import (
    FewStepError,
    FewStepSample,
    Grid,
    GuidedEps,
    HeunEDM,
    PolynomialGrid,
    Sigmas,
    _check_input,
    ab_combination,
    check_noise_model,
)
from .maps import Denoiser
from .model import DiffusionModel
from .schedule import NoiseSchedule

__all__ = [
    "AMEDError",
    "AMEDPlugin",
    "AMEDPluginDPMpp",
    "AMEDPredictor",
    "AMEDSolver",
    "amed_for_budget",
    "dpmpp_update",
    "kind_of",
    "load_amed",
    "model_fingerprint",
    "train_amed",
]

FORMAT = 1


class AMEDError(FewStepError):
    """An AMED request that cannot be honoured (e.g. a predictor for another model)."""


# ---------------------------------------------------------------- predictor


def pool_bottleneck(h: Tensor) -> Tensor:
    """``(B, C, H, W)`` mid-block output -> ``(B, C + 16)``: channel means, 4x4 map."""
    return torch.cat(
        [h.mean(dim=(2, 3)), nnf.adaptive_avg_pool2d(h.mean(dim=1, keepdim=True), 4).flatten(1)],
        dim=1,
    )


def _time_embedding(t: Tensor, T: int, dim: int) -> Tensor:
    """Sinusoidal embedding of the timestep scaled to [0, 1], ``dim`` numbers."""
    freqs = torch.arange(dim // 2, dtype=torch.float32, device=t.device)
    angle = (t.float() / (T - 1))[:, None] * math.pi * 2.0 ** freqs[None, :]
    return torch.cat([angle.sin(), angle.cos()], dim=1)


class AMEDPredictor(nn.Module):
    """Bottleneck features + two time embeddings -> ``(r, c)`` per sample."""

    def __init__(
        self,
        features: int,
        *,
        hidden: int = 64,
        code: int = 4,
        time_dim: int = 8,
        band: float = 0.01,
        num_train_timesteps: int = 1000,
    ):
        super().__init__()
        if not 0 <= band < 1:
            raise AMEDError(f"band must be in [0, 1), got {band}")
        self.config = dict(
            features=features,
            hidden=hidden,
            code=code,
            time_dim=time_dim,
            band=band,
            num_train_timesteps=num_train_timesteps,
        )
        self.band, self.T, self.time_dim = band, num_train_timesteps, time_dim
        self.enc = nn.Sequential(nn.Linear(features, hidden), nn.SiLU(), nn.Linear(hidden, code))
        self.time = nn.Linear(time_dim, time_dim)
        self.head = nn.Linear(code + 2 * time_dim, 2)
        # Zero head: the untrained predictor is neutral (r = 1/2, c = 1).
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, features: Tensor, t_cur: Tensor, t_next: Tensor) -> tuple[Tensor, Tensor]:
        b = features.shape[0]
        emb = [
            nnf.silu(self.time(_time_embedding(t.reshape(-1).expand(b), self.T, self.time_dim)))
            for t in (t_cur, t_next)
        ]
        z = self.head(torch.cat([nnf.silu(self.enc(features)), *emb], dim=1))
        r = torch.sigmoid(z[:, 0])
        c = 1 + self.band * (2 * torch.sigmoid(z[:, 1]) - 1)
        return r, c


class _Bottleneck:
    """A forward hook on ``unet.mid_block`` keeping the pooled output of the last call."""

    def __init__(self, unet: nn.Module, batch: int):
        self.batch = batch
        self.value: Tensor | None = None
        self.handle = unet.mid_block.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: Any, output: Tensor) -> None:
        out = output[0] if isinstance(output, tuple) else output
        # With guidance the call holds [conditional; unconditional]: keep the first half.
        self.value = pool_bottleneck(out[: self.batch].detach().float())

    def close(self) -> None:
        self.handle.remove()


def bottleneck_features(unet: nn.Module) -> int:
    """The predictor's input width for this UNet (``C_mid + 16``)."""
    return int(unet.config.block_out_channels[-1]) + 16


# ------------------------------------------------------------------ samplers


def _unet_of(denoiser: Denoiser) -> nn.Module:
    unet = getattr(denoiser, "unet", None)
    if unet is None or not hasattr(unet, "mid_block"):
        raise AMEDError("AMED needs a UNet2DModel denoiser (its mid block feeds the predictor)")
    return unet


@dataclass(frozen=True)
class _AMED:
    """What the AMED samplers share: ``steps`` intervals of ``grid``, a predictor."""

    schedule: NoiseSchedule
    steps: int
    predictor: AMEDPredictor = field(compare=False)
    grid: Grid = PolynomialGrid()
    afs: bool = True

    def __post_init__(self) -> None:
        sig = Sigmas(self.schedule)
        t = self.grid.timesteps(sig, self.steps)
        object.__setattr__(self, "_sig", sig)
        object.__setattr__(self, "grid_t", t)
        object.__setattr__(self, "grid_sigma", sig.at(t))

    @property
    def nfe(self) -> int:
        return 2 * self.steps - int(self.afs)

    # One interval; ``d_fn(y, sigma (B,), t (B,))`` is the network's direction.
    def _predict(self, feats: Tensor | None, i: int, batch: int) -> tuple[Tensor, Tensor]:
        if feats is None:  # the analytical first step has no network call
            feats = torch.zeros(batch, self.predictor.config["features"])
        t_cur, t_next = self.grid_t[i].reshape(1), self.grid_t[i + 1].reshape(1)
        return self.predictor(feats, t_cur, t_next)

    def _mid(self, i: int, r: Tensor) -> Tensor:
        s0, s1 = self.grid_sigma[i], self.grid_sigma[i + 1]
        return (s1.log() * r.double() + s0.log() * (1 - r.double())).exp()

    def _first(self, y: Tensor, i: int, d_fn: Any, hook: _Bottleneck) -> tuple[Tensor, Any]:
        s = self.grid_sigma
        if self.afs and i == 0:
            return y / math.sqrt(1 + float(s[0]) ** 2), None
        hook.value = None
        d = d_fn(y, s[i].reshape(1), self.grid_t[i].reshape(1))
        return d, hook.value

    def sample(
        self,
        denoiser: Denoiser,
        x_T: Tensor,
        labels: Tensor | None = None,
        guidance: float | None = None,
    ) -> FewStepSample:
        _check_input(denoiser, x_T)
        unet = _unet_of(denoiser)
        eps = GuidedEps(denoiser, labels, guidance, len(x_T))
        sig = self._sig

        def d_fn(y: Tensor, sigma: Tensor, t: Tensor) -> Tensor:
            s = sigma.reshape(-1, *([1] * (y.ndim - 1))).to(y.dtype)
            return eps(y / (1 + s**2).sqrt(), t.float() if t.dtype != torch.long else t)

        s = self.grid_sigma
        y = x_T * math.sqrt(1 + float(s[0]) ** 2)
        hook = _Bottleneck(unet, len(x_T))
        state = self._init_state()
        try:
            with torch.no_grad():
                for i in range(self.steps):
                    y, state = self._interval(y, i, d_fn, hook, state, sig)
        finally:
            hook.close()
        end = float(s[-1])
        return FewStepSample((y / math.sqrt(1 + end**2)).to(x_T.dtype), eps.count, end)

    def _init_state(self) -> Any:
        return None

    def _detached(self, state: Any) -> Any:
        """The carried state cut from the autograd graph (between training intervals)."""
        return state

    def _extra(self) -> dict[str, Any]:
        """Constructor arguments beyond the shared ones (saved with the checkpoint)."""
        return {}

    def _interval(self, y, i, d_fn, hook, state, sig):  # pragma: no cover - abstract
        raise NotImplementedError


def _col(v: Tensor, like: Tensor) -> Tensor:
    return v.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


@dataclass(frozen=True)
class AMEDSolver(_AMED):
    """AMED-Solver: the midpoint step with a learned midpoint ``r`` and scale ``c``."""

    def _interval(self, y, i, d_fn, hook, state, sig):
        d, feats = self._first(y, i, d_fn, hook)
        r, c = self._predict(feats, i, len(y))
        s0, s1 = self.grid_sigma[i], self.grid_sigma[i + 1]
        mid = self._mid(i, r)
        y_mid = y + _col(mid - s0, y) * d
        d_mid = d_fn(y_mid, mid, sig.t_of(mid))
        return y + _col(c, y) * float(s1 - s0) * d_mid, state


@dataclass(frozen=True)
class AMEDPlugin(_AMED):
    """AMED-Plugin on iPNDM (order up to ``order``): a learned point inside each interval."""

    order: int = 4

    def __post_init__(self) -> None:
        if not isinstance(self.order, int) or not 1 <= self.order <= 4:
            raise AMEDError(f"the iPNDM plugin's order must be 1..4, got {self.order!r}")
        super().__post_init__()

    def _init_state(self) -> Any:
        return []

    def _detached(self, state: Any) -> Any:
        return [h.detach() for h in state]

    def _extra(self) -> dict[str, Any]:
        return {"order": self.order}

    def _push(self, history: list[Tensor], d: Tensor) -> list[Tensor]:
        return (history + [d])[-(self.order - 1) :] if self.order > 1 else []

    def _interval(self, y, i, d_fn, hook, history, sig):
        d, feats = self._first(y, i, d_fn, hook)
        r, c = self._predict(feats, i, len(y))
        s0, s1 = self.grid_sigma[i], self.grid_sigma[i + 1]
        mid = self._mid(i, r)
        y_mid = y + _col(mid - s0, y) * ab_combination(d, history, self.order)
        history = self._push(history, d.detach())
        d_mid = d_fn(y_mid, mid, sig.t_of(mid))
        y_next = y_mid + _col(c * (s1 - mid), y) * ab_combination(d_mid, history, self.order)
        return y_next, self._push(history, d_mid.detach())


def dpmpp_update(
    y: Tensor,
    history: list[tuple[Tensor, Tensor]],
    s_t: Tensor,
    order: int,
    scale: Tensor | float = 1.0,
) -> Tensor:
    """One multistep DPM-Solver++ update (data prediction) from the newest history point
    to ``s_t``, in EDM coordinates (``y = x sqrt(1 + sigma^2)``, ``lambda = -log sigma``).

    ``history``: ``(D, sigma)`` pairs, newest last, ``D`` the denoised sample and ``sigma``
    per sample ``(B,)``; ``order`` 1..3 uses that many of them (Lu et al.'s 2M with
    diffusers' ``midpoint`` form, and 3M).  ``scale`` (per sample) multiplies the model
    term, not the ``(s_t / s_0) y`` term: AMED's ``c``.
    """
    if not 1 <= order <= min(3, len(history)):
        raise AMEDError(f"DPM-Solver++ order {order} needs that many history points")
    d0, s0 = history[-1]
    lam0, lam_t = -s0.double().log(), -s_t.double().log()
    h = lam_t - lam0
    phi1 = torch.expm1(-h)
    term = _col(phi1, y) * d0
    if order >= 2:
        d1, s1 = history[-2]
        r0 = (lam0 + s1.double().log()) / h
        diff0 = (d0 - d1) / _col(r0, y)
        if order == 2:
            term = term + 0.5 * _col(phi1, y) * diff0
        else:
            d2, s2 = history[-3]
            r1 = (s2.double().log() - s1.double().log()) / h
            diff1 = (d1 - d2) / _col(r1, y)
            first = diff0 + _col(r0 / (r0 + r1), y) * (diff0 - diff1)
            second = (diff0 - diff1) / _col(r0 + r1, y)
            phi2 = phi1 / h + 1
            phi3 = phi2 / h - 0.5
            term = term - _col(phi2, y) * first + _col(phi3, y) * second
    scale = scale if isinstance(scale, Tensor) else torch.tensor(float(scale))
    ratio = (s_t.double() / s0.double()).expand(len(y))
    return _col(ratio, y) * y - _col(scale.expand(len(y)), y) * term


@dataclass(frozen=True)
class AMEDPluginDPMpp(_AMED):
    """AMED-Plugin on multistep DPM-Solver++ (order ``order``, 2 by default): a learned
    point inside each interval, ``c`` scaling the second sub-step (module docstring)."""

    order: int = 2

    def __post_init__(self) -> None:
        if not isinstance(self.order, int) or not 1 <= self.order <= 3:
            raise AMEDError(f"the DPM-Solver++ plugin's order must be 1..3, got {self.order!r}")
        super().__post_init__()

    def _init_state(self) -> Any:
        return []

    def _detached(self, state: Any) -> Any:
        return [(d.detach(), s.detach()) for d, s in state]

    def _extra(self) -> dict[str, Any]:
        return {"order": self.order}

    def _order(self, k: int, available: int) -> int:
        """The order of sub-step ``k`` (1-based, of ``2 steps``): warm-up at the start,
        lowered at the end below 15 sub-steps (diffusers' ``lower_order_final``)."""
        total = 2 * self.steps
        o = min(self.order, available)
        return min(o, total - k + 1) if total < 15 else o

    def _interval(self, y, i, d_fn, hook, history, sig):
        d, feats = self._first(y, i, d_fn, hook)
        r, c = self._predict(feats, i, len(y))
        b = len(y)
        s0 = self.grid_sigma[i].reshape(1).expand(b)
        s1 = self.grid_sigma[i + 1].reshape(1).expand(b)
        mid = self._mid(i, r)
        # The history keeps the last three points: all that 3M reads.
        history = (history + [(y - _col(s0, y) * d, s0)])[-3:]
        y_mid = dpmpp_update(y, history, mid, self._order(2 * i + 1, len(history)))
        d_mid = d_fn(y_mid, mid, sig.t_of(mid))
        history = (history + [(y_mid - _col(mid, y) * d_mid, mid)])[-3:]
        y_next = dpmpp_update(y_mid, history, s1, self._order(2 * i + 2, len(history)), c)
        return y_next, history


KINDS: dict[str, type[_AMED]] = {
    "amed": AMEDSolver,
    "amed-plugin": AMEDPlugin,
    "amed-plugin-dpmpp": AMEDPluginDPMpp,
}
"""Kind name (checkpoints, ``--sampler``, ``AMEDTrainConfig.kind``) -> sampler class."""


def kind_of(sampler: _AMED) -> str:
    """The :data:`KINDS` name of an AMED sampler."""
    for k, v in KINDS.items():
        if type(sampler) is v:
            return k
    raise AMEDError(f"not an AMED sampler: {type(sampler).__name__}")


def amed_for_budget(nfe: int) -> tuple[int, bool]:
    """``(intervals, afs)`` spending exactly ``nfe`` evaluations (``nfe >= 2``)."""
    if not isinstance(nfe, int) or nfe < 2:
        raise AMEDError(f"AMED needs an NFE budget of at least 2, got {nfe!r}")
    return ((nfe + 1) // 2, True) if nfe % 2 else (nfe // 2, False)


# ---------------------------------------------------------------- checkpoint


def model_fingerprint(model: DiffusionModel) -> str:
    """sha256 (16 hex digits) of the UNet's weights and the noise levels it was trained at
    (not the scheduler config's text, which gains default keys on a save/load round trip)."""
    h = hashlib.sha256(model.schedule.alphas_cumprod.double().numpy().tobytes())
    for name, tensor in sorted(model.unet.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _grid_json(grid: Grid) -> dict[str, Any]:
    from dataclasses import asdict

    return {"type": type(grid).__name__, **asdict(grid)}


def _grid_from_json(d: dict[str, Any]) -> Grid:
    from . import fewstep

    d = dict(d)
    cls = getattr(fewstep, d.pop("type"))
    if "values" in d:
        d["values"] = tuple(d["values"])
    return cls(**d)


def save_amed(sampler: _AMED, model: DiffusionModel, path: str | Path, **info: Any) -> Path:
    kind = kind_of(sampler)
    extra = sampler._extra()
    payload = {
        "format": FORMAT,
        "kind": kind,
        "steps": sampler.steps,
        "afs": sampler.afs,
        "grid": _grid_json(sampler.grid),
        "extra": extra,
        "predictor_config": sampler.predictor.config,
        "predictor": sampler.predictor.state_dict(),
        "fingerprint": model_fingerprint(model),
        "info": info,
    }
    path = Path(path)
    atomic_torch_save(payload, path)
    return path


def load_amed(path: str | Path, model: DiffusionModel) -> _AMED:
    """The AMED sampler stored at ``path``; refuses a predictor for another model."""
    path = Path(path)
    try:
        saved = torch.load(path, weights_only=False, map_location="cpu")
    except FileNotFoundError:
        raise AMEDError(f"{path}: no such predictor file") from None
    except Exception as exc:
        raise AMEDError(f"{path}: not an AMED predictor ({str(exc).splitlines()[0]})") from None
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise AMEDError(f"{path}: not an AMED predictor of this version")
    check_noise_model(model)
    mine = model_fingerprint(model)
    if saved["fingerprint"] != mine:
        raise AMEDError(
            f"{path} was trained for another model (fingerprint {saved['fingerprint']}, "
            f"this model {mine}); train one with `fixedpoint diffusion amed-train`"
        )
    predictor = AMEDPredictor(**saved["predictor_config"])
    predictor.load_state_dict(saved["predictor"])
    predictor.eval()
    cls = KINDS.get(saved.get("kind"))
    if cls is None:
        raise AMEDError(f"{path}: unknown AMED kind {saved.get('kind')!r}")
    return cls(
        model.schedule,
        saved["steps"],
        predictor,
        _grid_from_json(saved["grid"]),
        saved["afs"],
        **saved["extra"],
    )


# ------------------------------------------------------------------ training


@dataclass(frozen=True)
class AMEDTrainConfig:
    """What to distil: sampler kind, NFE budget, grid, teacher and optimiser settings."""

    kind: str = "amed"
    nfe: int = 5
    grid: Grid = PolynomialGrid()
    teacher_extra: int = 1  # M: teacher grid points between two student points
    samples: int = 384  # starting noises in the distillation pool
    epochs: int = 8
    batch_size: int = 16  # small batches: many predictor updates from a small pool
    lr: float = 5e-3  # the authors' learning rate
    band: float = 0.01
    guidance: float | None = None
    seed: int = 0

    def validate(self) -> None:
        if self.kind not in KINDS:
            raise AMEDError(f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        for name in ("samples", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise AMEDError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.teacher_extra < 0:
            raise AMEDError(f"teacher_extra must be >= 0, got {self.teacher_extra}")
        amed_for_budget(self.nfe)


class _GradEps:
    """The (guided) UNet with gradients to its input and time (weights frozen)."""

    def __init__(self, unet: nn.Module, labels: Tensor | None, guidance: float | None, null):
        self.unet, self.labels, self.guidance, self.null = unet, labels, guidance, null

    def __call__(self, y: Tensor, sigma: Tensor, t: Tensor) -> Tensor:
        s = _col(sigma, y)
        x = y / (1 + s**2).sqrt()
        t = t.reshape(-1).float().expand(len(y)) if t.numel() == 1 else t.float()
        if self.guidance is None:
            return self.unet(x, t, class_labels=self.labels).sample
        null = torch.full_like(self.labels, self.null)
        out = self.unet(
            torch.cat([x, x]), torch.cat([t, t]), class_labels=torch.cat([self.labels, null])
        ).sample
        cond, uncond = out.chunk(2)
        return uncond + self.guidance * (cond - uncond)


def teacher_states(
    model: DiffusionModel, cfg: AMEDTrainConfig, x_T: Tensor, labels: Tensor | None
) -> Tensor:
    """Teacher states ``y`` at the student's grid points ``(N, S + 1, *shape)``."""
    steps, _ = amed_for_budget(cfg.nfe)
    fine = (cfg.teacher_extra + 1) * steps
    teacher = HeunEDM(model.schedule, fine, cfg.grid)
    student_t = cfg.grid.timesteps(Sigmas(model.schedule), steps)
    if not torch.equal(teacher.grid_t[:: cfg.teacher_extra + 1], student_t):
        raise AMEDError(f"the {cfg.grid.name} grid's teacher points miss the student's")
    out = []
    for k in range(0, len(x_T), cfg.batch_size):
        lab = None if labels is None else labels[k : k + cfg.batch_size]
        traj, _ = teacher.trajectory(
            model.denoiser(), x_T[k : k + cfg.batch_size], lab, cfg.guidance
        )
        out.append(traj[:, :: cfg.teacher_extra + 1])
    return torch.cat(out)


def train_amed(
    model: DiffusionModel,
    cfg: AMEDTrainConfig,
    out: str | Path | None = None,
    *,
    progress: bool = True,
) -> tuple[_AMED, dict[str, Any]]:
    """Distil an AMED predictor for ``model`` (see the module docstring).

    Returns the sampler and a report (losses per epoch, seconds, teacher evaluations).
    With ``out`` the checkpoint is written there atomically; a finished checkpoint of the
    same configuration and model is loaded instead of training again.
    """
    cfg.validate()
    check_noise_model(model)
    steps, afs = amed_for_budget(cfg.nfe)
    settings = {k: v for k, v in cfg.__dict__.items() if k != "grid"}
    settings["grid"] = _grid_json(cfg.grid)
    if out is not None and Path(out).is_file():
        saved = torch.load(out, weights_only=False, map_location="cpu")
        if saved.get("info", {}).get("settings") == settings:
            return load_amed(out, model), saved["info"]["report"]
    g = torch.Generator().manual_seed(cfg.seed)
    shape = model.sample_shape
    x_T = torch.randn(cfg.samples, *shape, generator=g)
    labels = None
    if model.num_classes is not None:
        labels = torch.arange(cfg.samples) % model.num_classes
    start = time.perf_counter()
    ref = teacher_states(model, cfg, x_T, labels)
    teacher_seconds = time.perf_counter() - start
    torch.manual_seed(cfg.seed)
    predictor = AMEDPredictor(
        bottleneck_features(model.unet),
        band=cfg.band,
        num_train_timesteps=model.schedule.num_train_timesteps,
    )
    sampler = KINDS[cfg.kind](model.schedule, steps, predictor, cfg.grid, afs)
    opt = torch.optim.Adam(predictor.parameters(), lr=cfg.lr)
    unet = model.unet
    flags = [p.requires_grad for p in unet.parameters()]
    unet.requires_grad_(False)
    losses: list[float] = []
    bar = None
    batches = math.ceil(cfg.samples / cfg.batch_size)
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=cfg.epochs * batches,
            desc=f"train {cfg.kind}-{cfg.nfe}",
            unit="batch",
            disable=None,
            file=sys.stderr,
        )
    sig = Sigmas(model.schedule)
    try:
        for _ in range(cfg.epochs):
            perm = torch.randperm(cfg.samples, generator=g)
            total, count = 0.0, 0
            for k in range(batches):
                idx = perm[k * cfg.batch_size : (k + 1) * cfg.batch_size]
                lab = None if labels is None else labels[idx]
                d_fn = _GradEps(unet, lab, cfg.guidance, model.num_classes)
                hook = _Bottleneck(unet, len(idx))
                y = ref[idx, 0]
                state = sampler._init_state()
                try:
                    for i in range(steps):
                        opt.zero_grad(set_to_none=True)
                        with torch.enable_grad():
                            y_next, state = sampler._interval(y, i, d_fn, hook, state, sig)
                            loss = (y_next - ref[idx, i + 1]).pow(2).flatten(1).sum(1).mean()
                            loss.backward()
                        opt.step()
                        total += float(loss.detach()) * len(idx)
                        count += len(idx)
                        # The solver restarts from the teacher, the plugins keep their own
                        # path (their multistep history is their own).
                        y = ref[idx, i + 1] if cfg.kind == "amed" else y_next.detach()
                        state = sampler._detached(state)
                finally:
                    hook.close()
                if bar is not None:
                    bar.update(1)
            losses.append(total / count)
            if bar is not None:
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
    finally:
        for p, f in zip(unet.parameters(), flags):
            p.requires_grad_(f)
        if bar is not None:
            bar.close()
    predictor.eval()
    report = {
        "losses": losses,
        "seconds": time.perf_counter() - start,
        "teacher_seconds": teacher_seconds,
        "teacher_evals_per_sample": 2 * (cfg.teacher_extra + 1) * steps,
        "intervals": steps,
        "afs": afs,
    }
    if out is not None:
        save_amed(sampler, model, out, settings=settings, report=report)
    return sampler, report

"""Training a noise-predicting UNet with DDPM's objective, resumably.

The loss is DDPM's: draw a timestep ``t`` uniformly and noise ``eps``, noise the image
with diffusers' ``DDPMScheduler.add_noise`` and regress the UNet's output on ``eps``.
Class-conditional presets drop the label to "no class" with probability ``label_drop``
so the same network also predicts unconditionally (classifier-free guidance).  The
weights saved are an exponential moving average (EMA) of the trained ones, standard for
diffusion models and much better samples for the same steps.

Long work is safe to interrupt: every ``checkpoint_every`` steps the whole training
state (weights, EMA, optimiser, learning-rate schedule, step, every random generator,
the losses so far) is written atomically to ``<out_dir>/train_state.pt``; rerunning the
same command continues from it bit for bit.  A finished run also holds the EMA model in
diffusers' layout in ``<out_dir>/model`` (see :mod:`fixedpoint.diffusion.model`) and its
test loss (noise-prediction MSE on the held-out images, at fixed timesteps and noise).

``objective = Objective.VELOCITY`` trains a flow-matching (rectified-flow) model instead
(:mod:`fixedpoint.diffusion.flow`): ``t`` uniform in ``[0, 1]``, ``x_t = (1 - t) x0 + t
eps`` and the UNet, at timestep ``1000 t``, regressed on the velocity ``eps - x0``; its
test loss is that velocity MSE.  Presets ``flow-digits`` and ``flow-mnist``.  Everything
else (EMA, label drop, checkpoints, resume) is shared; the epsilon presets are unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as nnf
from torch import Tensor

from ..atomic import atomic_torch_save, atomic_write_bytes
from ..data import Dataset, load_dataset
from .flow import FlowModel, load_flow_model
from .model import DiffusionModel, UNetConfig, load_model
from .schedule import NoiseSchedule

__all__ = [
    "PRESETS",
    "Objective",
    "TrainConfig",
    "TrainError",
    "TrainOutcome",
    "pad_images",
    "train",
]


class TrainError(ValueError):
    """A training request that cannot be honoured."""


class Objective(str, Enum):
    """What the UNet learns to predict."""

    EPSILON = "epsilon"  # DDPM: the noise, on the DDPM schedule
    VELOCITY = "velocity"  # flow matching: eps - x0 on the linear path


@dataclass(frozen=True)
class TrainConfig:
    """What to train and how.  ``unet.sample_size`` may exceed the data's image size:
    images are then padded with the background value -1 (MNIST 28 -> 32)."""

    dataset: str = "digits"
    unet: UNetConfig = UNetConfig(sample_size=8, channels=(32, 64), num_classes=10)
    steps: int = 3000
    batch_size: int = 64
    lr: float = 2e-3
    warmup: int = 200
    ema: float = 0.999
    label_drop: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 500
    out_dir: str = ".cache/diffusion/digits"
    data_dir: str | None = None
    objective: Objective = Objective.EPSILON

    _RUNTIME_ONLY = ("checkpoint_every", "out_dir", "data_dir")

    def identity(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for key in self._RUNTIME_ONLY:
            d.pop(key)
        d["unet"]["channels"] = list(d["unet"]["channels"])
        # The epsilon identity stays what it was before flow models existed, so saved
        # training states of noise models keep resuming.
        objective = Objective(d.pop("objective"))
        if objective is not Objective.EPSILON:
            d["objective"] = objective.value
        return d

    def validate(self) -> None:
        for name in ("steps", "batch_size", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise TrainError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.ema < 1:
            raise TrainError(f"ema must be in [0, 1), got {self.ema}")
        if not 0 <= self.label_drop <= 1:
            raise TrainError(f"label_drop must be in [0, 1], got {self.label_drop}")
        if self.lr <= 0 or self.warmup < 0:
            raise TrainError("lr must be > 0 and warmup >= 0")
        try:
            Objective(self.objective)
        except ValueError:
            raise TrainError(
                f"objective must be one of {', '.join(o.value for o in Objective)}, "
                f"got {self.objective!r}"
            ) from None


PRESETS: dict[str, TrainConfig] = {
    "digits": TrainConfig(),
    # 28x28 without padding, three levels (28 -> 14 -> 7: the coarsest sees the whole
    # digit), 620k parameters, 0.44 s per step at batch 64 on one idle core (6,000 steps
    # ~ 45 min).  The earlier two-level 160k model (2,500 steps of 32) drew digits at
    # chance with DDIM-100 (classifier accuracy 0.16).
    "mnist": TrainConfig(
        dataset="mnist",
        unet=UNetConfig(sample_size=28, channels=(16, 32, 64), num_classes=10),
        steps=6000,
        batch_size=64,
        lr=2e-3,
        out_dir=".cache/diffusion/mnist",
    ),
    # The same UNets and training settings, trained as rectified flows (velocity target).
    "flow-digits": TrainConfig(
        objective=Objective.VELOCITY, out_dir=".cache/diffusion/flow-digits"
    ),
    # The MNIST noise model's three-level UNet (the two-level one drew digits at chance),
    # 4,000 steps of 64: ~35 min on one core of a shared 2-core machine.
    "flow-mnist": TrainConfig(
        dataset="mnist",
        unet=UNetConfig(sample_size=28, channels=(16, 32, 64), num_classes=10),
        steps=4000,
        batch_size=64,
        lr=2e-3,
        objective=Objective.VELOCITY,
        out_dir=".cache/diffusion/flow-mnist",
    ),
}


@dataclass(frozen=True)
class TrainOutcome:
    model_dir: Path
    test_loss: float
    steps: int
    resumed_from: int
    train_time: float
    parameters: int


def pad_images(x: Tensor, size: int) -> Tensor:
    """Pad ``(N, C, h, w)`` images to ``size x size`` with -1 (background), centred."""
    h, w = x.shape[-2:]
    if h > size or w > size:
        raise TrainError(f"images of {h}x{w} do not fit a {size}x{size} UNet")
    top, left = (size - h) // 2, (size - w) // 2
    return nnf.pad(x, (left, size - w - left, top, size - h - top), value=-1.0)


def crop_images(x: Tensor, size: int) -> Tensor:
    """Undo :func:`pad_images`: the centred ``size x size`` crop."""
    h, w = x.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top : top + size, left : left + size]


def _lr(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def diffusion_loss(
    model: DiffusionModel, scheduler: Any, x: Tensor, labels: Tensor | None, gen: torch.Generator
) -> Tensor:
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x),), generator=gen)
    eps = torch.randn(x.shape, generator=gen)
    noisy = scheduler.add_noise(x, eps, t)
    return nnf.mse_loss(model.unet(noisy, t, class_labels=labels).sample, eps)


def flow_loss(model: FlowModel, x: Tensor, labels: Tensor | None, gen: torch.Generator) -> Tensor:
    """Flow matching on the linear path: regress the UNet at ``(x_t, 1000 t)`` on ``eps - x``."""
    t = torch.rand((len(x),), generator=gen)
    eps = torch.randn(x.shape, generator=gen)
    tb = t[:, None, None, None]
    noisy = (1 - tb) * x + tb * eps
    out = model.unet(noisy, t * model.num_train_timesteps, class_labels=labels).sample
    return nnf.mse_loss(out, eps - x)


def _loss_fn(model: DiffusionModel | FlowModel) -> Any:
    """``loss(x, labels, gen)`` of the model's objective (read from what it predicts)."""
    if model.prediction == Objective.VELOCITY.value:
        return lambda x, labels, gen: flow_loss(model, x, labels, gen)
    scheduler = model.schedule.ddpm_scheduler()
    return lambda x, labels, gen: diffusion_loss(model, scheduler, x, labels, gen)


def _new_model(cfg: TrainConfig, data: Dataset) -> DiffusionModel | FlowModel:
    meta = {"dataset": data.name, "data_size": data.image_size}
    if Objective(cfg.objective) is Objective.VELOCITY:
        return FlowModel.new(cfg.unet, **meta)
    return DiffusionModel.new(cfg.unet, NoiseSchedule.default(), **meta)


@torch.no_grad()
def test_loss(
    model: DiffusionModel | FlowModel, data: Dataset, size: int, seed: int, batch: int = 500
) -> float:
    """The objective's MSE (noise or velocity) on the test images at seeded times and noise."""
    loss = _loss_fn(model)
    gen = torch.Generator().manual_seed(seed)
    x_all = pad_images(data.test_x, size)
    total, count = 0.0, 0
    conditional = model.num_classes is not None
    for i in range(0, len(x_all), batch):
        x = x_all[i : i + batch]
        labels = data.test_y[i : i + batch] if conditional else None
        total += float(loss(x, labels, gen)) * len(x)
        count += len(x)
    return total / count


def _state_path(cfg: TrainConfig) -> Path:
    return Path(cfg.out_dir) / "train_state.pt"


def train(
    cfg: TrainConfig,
    *,
    data: Dataset | None = None,
    progress: bool = True,
    callback: Any = None,
) -> TrainOutcome:
    """Train (or resume, or return the finished run of) ``cfg``; see the module docstring.

    ``callback(step, loss)`` runs after every step; an exception from it aborts training
    like a crash would (the resume test uses it).
    """
    cfg.validate()
    if data is None:
        data = load_dataset(cfg.dataset, cfg.data_dir)
    size = cfg.unet.sample_size
    if data.channels != cfg.unet.in_channels:
        raise TrainError(
            f"{data.name} has {data.channels} channel(s), the UNet {cfg.unet.in_channels}"
        )
    train_x = pad_images(data.train_x, size)
    conditional = cfg.unet.num_classes is not None
    out = Path(cfg.out_dir)
    model_dir = out / "model"

    torch.manual_seed(cfg.seed)
    model = _new_model(cfg, data)
    ema = _new_model(cfg, data)
    ema.unet.load_state_dict(model.unet.state_dict())
    ema.unet.requires_grad_(False)
    loss_fn = _loss_fn(model)
    optimizer = torch.optim.AdamW(model.unet.parameters(), lr=cfg.lr, weight_decay=0.0)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr(s, cfg))
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    step, losses, train_time = 0, [], 0.0
    parameters = sum(p.numel() for p in model.unet.parameters())

    path = _state_path(cfg)
    if path.exists():
        try:
            saved = torch.load(path, weights_only=False)
        except Exception as exc:  # a damaged file: say which
            raise TrainError(f"{path}: unreadable training state ({exc})") from exc
        if saved["identity"] != cfg.identity() or saved["data_md5"] != data.provenance.get("md5"):
            raise TrainError(
                f"{path} belongs to a different training configuration or data set; use "
                "another --out-dir or delete it"
            )
        if saved.get("complete") and (model_dir / "unet").is_dir():
            return TrainOutcome(
                model_dir,
                saved["test_loss"],
                saved["step"],
                saved["step"],
                saved["train_time"],
                parameters,
            )
        model.unet.load_state_dict(saved["unet"])
        ema.unet.load_state_dict(saved["ema"])
        optimizer.load_state_dict(saved["optimizer"])
        lr_sched.load_state_dict(saved["lr_schedule"])
        gen.set_state(saved["generator"])
        torch.set_rng_state(saved["torch_rng"])
        step, losses, train_time = saved["step"], list(saved["losses"]), saved["train_time"]
    resumed_from = step

    def save_state(**more: Any) -> None:
        atomic_torch_save(
            {
                "identity": cfg.identity(),
                "data_md5": data.provenance.get("md5"),
                "unet": model.unet.state_dict(),
                "ema": ema.unet.state_dict(),
                "optimizer": optimizer.state_dict(),
                "lr_schedule": lr_sched.state_dict(),
                "generator": gen.get_state(),
                "torch_rng": torch.get_rng_state(),
                "step": step,
                "losses": losses,
                "train_time": train_time,
                **more,
            },
            path,
        )

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=cfg.steps,
            initial=step,
            desc=f"train {'flow' if model.prediction == 'velocity' else 'diffusion'} {data.name}",
            unit="step",
            dynamic_ncols=True,
            disable=None,
            file=sys.stderr,
        )
    n = len(train_x)
    per_epoch = max(1, n // cfg.batch_size)
    model.unet.train()
    try:
        while step < cfg.steps:
            t0 = time.perf_counter()
            epoch, i = divmod(step, per_epoch)
            perm = torch.randperm(
                n, generator=torch.Generator().manual_seed(cfg.seed * 7919 + epoch)
            )
            idx = perm[i * cfg.batch_size : (i + 1) * cfg.batch_size]
            x = train_x[idx]
            labels = None
            if conditional:
                labels = data.train_y[idx].clone()
                drop = torch.rand(len(idx), generator=gen) < cfg.label_drop
                labels[drop] = cfg.unet.num_classes
            loss = loss_fn(x, labels, gen)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.unet.parameters(), cfg.grad_clip)
            optimizer.step()
            lr_sched.step()
            with torch.no_grad():
                for pe, pm in zip(ema.unet.parameters(), model.unet.parameters()):
                    pe.lerp_(pm, 1 - cfg.ema)
            step += 1
            value = float(loss.detach())
            losses.append(value)
            train_time += time.perf_counter() - t0
            if bar is not None:
                bar.update(1)
                if step % 20 == 0:
                    bar.set_postfix(loss=f"{sum(losses[-20:]) / 20:.4f}")
            if step % cfg.checkpoint_every == 0 and step < cfg.steps:
                save_state()
                if progress and (bar is None or bar.disable):
                    # No terminal (a log file, nohup): one line per checkpoint instead.
                    recent = losses[-cfg.checkpoint_every :]
                    print(
                        f"step {step}/{cfg.steps} loss {sum(recent) / len(recent):.4f} "
                        f"{train_time / max(1, step - resumed_from):.3f} s/step",
                        file=sys.stderr,
                        flush=True,
                    )
            if callback is not None:
                callback(step, value)
    finally:
        if bar is not None:
            bar.close()
    ema.unet.eval()
    loss_test = test_loss(ema, data, size, cfg.seed + 2)
    ema.meta.update(test_loss=loss_test, steps=step, train_config=cfg.identity())
    ema.save(model_dir)
    atomic_write_bytes(
        out / "train.json",
        json.dumps(
            {
                "test_loss": loss_test,
                "steps": step,
                "train_time": train_time,
                "parameters": parameters,
                "config": cfg.identity(),
            },
            indent=2,
        ).encode(),
    )
    save_state(complete=True, test_loss=loss_test)
    return TrainOutcome(model_dir, loss_test, step, resumed_from, train_time, parameters)


def load_trained(cfg: TrainConfig) -> DiffusionModel | FlowModel:
    """The EMA model of a finished run of ``cfg`` (a :class:`FlowModel` for velocity)."""
    if Objective(cfg.objective) is Objective.VELOCITY:
        return load_flow_model(Path(cfg.out_dir) / "model")
    return load_model(Path(cfg.out_dir) / "model")

"""The noise schedule of a DDPM-trained noise predictor, read from a diffusers config.

The betas, cumulative alphas and inference timestep grids are computed by diffusers'
own ``DDPMScheduler`` / ``DDIMScheduler`` from the configuration, so a chain built here
walks exactly the grid a diffusers pipeline would.  What this module adds is
validation: a configuration the samplers here cannot honour is refused with one line
saying why, instead of sampling something subtly different.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["NoiseSchedule", "ScheduleError", "default_scheduler_config"]

SCHEDULERS = ("DDPMScheduler", "DDIMScheduler")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SPACINGS = ("leading", "trailing", "linspace")
VARIANCES = ("fixed_small", "fixed_large")


class ScheduleError(ValueError):
    """A scheduler configuration the samplers cannot follow exactly."""


def default_scheduler_config(num_train_timesteps: int = 1000) -> dict[str, Any]:
    """The schedule models here are trained with: DDPM's linear betas, no clipping."""
    return {
        "_class_name": "DDPMScheduler",
        "num_train_timesteps": num_train_timesteps,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "prediction_type": "epsilon",
        "clip_sample": False,
        "variance_type": "fixed_small",
        "timestep_spacing": "leading",
        "steps_offset": 0,
    }


def _check_config(config: dict[str, Any]) -> None:
    def bad(message: str) -> ScheduleError:
        return ScheduleError(f"scheduler config: {message}")

    name = config.get("_class_name", "DDPMScheduler")
    if name not in SCHEDULERS:
        raise bad(f"class {name!r} is not supported (expected one of {', '.join(SCHEDULERS)})")
    steps = config.get("num_train_timesteps", 1000)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 2:
        raise bad(f"num_train_timesteps must be an int >= 2, got {steps!r}")
    if config.get("prediction_type", "epsilon") != "epsilon":
        raise bad(
            f"prediction_type {config['prediction_type']!r} is not supported: the samplers "
            "here need a noise (epsilon) predictor"
        )
    if config.get("thresholding", False):
        raise bad("dynamic thresholding is not supported")
    if config.get("rescale_betas_zero_snr", False):
        raise bad("rescale_betas_zero_snr is not supported")
    if config.get("trained_betas") is None:
        schedule = config.get("beta_schedule", "linear")
        if schedule not in BETA_SCHEDULES:
            raise bad(f"beta_schedule {schedule!r} is not one of {', '.join(BETA_SCHEDULES)}")
    spacing = config.get("timestep_spacing", "leading")
    if spacing not in SPACINGS:
        raise bad(f"timestep_spacing {spacing!r} is not one of {', '.join(SPACINGS)}")
    variance = config.get("variance_type", "fixed_small")
    if variance not in VARIANCES:
        raise bad(f"variance_type {variance!r} is not one of {', '.join(VARIANCES)}")


@dataclass(frozen=True)
class NoiseSchedule:
    """A validated diffusers scheduler configuration and the quantities derived from it."""

    config: dict[str, Any]

    def __post_init__(self) -> None:
        if not isinstance(self.config, dict):
            raise ScheduleError(
                f"scheduler config must be a dict, got {type(self.config).__name__}"
            )
        _check_config(self.config)

    @classmethod
    def default(cls, num_train_timesteps: int = 1000) -> NoiseSchedule:
        return cls(default_scheduler_config(num_train_timesteps))

    def ddpm_scheduler(self) -> Any:
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(self._plain())

    def ddim_scheduler(self) -> Any:
        from diffusers import DDIMScheduler

        return DDIMScheduler.from_config(self._plain())

    def _plain(self) -> dict[str, Any]:
        return {k: v for k, v in self.config.items() if not k.startswith("_")}

    @property
    def num_train_timesteps(self) -> int:
        return int(self.config.get("num_train_timesteps", 1000))

    @property
    def clip_range(self) -> float | None:
        """The clamp applied to the predicted clean sample, or None."""
        if self.config.get("clip_sample", True):
            return float(self.config.get("clip_sample_range", 1.0))
        return None

    @property
    def alphas_cumprod(self) -> Tensor:
        """``abar_t`` for the training timesteps, float32 exactly as diffusers holds it."""
        return self.ddpm_scheduler().alphas_cumprod.clone()

    def ddim_grid(self, steps: int) -> tuple[Tensor, Tensor]:
        """Timesteps and the noise level after each step of diffusers' DDIM loop.

        Returns ``(timesteps (N,), abar_next (N,))`` where ``abar_next`` follows
        DDIMScheduler.step: the timestep ``num_train // N`` earlier, or the final alpha
        (one with ``set_alpha_to_one``) past the start of the schedule.
        """
        scheduler = self.ddim_scheduler()
        _check_steps(steps, self.num_train_timesteps)
        scheduler.set_timesteps(steps)
        timesteps = scheduler.timesteps.clone().long()
        prev = timesteps - self.num_train_timesteps // steps
        abar = scheduler.alphas_cumprod
        final = scheduler.final_alpha_cumprod.to(abar.dtype)
        nxt = torch.where(prev >= 0, abar[prev.clamp(min=0)], final)
        return timesteps, nxt

    def ddpm_grid(self, steps: int) -> tuple[Tensor, Tensor]:
        """Timesteps and the previous timestep (``-1``: clean) of diffusers' DDPM loop."""
        scheduler = self.ddpm_scheduler()
        _check_steps(steps, self.num_train_timesteps)
        scheduler.set_timesteps(steps)
        timesteps = scheduler.timesteps.clone().long()
        prev = torch.cat([timesteps[1:], timesteps.new_tensor([-1])])
        return timesteps, prev


def _check_steps(steps: int, train: int) -> None:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps <= 0:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if steps > train:
        raise ValueError(f"steps={steps} exceeds the {train} training timesteps of the schedule")

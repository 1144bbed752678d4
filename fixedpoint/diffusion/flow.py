"""The flow-matching (rectified-flow) model: a ``UNet2DModel`` predicting a velocity.

Convention (diffusers' ``FlowMatchEulerDiscreteScheduler`` with ``shift = 1``): on the
linear path ``x_t = (1 - t) x0 + t eps`` from data (``t = 0``) to noise (``t = 1``) the
network predicts the velocity ``v = eps - x0 = dx_t/dt``, conditioned on the timestep
``num_train_timesteps * t``.  Sampling integrates ``dx/dt = v`` from ``t = 1`` down to 0.

A model directory has the same layout as a noise model's (:mod:`.model`), with that
scheduler's config in ``scheduler/`` and ``"prediction": "velocity"`` in
``fixedpoint.json``; :func:`load_flow_model` refuses a noise model and
:func:`~fixedpoint.diffusion.model.load_model` refuses a velocity model, each in one line.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..atomic import atomic_write_bytes
from .model import META, ModelError, UNetConfig, UNetDenoiser, _config_dict, _read_json

__all__ = ["FlowModel", "load_flow_model"]

VELOCITY = "velocity"
SCHEDULER = "FlowMatchEulerDiscreteScheduler"


@dataclass
class FlowModel:
    """A velocity-predicting UNet and what it was trained on."""

    unet: nn.Module
    meta: dict[str, Any] = field(default_factory=dict)
    num_train_timesteps: int = 1000

    prediction = VELOCITY  # class constant: what the network's output means

    @classmethod
    def new(cls, config: UNetConfig, num_train_timesteps: int = 1000, **meta: Any) -> FlowModel:
        unet = config.build(num_train_timesteps)
        return cls(unet, {"unet_config": _config_dict(config), **meta}, num_train_timesteps)

    @property
    def num_classes(self) -> int | None:
        if "num_classes" in self.meta:
            return self.meta["num_classes"]
        embeds = self.unet.config.num_class_embeds
        return None if embeds is None else embeds - 1

    def denoiser(self) -> UNetDenoiser:
        """The network behind the Denoiser interface; its output is the velocity."""
        return UNetDenoiser(self.unet, self.num_classes)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.denoiser().sample_shape

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """``save_pretrained`` of the UNet and of diffusers' flow-matching scheduler."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        directory = Path(directory)
        self.unet.save_pretrained(directory / "unet")
        scheduler = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=self.num_train_timesteps, shift=1.0
        )
        scheduler.save_pretrained(directory / "scheduler")
        meta = {**self.meta, "num_classes": self.num_classes, "prediction": VELOCITY}
        atomic_write_bytes(directory / META, json.dumps(meta, indent=2).encode())
        return directory


def load_flow_model(directory: str | os.PathLike[str], *, device: str = "cpu") -> FlowModel:
    """Load a velocity model written by :meth:`FlowModel.save` (local files only)."""
    from diffusers import UNet2DModel

    directory = Path(directory)
    meta_file = directory / META
    if not (directory / "unet" / "config.json").is_file():
        raise ModelError(f"{directory} is not a flow model directory: no unet/config.json in it")
    meta = _read_json(meta_file) if meta_file.is_file() else {}
    if meta.get("prediction", "epsilon") != VELOCITY:
        raise ModelError(
            f"{directory} holds a noise (epsilon) model; a velocity (flow-matching) model is "
            "needed here"
        )
    scheduler_file = directory / "scheduler" / "scheduler_config.json"
    steps = 1000
    if scheduler_file.is_file():
        config = _read_json(scheduler_file)
        if config.get("_class_name") != SCHEDULER or config.get("shift", 1.0) != 1.0:
            raise ModelError(
                f"{scheduler_file}: expected {SCHEDULER} with shift 1, got "
                f"{config.get('_class_name')!r} shift {config.get('shift')!r}"
            )
        steps = int(config.get("num_train_timesteps", 1000))
    try:
        unet = UNet2DModel.from_pretrained(
            directory / "unet", local_files_only=True, low_cpu_mem_usage=False
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelError(f"{directory}: cannot load the UNet ({str(exc).splitlines()[0]})") from exc
    unet.to(device).eval()
    return FlowModel(unet, meta, steps)

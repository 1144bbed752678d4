"""The denoiser: a diffusers ``UNet2DModel`` predicting noise, with its noise schedule.

A model directory is the diffusers layout, written by ``save_pretrained`` and read by
``from_pretrained`` (local files only, never the network)::

    model/
      unet/config.json, unet/diffusion_pytorch_model.safetensors
      scheduler/scheduler_config.json
      fixedpoint.json            # optional: data set, padding, classes (ours)

A bare ``UNet2DModel`` directory (``config.json`` + weights, with an optional
``scheduler_config.json`` beside it) loads too, so any UNet2DModel a user has plugs in;
without a scheduler config it gets :meth:`NoiseSchedule.default`.

Class-conditional models embed ``num_classes + 1`` labels; the last one is "no class",
used for classifier-free guidance.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..atomic import atomic_write_bytes
from .schedule import NoiseSchedule, ScheduleError

__all__ = [
    "DiffusionModel",
    "ModelError",
    "UNetConfig",
    "UNetDenoiser",
    "load_model",
    "tiny_model",
]

META = "fixedpoint.json"


class ModelError(ValueError):
    """A directory that does not hold a usable diffusion model."""


@dataclass(frozen=True)
class UNetConfig:
    """A small noise-predicting UNet: ``len(channels)`` resolution levels.

    ``attention`` adds self-attention at the coarsest level.  ``num_classes`` makes the
    model class-conditional (plus one "no class" label for guidance).
    """

    sample_size: int = 8
    in_channels: int = 1
    channels: tuple[int, ...] = (32, 64)
    layers_per_block: int = 1
    attention: bool = False
    norm_groups: int = 8
    num_classes: int | None = None

    def __post_init__(self) -> None:
        if self.sample_size < 1 or self.in_channels < 1 or self.layers_per_block < 1:
            raise ValueError("sample_size, in_channels and layers_per_block must be >= 1")
        if not self.channels or any(c % self.norm_groups for c in self.channels):
            raise ValueError(
                f"every channel count must be a multiple of norm_groups={self.norm_groups}, "
                f"got {self.channels}"
            )
        if self.sample_size % 2 ** (len(self.channels) - 1):
            raise ValueError(
                f"sample_size {self.sample_size} is not divisible by 2^{len(self.channels) - 1}"
                f" ({len(self.channels)} resolution levels)"
            )
        if self.num_classes is not None and self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 or None, got {self.num_classes}")

    def build(self, num_train_timesteps: int = 1000) -> nn.Module:
        from diffusers import UNet2DModel

        levels = len(self.channels)
        down = ["DownBlock2D"] * levels
        up = ["UpBlock2D"] * levels
        if self.attention:
            down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
        return UNet2DModel(
            sample_size=self.sample_size,
            in_channels=self.in_channels,
            out_channels=self.in_channels,
            block_out_channels=tuple(self.channels),
            layers_per_block=self.layers_per_block,
            down_block_types=tuple(down),
            up_block_types=tuple(up),
            norm_num_groups=self.norm_groups,
            attention_head_dim=8,
            add_attention=self.attention,
            num_class_embeds=None if self.num_classes is None else self.num_classes + 1,
            num_train_timesteps=num_train_timesteps,
        )


class UNetDenoiser:
    """A UNet2DModel behind the :class:`~fixedpoint.diffusion.maps.Denoiser` interface."""

    def __init__(self, unet: nn.Module, num_classes: int | None):
        self.unet = unet
        cfg = unet.config
        size = cfg.sample_size
        hw = (size, size) if isinstance(size, int) else tuple(size)
        self.sample_shape: tuple[int, ...] = (cfg.in_channels, *hw)
        self.num_classes = num_classes
        self.null_label = None if num_classes is None else num_classes

    @torch.no_grad()
    def __call__(self, x: Tensor, timesteps: Tensor, labels: Tensor | None = None) -> Tensor:
        if tuple(x.shape[1:]) != self.sample_shape:
            raise ValueError(
                f"images of shape {tuple(x.shape[1:])} do not fit this UNet, which takes "
                f"{self.sample_shape}"
            )
        return self.unet(x, timesteps, class_labels=labels).sample


@dataclass
class DiffusionModel:
    """A UNet, its noise schedule and what it was trained on."""

    unet: nn.Module
    schedule: NoiseSchedule
    meta: dict[str, Any] = field(default_factory=dict)

    prediction = "epsilon"  # class constant: the network predicts the noise

    @classmethod
    def new(
        cls, config: UNetConfig, schedule: NoiseSchedule | None = None, **meta: Any
    ) -> DiffusionModel:
        schedule = schedule or NoiseSchedule.default()
        unet = config.build(schedule.num_train_timesteps)
        return cls(unet, schedule, {"unet_config": _config_dict(config), **meta})

    @property
    def num_classes(self) -> int | None:
        embeds = self.unet.config.num_class_embeds
        if "num_classes" in self.meta:
            return self.meta["num_classes"]
        return None if embeds is None else embeds - 1

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.denoiser().sample_shape

    def denoiser(self) -> UNetDenoiser:
        return UNetDenoiser(self.unet, self.num_classes)

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """``save_pretrained`` of the UNet and the scheduler, plus our metadata."""
        directory = Path(directory)
        self.unet.save_pretrained(directory / "unet")
        self.schedule.ddpm_scheduler().save_pretrained(directory / "scheduler")
        meta = {**self.meta, "num_classes": self.num_classes}
        atomic_write_bytes(directory / META, json.dumps(meta, indent=2).encode())
        return directory


def _config_dict(config: UNetConfig) -> dict[str, Any]:
    d = asdict(config)
    d["channels"] = list(d["channels"])
    return d


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: unreadable ({exc})") from exc
    if not isinstance(value, dict):
        raise ModelError(f"{path}: expected a JSON object")
    return value


def load_model(directory: str | os.PathLike[str], *, device: str = "cpu") -> DiffusionModel:
    """Load a model directory (see the module docstring) with ``from_pretrained``."""
    from diffusers import UNet2DModel

    directory = Path(directory)
    if not directory.is_dir():
        raise ModelError(f"{directory} is not a directory")
    if (directory / "unet" / "config.json").is_file():
        unet_dir, scheduler_file = (
            directory / "unet",
            directory / "scheduler" / "scheduler_config.json",
        )
    elif (directory / "config.json").is_file():
        unet_dir, scheduler_file = directory, directory / "scheduler_config.json"
    else:
        raise ModelError(
            f"{directory} is not a diffusers model: no unet/config.json or config.json in it"
        )
    unet_config = _read_json(unet_dir / "config.json")
    if (directory / META).is_file():
        prediction = _read_json(directory / META).get("prediction", "epsilon")
        if prediction != "epsilon":
            raise ModelError(
                f"{directory} holds a {prediction} (flow-matching) model; a noise (epsilon) "
                "model is needed here"
            )
    if unet_config.get("_class_name") != "UNet2DModel":
        raise ModelError(
            f"{unet_dir / 'config.json'} describes {unet_config.get('_class_name')!r}, "
            "not a UNet2DModel"
        )
    if scheduler_file.is_file():
        try:
            schedule = NoiseSchedule(_read_json(scheduler_file))
        except ScheduleError as exc:
            raise ModelError(f"{scheduler_file}: {exc}") from exc
    else:
        schedule = NoiseSchedule.default()
    trained = unet_config.get("num_train_timesteps")
    if trained is not None and trained != schedule.num_train_timesteps:
        raise ModelError(
            f"the scheduler has {schedule.num_train_timesteps} training timesteps but the UNet "
            f"was built for {trained}"
        )
    try:
        unet = UNet2DModel.from_pretrained(unet_dir, local_files_only=True, low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelError(f"{unet_dir}: cannot load the UNet ({str(exc).splitlines()[0]})") from exc
    meta = _read_json(directory / META) if (directory / META).is_file() else {}
    unet.to(device).eval()
    return DiffusionModel(unet, schedule, meta)


def tiny_model(
    num_classes: int | None = None, sample_size: int = 8, seed: int = 0
) -> DiffusionModel:
    """A randomly initialised small UNet (tests, examples): seconds to sample on a CPU."""
    config = UNetConfig(
        sample_size=sample_size, channels=(8, 16), norm_groups=4, num_classes=num_classes
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = DiffusionModel.new(config)
    model.unet.eval()
    return model

"""Saving and loading TarFlow checkpoints.

A checkpoint is one ``torch.save`` file holding only plain data (dicts, lists, numbers,
strings, tensors) so that it loads with ``torch.load(weights_only=True)``: no pickled
classes, so opening a checkpoint cannot run code.  Contents:

* ``format`` / ``format_version``: identify the file and its layout;
* ``config``: the :class:`TarFlowConfig` as a plain dict (rebuilds the model);
* ``model``: the state dict; ``optimizer`` / ``scheduler``: their state dicts or None;
* ``step``: optimiser steps taken;
* ``rng``: torch / Python / numpy global RNG states plus any named generator states the
  trainer passes (so a resumed run continues the same random streams);
* ``extra``: free-form plain data (data provenance, train config, test NLL, ...);
* ``versions``: library versions that wrote the file.

Writes are atomic: the file is written to a temporary file in the target directory and
moved into place with :func:`os.replace`, so an interrupted save never leaves a truncated
checkpoint under the final name.
"""

from __future__ import annotations

import os
import platform
import random
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fixedpoint.atomic import atomic_torch_save
from fixedpoint.tarflow.model import TarFlow, TarFlowConfig

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "Checkpoint",
    "CheckpointError",
    "capture_rng_state",
    "load_checkpoint",
    "load_model",
    "restore_rng_state",
    "save_checkpoint",
]

FORMAT = "fixedpoint.tarflow.checkpoint"
FORMAT_VERSION = 1
_REQUIRED = ("format_version", "config", "model", "step")


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, of an unknown format or does not fit its model."""


def _versions() -> dict[str, str]:
    try:
        from importlib.metadata import PackageNotFoundError, version

        try:
            fixedpoint_version = version("fixedpoint")
        except PackageNotFoundError:
            fixedpoint_version = "unknown (not installed)"
    except ImportError:  # pragma: no cover - importlib.metadata is stdlib since 3.8
        fixedpoint_version = "unknown"
    return {
        "fixedpoint": fixedpoint_version,
        # str(): torch.__version__ is a TorchVersion, which weights-only loading refuses.
        "torch": str(torch.__version__),
        "numpy": str(np.__version__),
        "python": platform.python_version(),
    }


def capture_rng_state() -> dict[str, Any]:
    """Global RNG states as weights-only-loadable data (numpy's array becomes a tensor)."""
    # The legacy global state is deliberate: it is what np.random.seed sets.
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state` (keys that are absent are left alone)."""
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "python" in state:
        # weights_only loading turns the inner tuple into a list; random wants tuples.
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        s = state["numpy"]
        keys = s["keys"].numpy().astype(np.uint32)
        state_tuple = (s["kind"], keys, s["pos"], s["has_gauss"], s["cached_gaussian"])
        np.random.set_state(state_tuple)  # noqa: NPY002


@dataclass
class Checkpoint:
    """The validated contents of a checkpoint file."""

    path: Path
    format_version: int
    config: dict[str, Any]
    model_state: dict[str, Tensor]
    optimizer_state: dict[str, Any] | None = None
    scheduler_state: dict[str, Any] | None = None
    step: int = 0
    rng_state: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)

    @property
    def model_config(self) -> TarFlowConfig:
        return TarFlowConfig.from_dict(self.config)

    def build_model(self) -> TarFlow:
        """A fresh :class:`TarFlow` with the stored weights, in eval mode.

        Building runs the model's random initialisation; it is done inside
        ``fork_rng`` so that loading a model does not perturb the caller's global RNG.
        """
        with torch.random.fork_rng(devices=[]):
            model = TarFlow(self.model_config)
        _check_state(self.path, model, self.model_state)
        model.load_state_dict(self.model_state)
        return model.eval()


def _model_config(model: nn.Module) -> TarFlowConfig:
    config = getattr(model, "config", None)
    if not isinstance(config, TarFlowConfig):
        raise TypeError(f"expected a TarFlow with a .config TarFlowConfig, got {type(model)}")
    return config


def save_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    step: int = 0,
    extra: dict[str, Any] | None = None,
    rng: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint atomically and return its path.

    ``rng`` holds additional named RNG states (e.g. the trainer's data generator) stored
    next to the global ones; ``extra`` must be plain data (it is loaded weights-only).
    """
    path = Path(path)
    config = _model_config(model)
    rng_state = capture_rng_state()
    if rng:
        rng_state.update(rng)
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": config.to_dict(),
        "model": model.state_dict(),
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "scheduler": None if scheduler is None else scheduler.state_dict(),
        "step": int(step),
        "rng": rng_state,
        "extra": dict(extra or {}),
        "versions": _versions(),
    }
    atomic_torch_save(payload, path)
    return path


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


_UNSAFE_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def _load_reason(exc: BaseException) -> str:
    """A short reason for a failed ``torch.load``, without torch's advice."""
    found = _UNSAFE_GLOBAL.search(str(exc))
    if found:
        return f": it holds a pickled {found.group(1)} object, which is never loaded"
    if isinstance(exc, (RuntimeError, zipfile.BadZipFile)) and "zip archive" in str(exc):
        return ": damaged or truncated archive"
    return ""


def _names(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def _check_state(path: Path, model: nn.Module, state: dict[str, Tensor]) -> None:
    """Raise CheckpointError unless ``state`` has exactly the model's keys and shapes."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    problems = []
    if missing:
        problems.append(f"missing keys: {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_names(unexpected)}")
    for key, ref in expected.items():
        value = state.get(key)
        if value is None:
            continue
        if not isinstance(value, Tensor):
            problems.append(f"{key} is a {type(value).__name__}, not a tensor")
        elif value.shape != ref.shape:
            problems.append(
                f"{key} has shape {tuple(value.shape)}, the config expects {tuple(ref.shape)}"
            )
    if problems:
        raise CheckpointError(
            f"{path}: weights do not match the stored config: " + "; ".join(problems)
        )


def load_checkpoint(path: str | os.PathLike[str], map_location: Any = "cpu") -> Checkpoint:
    """Read and validate a checkpoint (format, config, weight keys and shapes)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated zip, random bytes, pickled objects, ...
        # torch's messages advise weights_only=False, which is not the fix: say what
        # the file is instead.
        raise CheckpointError(
            f"{path}: not a fixedpoint checkpoint (or corrupted){_load_reason(exc)}"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a fixedpoint TarFlow checkpoint")
    absent = [k for k in _REQUIRED if k not in payload]
    if absent:
        raise CheckpointError(f"{path}: checkpoint lacks {', '.join(absent)}")
    version = payload["format_version"]
    if version != FORMAT_VERSION:
        newer = isinstance(version, int) and version > FORMAT_VERSION
        raise CheckpointError(
            f"{path}: checkpoint format version {version} is not supported (this version "
            f"reads {FORMAT_VERSION}{'; upgrade fixedpoint' if newer else ''})"
        )
    if not isinstance(payload["config"], dict) or not isinstance(payload["model"], dict):
        raise CheckpointError(f"{path}: config or model entry is malformed")
    ckpt = Checkpoint(
        path=path,
        format_version=version,
        config=payload["config"],
        model_state=payload["model"],
        optimizer_state=payload.get("optimizer"),
        scheduler_state=payload.get("scheduler"),
        step=int(payload["step"]),
        rng_state=payload.get("rng") or {},
        extra=payload.get("extra") or {},
        versions=payload.get("versions") or {},
    )
    try:
        config = ckpt.model_config
    except (TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{path}: stored config is invalid: {_first_line(exc)}") from None
    # Build on the meta device: only the parameter names and shapes are needed, so this
    # costs no memory or time and does not touch the RNG.
    try:
        with torch.device("meta"):
            skeleton = TarFlow(config)
    except Exception as exc:
        raise CheckpointError(
            f"{path}: stored config does not build a model: {_first_line(exc)}"
        ) from None
    _check_state(path, skeleton, ckpt.model_state)
    return ckpt


def load_model(path: str | os.PathLike[str], map_location: Any = "cpu") -> TarFlow:
    """The model stored in a checkpoint, weights loaded, in eval mode."""
    return load_checkpoint(path, map_location).build_model()

"""FInC Flow checkpoints: one ``torch.save`` file of plain data, written atomically.

Contents: ``format`` / ``format_version``, ``config`` (a :class:`FInCFlowConfig` dict),
``model`` (state dict), ``optimizer`` / ``scheduler`` (state dicts or None), ``step``,
``rng`` (global torch / Python / numpy states and the trainer's named generators) and
``extra`` (plain data: train config, data provenance, losses, test bits/dim).  Files load
with ``torch.load(weights_only=True)``, so opening one cannot run code; anything missing,
truncated or inconsistent raises :class:`CheckpointError` with the reason.

The RNG helpers here are generic (nothing FInC-specific): the TarFlow trainer keeps its
own copy in ``fixedpoint.tarflow.checkpoint``, which an application may not import.
"""

from __future__ import annotations

import os
import random
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fixedpoint.atomic import atomic_torch_save

from .model import FInCFlow, FInCFlowConfig

__all__ = [
    "FORMAT",
    "Checkpoint",
    "CheckpointError",
    "global_rng_state",
    "load_checkpoint",
    "load_model",
    "save_checkpoint",
    "set_global_rng_state",
]

FORMAT = "fixedpoint.finc.checkpoint"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, of another format or does not fit."""


def global_rng_state() -> dict[str, Any]:
    """torch, Python and numpy global RNG states as weights-only-loadable data."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos),
                  int(has_gauss), float(cached)],
    }


def set_global_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`global_rng_state` captured (absent entries are left alone)."""
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "python" in state:
        version, internal, gauss = state["python"]  # lists after weights-only loading
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state(  # noqa: NPY002
            (kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached)
        )


@dataclass
class Checkpoint:
    path: Path
    config: FInCFlowConfig
    model_state: dict[str, Tensor]
    optimizer_state: dict[str, Any] | None = None
    scheduler_state: dict[str, Any] | None = None
    step: int = 0
    rng: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def build_model(self) -> FInCFlow:
        """The stored model in eval mode; building does not disturb the global RNG."""
        with torch.random.fork_rng(devices=[]):
            model = FInCFlow(self.config)
        model.load_state_dict(self.model_state)
        return model.eval()


def save_checkpoint(
    path: str | os.PathLike[str],
    model: FInCFlow,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    step: int = 0,
    extra: dict[str, Any] | None = None,
    generators: dict[str, torch.Generator] | None = None,
) -> Path:
    path = Path(path)
    rng = global_rng_state()
    for name, gen in (generators or {}).items():
        rng[name] = gen.get_state()
    atomic_torch_save(
        {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "config": model.config.to_dict(),
            "model": model.state_dict(),
            "optimizer": None if optimizer is None else optimizer.state_dict(),
            "scheduler": None if scheduler is None else scheduler.state_dict(),
            "step": int(step),
            "rng": rng,
            "extra": dict(extra or {}),
            "versions": {"torch": str(torch.__version__)},
        },
        path,
    )
    return path


def _reason(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


def load_checkpoint(path: str | os.PathLike[str], map_location: Any = "cpu") -> Checkpoint:
    """Read and validate a checkpoint: format, version, config, weight names and shapes."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt): "
                              f"{_reason(exc)}") from None
    except Exception as exc:  # unpickling errors of every kind
        raise CheckpointError(f"{path}: not a readable checkpoint: {type(exc).__name__}: "
                              f"{_reason(exc)}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a FInC Flow checkpoint")
    if payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {payload.get('format_version')!r} is not "
            f"supported (this version reads {FORMAT_VERSION})"
        )
    for key in ("config", "model", "step"):
        if key not in payload:
            raise CheckpointError(f"{path}: checkpoint lacks {key!r}")
    try:
        config = FInCFlowConfig.from_dict(payload["config"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: stored config is invalid: {_reason(exc)}") from None
    with torch.random.fork_rng(devices=[]):
        expected = FInCFlow(config).state_dict()
    state = payload["model"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: model entry is malformed")
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state)
                   if not isinstance(state[k], Tensor) or state[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        parts = [f"{name}: {', '.join(keys[:4])}" + (" ..." if len(keys) > 4 else "")
                 for name, keys in (("missing", missing), ("unexpected", unexpected),
                                    ("wrong shape", wrong)) if keys]
        raise CheckpointError(f"{path}: weights do not fit the stored config ({'; '.join(parts)})")
    return Checkpoint(
        path=path,
        config=config,
        model_state=state,
        optimizer_state=payload.get("optimizer"),
        scheduler_state=payload.get("scheduler"),
        step=int(payload["step"]),
        rng=payload.get("rng") or {},
        extra=payload.get("extra") or {},
    )


def load_model(path: str | os.PathLike[str], map_location: Any = "cpu") -> FInCFlow:
    return load_checkpoint(path, map_location).build_model()

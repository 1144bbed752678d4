"""Generating many FInC Flow samples in shards, resumable.

Shard ``i`` holds samples ``i * shard_size ..`` and draws its latents from a generator
seeded by ``(seed, i)`` alone, so a shard's content does not depend on which shards ran
before it or in which session.  Each shard is written atomically; a rerun skips the
shards already on disk (after checking they belong to the same run) and finally writes
``samples.pt`` (all images) and ``summary.json`` (time, dependent steps, method).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from fixedpoint.atomic import atomic_torch_save, atomic_write_bytes

from .model import FInCFlow, Inverter, Layout
from .sampling import sample

__all__ = ["GenerateError", "GenerateSpec", "generate"]


class GenerateError(ValueError):
    """A generation request that conflicts with what is already on disk, or is invalid."""


@dataclass(frozen=True)
class GenerateSpec:
    """What identifies a generation run (stored in every shard and compared on resume)."""

    checkpoint: str
    method: str
    layout: str
    num_samples: int
    shard_size: int
    seed: int = 0
    temperature: float = 1.0

    def validate(self) -> None:
        if self.num_samples < 1 or self.shard_size < 1:
            raise GenerateError("num_samples and shard_size must be >= 1")
        if not self.temperature > 0:
            raise GenerateError(f"temperature must be > 0, got {self.temperature}")


def _shard_seed(seed: int, index: int) -> int:
    return seed * 1_000_003 + index


def generate(model: FInCFlow, spec: GenerateSpec, inverter_factory, layout: Layout,
             out_dir: str | Path, progress: bool = True) -> dict[str, Any]:
    """Write the shards that are missing, then ``samples.pt`` and ``summary.json``.

    ``inverter_factory(results)`` returns a fresh :data:`Inverter` that appends the
    :class:`fixedpoint.Result` of every solve to ``results`` (or appends nothing).
    """
    spec.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards = (spec.num_samples + spec.shard_size - 1) // spec.shard_size
    identity = asdict(spec)
    done_time, done_steps, images = 0.0, 0, []
    indices = range(shards)
    if progress:
        from tqdm.auto import tqdm

        indices = tqdm(indices, desc="finc generate", unit="shard")
    for i in indices:
        path = out / f"shard-{i:05d}.pt"
        if path.exists():
            try:
                stored = torch.load(path, weights_only=True)
            except Exception as exc:  # a damaged shard is regenerated, never trusted
                print(f"warning: {path} unreadable ({type(exc).__name__}); regenerating")
                stored = None
            if stored is not None:
                if stored.get("spec") != identity:
                    raise GenerateError(f"{path} belongs to another run (different "
                                        "checkpoint, method, seed or sizes); use another "
                                        "--out-dir")
                images.append(stored["images"])
                done_time += float(stored["seconds"])
                done_steps += int(stored["dependent_steps"])
                continue
        n = min(spec.shard_size, spec.num_samples - i * spec.shard_size)
        gen = torch.Generator().manual_seed(_shard_seed(spec.seed, i))
        results: list[Any] = []
        inverter: Inverter = inverter_factory(results)
        start = time.perf_counter()
        s = sample(model, n, inverter, generator=gen, temperature=spec.temperature,
                   layout=layout)
        seconds = time.perf_counter() - start
        steps = sum(r.dependent_steps for r in results)
        atomic_torch_save({"spec": identity, "images": s.images, "seconds": seconds,
                           "dependent_steps": steps}, path)
        images.append(s.images)
        done_time += seconds
        done_steps += steps
    all_images = torch.cat(images)
    atomic_torch_save(all_images, out / "samples.pt")
    summary = {"spec": identity, "samples": len(all_images), "shards": shards,
               "seconds": done_time, "seconds_per_100": 100 * done_time / len(all_images),
               "dependent_steps": done_steps}
    atomic_write_bytes(out / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
    return summary

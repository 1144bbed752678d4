"""Many samples in resumable shards, as one process or under ``torchrun``.

Sample ``i`` draws its starting noise (and, for DDPM, its step noise) from a generator
seeded with ``(seed, i)`` and gets the label ``i % classes``, so a sample does not depend
on the shard it falls in or on the number of processes.  Shard ``k`` (samples
``k*S .. k*S+S-1``) belongs to rank ``k mod world_size`` and is written atomically to
``<out>/shards/shard-<k>.pt`` when done; rerunning the same command skips finished
shards.  ``<out>/run.json`` records the settings; a directory holding another run's
shards is refused.  Rank 0 merges the shards into ``samples.pt`` and, with a quality
meter, scores them (FCD against the test images and class accuracy) in ``report.json``.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..atomic import atomic_torch_save, atomic_write_bytes
from ..distributed import Context
from .chain import Split
from .maps import MarkovMap, PicardMap
from .model import DiffusionModel
from .sampling import paradigms_tolerance, sample_loop, solve_chain

__all__ = ["GenerateError", "SamplerSpec", "generate"]

SAMPLERS = ("ddim", "ddpm", "euler", "heun")
FORMS = ("picard", "markov")
METHODS = (
    "sequential",
    "jacobi",
    "window",
    "paradigms",
    "gs-jacobi",
    "triangular-anderson",
    "window-anderson",
)


class GenerateError(ValueError):
    """Settings that cannot be sampled, or an output directory of another run."""


@dataclass(frozen=True)
class SamplerSpec:
    """A sampler and the way its chain is solved; plain values, written into run.json."""

    sampler: str = "ddim"
    steps: int = 100
    method: str = "window"
    form: str = "picard"
    window: int = 16
    atol: float | None = 1e-4
    rtol: float | None = 0.0
    tau: float = 0.1
    blocks: int = 4
    guidance: float | None = None
    split: str = "noise"  # fd.Split of the Picard form (DDIM, DDPM): "noise" or "clean"

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("sampler", self.sampler, SAMPLERS),
            ("form", self.form, FORMS),
            ("method", self.method, METHODS),
        ):
            if value not in allowed:
                raise GenerateError(f"{name} {value!r} is not one of {', '.join(allowed)}")
        if self.steps <= 0:
            raise GenerateError(f"steps must be >= 1, got {self.steps}")
        if self.window <= 0:
            raise GenerateError(f"window must be >= 1, got {self.window}")
        if self.blocks <= 0:
            raise GenerateError(f"blocks must be >= 1, got {self.blocks}")
        splits = tuple(s.value for s in Split)
        if self.split not in splits:
            raise GenerateError(f"split {self.split!r} is not one of {', '.join(splits)}")
        if self.split != Split.NOISE.value and self.sampler not in ("ddim", "ddpm"):
            raise GenerateError(
                f"split {self.split!r} applies to ddim and ddpm, not {self.sampler}"
            )

    def chain(self, model: DiffusionModel):
        from .chain import DDIMChain, DDPMChain, EulerChain, HeunChain

        if self.sampler in ("euler", "heun"):
            kind = {"euler": EulerChain, "heun": HeunChain}[self.sampler]
            return kind.from_schedule(model.schedule, self.steps)
        kind = {"ddim": DDIMChain, "ddpm": DDPMChain}[self.sampler]
        return kind.from_schedule(model.schedule, self.steps, Split(self.split))

    def solver(self, chain) -> Any:
        import fixedpoint as fp

        tol = dict(atol=self.atol, rtol=self.rtol)
        return {
            "sequential": lambda: fp.Sequential(),
            "jacobi": lambda: fp.Jacobi(**tol),
            "window": lambda: fp.SlidingWindow(self.window, **tol),
            "paradigms": lambda: fp.SlidingWindow(
                self.window, atol=paradigms_tolerance(chain, self.tau), rtol=0.0, rms=True
            ),
            "gs-jacobi": lambda: fp.GSJacobi(modules=min(self.blocks, chain_len(chain)), **tol),
            "triangular-anderson": lambda: fp.TriangularAnderson(memory=2, ridge=1e-3, **tol),
            # ParaTAA on the sliding window (the memory the studies measured best on it)
            "window-anderson": lambda: fp.TriangularAnderson(
                memory=3, ridge=1e-3, window_width=self.window, **tol
            ),
        }[self.method]()

    def form_type(self) -> type:
        return PicardMap if self.form == "picard" else MarkovMap


def chain_len(chain: Any) -> int:
    return len(chain)


@dataclass
class Batch:
    images: Tensor
    labels: Tensor | None
    calls: int
    rows: int
    iterations: int
    seconds: float


def draw(model: DiffusionModel, chain: Any, indices: range, seed: int) -> tuple[Tensor, ...]:
    """Per-index starting noise and step noise (independent of batching)."""
    shape = model.sample_shape
    xs, zs = [], []
    for i in indices:
        g = torch.Generator().manual_seed(hash_seed(seed, i))
        xs.append(torch.randn(shape, generator=g))
        if chain.stochastic:
            zs.append(torch.randn(len(chain), *shape, generator=g))
    x = torch.stack(xs)
    noise = torch.stack(zs) if chain.stochastic else None
    labels = None
    if model.num_classes is not None:
        labels = torch.tensor([i % model.num_classes for i in indices])
    return x, noise, labels


def hash_seed(seed: int, index: int) -> int:
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def sample_batch(model: DiffusionModel, spec: SamplerSpec, indices: range, seed: int) -> Batch:
    """Samples ``indices`` as one batch with the spec's sampler and method."""
    chain = spec.chain(model)
    x, noise, labels = draw(model, chain, indices, seed)
    den = model.denoiser()
    start = time.perf_counter()
    if spec.method == "sequential":
        images = sample_loop(chain, den, x, noise, labels=labels, guidance=spec.guidance)
        calls, rows, its = len(chain) * chain.stages, len(chain) * len(indices), len(chain)
    else:
        fmap = spec.form_type()(chain, den, x, noise, labels=labels, guidance=spec.guidance)
        out = solve_chain(fmap, spec.solver(chain))
        if not bool(out.result.converged.all()) and spec.method != "gs-jacobi":
            raise GenerateError(f"the solve did not converge: {out.result.summary()}")
        images, calls, rows, its = (
            out.sample,
            out.network.calls,
            out.network.rows,
            out.result.iterations,
        )
    if not bool(torch.isfinite(images).all()):
        raise GenerateError(f"non-finite samples in {indices.start}..{indices.stop - 1}")
    return Batch(images, labels, calls, rows, its, time.perf_counter() - start)


def _settings(model_dir: str, spec: SamplerSpec, seed: int, shard_size: int) -> dict[str, Any]:
    return {
        "model": str(Path(model_dir).resolve()),
        "spec": asdict(spec),
        "seed": seed,
        "shard_size": shard_size,
    }


def generate(
    model: DiffusionModel,
    model_dir: str,
    spec: SamplerSpec,
    out_dir: str | Path,
    *,
    num_samples: int,
    shard_size: int,
    seed: int = 0,
    context: Context | None = None,
    meter: Any = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Sample ``num_samples`` in shards (see the module docstring); the report on every rank."""
    ctx = context or Context()
    if num_samples <= 0 or shard_size <= 0:
        raise GenerateError("num_samples and shard_size must be >= 1")
    out = Path(out_dir)
    settings = _settings(model_dir, spec, seed, shard_size)
    fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    run_file = out / "run.json"
    if ctx.is_main:
        if run_file.exists():
            stored = json.loads(run_file.read_text())
            if stored.get("fingerprint") != fingerprint:
                raise GenerateError(f"{out} holds a run with other settings; use another --out-dir")
        else:
            atomic_write_bytes(
                run_file, json.dumps({"fingerprint": fingerprint, **settings}, indent=2).encode()
            )
    ctx.barrier()
    shards = [range(k, min(k + shard_size, num_samples)) for k in range(0, num_samples, shard_size)]
    mine = [k for k in range(len(shards)) if k % ctx.world_size == ctx.rank]
    bar = None
    if progress and ctx.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(mine), desc="generate", unit="shard", disable=None)
    seconds = 0.0
    for k in mine:
        path = out / "shards" / f"shard-{k}.pt"
        if path.exists():
            try:
                done = torch.load(path, weights_only=False)
                if done.get("fingerprint") == fingerprint and done["indices"] == list(shards[k]):
                    if bar is not None:
                        bar.update(1)
                    continue
            except Exception:  # a damaged shard is redone
                pass
        batch = sample_batch(model, spec, shards[k], seed)
        seconds += batch.seconds
        atomic_torch_save(
            {
                "fingerprint": fingerprint,
                "indices": list(shards[k]),
                "images": batch.images,
                "labels": batch.labels,
                "calls": batch.calls,
                "rows": batch.rows,
                "iterations": batch.iterations,
                "seconds": batch.seconds,
            },
            path,
        )
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    times = ctx.gather(seconds)
    report: dict[str, Any] = {}
    if ctx.is_main:
        parts = [
            torch.load(out / "shards" / f"shard-{k}.pt", weights_only=False)
            for k in range(len(shards))
        ]
        images = torch.cat([p["images"] for p in parts])
        labels = None if parts[0]["labels"] is None else torch.cat([p["labels"] for p in parts])
        atomic_torch_save(
            {"images": images, "labels": labels, "indices": list(range(num_samples))},
            out / "samples.pt",
        )
        report = {
            "samples": num_samples,
            "shards": len(shards),
            "world_size": ctx.world_size,
            "seconds_per_rank": times,
            "slowest_rank_seconds": max(times),
            "dependent_calls_per_shard": [p["calls"] for p in parts],
            "iterations_per_shard": [p["iterations"] for p in parts],
            "spec": asdict(spec),
        }
        if meter is not None:
            size = model.meta.get("data_size", images.shape[-1])
            from .train import crop_images

            scored = crop_images(images, size) if size != images.shape[-1] else images
            report["fcd"] = meter.frechet(scored)
            if labels is not None:
                report["accuracy"] = meter.accuracy(scored, labels)
        atomic_write_bytes(out / "report.json", json.dumps(report, indent=2).encode())
    gathered = ctx.gather(report)
    return gathered[0]

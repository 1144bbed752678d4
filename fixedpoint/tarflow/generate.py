"""Sharded sampling and quality evaluation, in one process or many (``torchrun``).

The samples ``0 .. N-1`` are cut into shards of ``shard_size`` consecutive indices, and
shard ``k`` goes to rank ``k mod world_size``.  What a sample looks like depends only on
its global index and the run's settings, never on the number of processes:

* its noise comes from a generator seeded with ``(seed, index)`` (NumPy's
  ``SeedSequence`` mixes the pair into a 64-bit seed), its label is
  ``labels[index mod len(labels)]``;
* a shard is always sampled as one batch, so each sample is computed in the same batch
  composition whatever the world size: results are bit-for-bit equal to a
  single-process run on the same device type, dtype and thread count.

Every finished shard is written atomically to ``<out>/shards/shard-<k>.pt`` with a
fingerprint of the run (checkpoint hash, model config, strategy, settings); a rerun of
the same command skips the shards that are already there, so a crashed or interrupted
run resumes.  The sample count is not part of the fingerprint: rerunning with a larger
``num_samples`` extends a run (only a short last shard is sampled again).

A shard with non-finite samples is not written; the run then fails with a
:class:`GenerationError` naming the rank, the shard and the sample indices, after every
rank has finished or failed (the shards written by then are kept).

Quality is reduced, not recomputed on one rank: each rank turns its shards into
classifier-feature sums (float64), the sums of all shards are gathered and added in shard
order (so the reduction, too, is independent of the world size), and the Fréchet
classifier distance and conditional accuracy come from the totals.  Timing is per rank;
the report gives the slowest rank, which is what a user waits for.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

import fixedpoint as fp

from ..atomic import atomic_torch_save, atomic_write_bytes
from ..distributed import Context
from .model import TarFlow
from .sampling import reverse
from .strategy import Strategy

__all__ = [
    "GenerationError",
    "RunMismatchError",
    "GenerationReport",
    "GenerationSpec",
    "ShardFailure",
    "generate",
    "load_samples",
    "rank_shards",
    "sample_labels",
    "sample_noise",
    "shard_ranges",
]

SHARD_FORMAT = "fixedpoint.generate.shard"
SAMPLES_FORMAT = "fixedpoint.generate.samples"
FORMAT_VERSION = 1


class GenerationError(RuntimeError):
    """A sharded run failed on some rank, or its output directory is unusable."""


class RunMismatchError(ValueError):
    """The output directory holds shards of a run with other settings (a user error: the
    message names the settings that differ)."""


@dataclass(frozen=True)
class GenerationSpec:
    """Everything besides model and strategy that decides which samples a run produces.

    ``labels``: class labels cycled over the global sample index (sample ``i`` gets
    ``labels[i % len(labels)]``); None for unconditional sampling.
    """

    num_samples: int
    shard_size: int = 64
    seed: int = 0
    guidance: float = 0.0
    anneal_guidance: bool = False
    denoise: bool = False
    labels: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("num_samples", "shard_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {self.seed!r}")
        if not math.isfinite(self.guidance):
            raise ValueError(f"guidance must be finite, got {self.guidance!r}")
        if self.labels is not None and len(self.labels) == 0:
            raise ValueError("labels must be None (unconditional) or non-empty")

    @property
    def num_shards(self) -> int:
        return -(-self.num_samples // self.shard_size)


@dataclass(frozen=True)
class ShardFailure:
    """Why a rank stopped: the shard, its global sample indices and the reason."""

    rank: int
    shard: int
    indices: tuple[int, ...]
    reason: str

    def describe(self) -> str:
        return (f"rank {self.rank} failed on shard {self.shard} (samples "
                f"{_ranges_text(self.indices)}): {self.reason}")


@dataclass
class GenerationReport:
    """What a run produced and what it cost.

    ``rank_seconds``: sampling wall-clock of each rank (shards sampled in this run only);
    ``slowest_rank_seconds`` is their maximum.  ``fcd`` / ``accuracy`` are None without a
    quality meter (accuracy also for unconditional runs).  Costs are summed over the
    shards sampled in this run (a shard is one batch).
    """

    num_samples: int
    shard_size: int
    world_size: int
    shards_total: int
    shards_sampled: int
    shards_skipped: int
    samples_sampled: int
    rank_seconds: list[float]
    slowest_rank: int
    slowest_rank_seconds: float
    dependent_steps: int
    token_evals: int
    fcd: float | None
    accuracy: float | None
    out_dir: str
    samples_path: str | None
    fingerprint: str
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def samples_per_second(self) -> float | None:
        if self.slowest_rank_seconds <= 0 or self.samples_sampled == 0:
            return None
        return self.samples_sampled / self.slowest_rank_seconds

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["samples_per_second"] = self.samples_per_second
        return out


# ------------------------------------------------------------------------ per index


def _index_seed(seed: int, index: int) -> int:
    # SeedSequence mixes (seed, index) so that neighbouring indices get unrelated streams.
    state = np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)
    return int(state[0])


def sample_noise(indices: Sequence[int], seed: int, seq_len: int, token_dim: int) -> Tensor:
    """Prior noise ``(len(indices), T, d)`` on the CPU, each row seeded by its global index."""
    rows = []
    for i in indices:
        g = torch.Generator().manual_seed(_index_seed(seed, int(i)))
        rows.append(torch.randn(seq_len, token_dim, generator=g))
    if not rows:
        return torch.empty(0, seq_len, token_dim)
    return torch.stack(rows)


def sample_labels(indices: Sequence[int], labels: Sequence[int] | None) -> Tensor | None:
    """``labels[i % len(labels)]`` for each global index ``i``; None if unconditional."""
    if labels is None:
        return None
    return torch.tensor([labels[int(i) % len(labels)] for i in indices], dtype=torch.long)


def shard_ranges(num_samples: int, shard_size: int) -> list[range]:
    """The global sample indices of every shard, in shard order."""
    return [range(lo, min(lo + shard_size, num_samples))
            for lo in range(0, num_samples, shard_size)]


def rank_shards(num_shards: int, rank: int, world_size: int) -> list[int]:
    """The shards rank ``rank`` samples: ``k`` with ``k mod world_size == rank``.

    Round-robin rather than contiguous blocks, so that the ranks stay balanced when the
    last shard is short and when a rerun finds some shards already done.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside a world of {world_size}")
    return list(range(rank, num_shards, world_size))


def _ranges_text(indices: Sequence[int]) -> str:
    """``3, 7..9, 12`` for [3, 7, 8, 9, 12] (runs collapsed), at most 8 runs shown."""
    runs: list[tuple[int, int]] = []
    for i in sorted(indices):
        if runs and i == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    parts = [str(a) if a == b else f"{a}..{b}" for a, b in runs[:8]]
    if len(runs) > 8:
        parts.append(f"... ({len(indices)} in all)")
    return ", ".join(parts)


# ----------------------------------------------------------------------- fingerprint


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _sha256_state(model: TarFlow) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def run_settings(model: TarFlow, strategy: Strategy, spec: GenerationSpec,
                 device: torch.device, dtype: torch.dtype | None,
                 checkpoint: str | Path | None) -> dict[str, Any]:
    """The settings that decide the samples; their hash is the run's fingerprint."""
    weights = _sha256_file(Path(checkpoint)) if checkpoint else _sha256_state(model)
    settings = {
        "format_version": FORMAT_VERSION,
        "weights_sha256": weights,
        "model": model.config.to_dict(),
        "strategy": repr(strategy.plans),
        # Not the sample count: sample i does not depend on it, so a run can be extended
        # (a pilot of 512 samples becomes the first 512 of 50,000).
        "spec": {k: v for k, v in asdict(spec).items() if k != "num_samples"},
        "device_type": device.type,
        "autocast_dtype": None if dtype is None else str(dtype).removeprefix("torch."),
    }
    # As plain JSON data (tuples become lists), so it compares equal to a stored manifest.
    return json.loads(json.dumps(settings, default=str))


def _fingerprint(settings: dict[str, Any]) -> str:
    blob = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _check_manifest(path: Path, settings: dict[str, Any]) -> None:
    """Refuse an output directory that holds another run's shards."""
    if not path.exists():
        return
    try:
        stored = json.loads(path.read_text())["settings"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise GenerationError(f"{path}: unreadable run manifest ({exc}); remove it or "
                              "choose another output directory") from None
    if stored != settings:
        raise RunMismatchError(
            f"{path.parent} holds shards of a different run ({_differences(stored, settings)}); "
            "choose another output directory or delete it"
        )


def _differences(stored: Any, current: Any, name: str = "") -> str:
    """``spec.guidance: 1.0 there, 2.0 now; ...`` for the settings that differ."""
    if isinstance(stored, dict) and isinstance(current, dict):
        keys = sorted(set(stored) | set(current))
        parts = [_differences(stored.get(k), current.get(k), f"{name}.{k}" if name else k)
                 for k in keys if stored.get(k) != current.get(k)]
        return "; ".join(parts)
    return f"{name}: {_short(stored)} there, {_short(current)} now"


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------- shards


def _shard_path(out_dir: Path, k: int) -> Path:
    return out_dir / "shards" / f"shard-{k:06d}.pt"


def _read_shard(path: Path, fingerprint: str, indices: range) -> dict[str, Any] | None:
    """A complete shard of this run, or None if absent; warns on damaged or foreign ones."""
    if not path.exists():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        ok = (isinstance(payload, dict) and payload.get("format") == SHARD_FORMAT
              and payload.get("fingerprint") == fingerprint
              and list(payload["indices"]) == list(indices)
              and payload["images"].shape[0] == len(indices)
              and bool(torch.isfinite(payload["images"]).all()))
    except Exception as exc:  # truncated zip, unpickling errors, missing keys
        warnings.warn(f"{path}: unreadable shard ({type(exc).__name__}); sampling it again",
                      RuntimeWarning, stacklevel=3)
        return None
    if not ok:
        warnings.warn(f"{path}: not a complete shard of this run; sampling it again",
                      RuntimeWarning, stacklevel=3)
        return None
    return payload


class _NonFinite(Exception):
    def __init__(self, indices: list[int], statuses: str) -> None:
        super().__init__(f"non-finite values in {len(indices)} sample(s) ({statuses})")
        self.indices = indices


def _sample_shard(model: TarFlow, strategy: Strategy, spec: GenerationSpec,
                  indices: range, device: torch.device,
                  precision: Callable[[], AbstractContextManager[Any]]) -> dict[str, Any]:
    c = model.config
    z = sample_noise(indices, spec.seed, c.seq_len, c.token_dim).to(device)
    y = sample_labels(indices, spec.labels)
    y = None if y is None else y.to(device)
    with torch.no_grad(), precision():
        # throw=False: the failed samples of the whole shard are reported at once.
        s = reverse(model, z, y, strategy=strategy, guidance=spec.guidance,
                    anneal_guidance=spec.anneal_guidance, denoise=spec.denoise, throw=False)
    images = s.images.detach().float().cpu()
    # A solver that met NaN / inf keeps the sample's last finite iterate and says so in
    # its status, so the statuses are checked as well as the images.
    bad = set(s.failed_samples)
    bad.update(j for j, b in enumerate((~torch.isfinite(images)).flatten(1).any(1).tolist())
               if b)
    if bad:
        statuses = ", ".join(f"block {k}: {r.status.name}" for k, r in enumerate(s.blocks))
        raise _NonFinite([indices[j] for j in sorted(bad)], statuses)
    return {
        "images": images,
        "labels": None if y is None else y.cpu(),
        "dependent_steps": sum(r.dependent_steps for r in s.blocks),
        "token_evals": sum(r.token_evals for r in s.blocks),
        "iterations": [r.iterations for r in s.blocks],
        "solver_seconds": sum(r.wall_time for r in s.blocks),
    }


def _feature_sums(meter: Any, images: Tensor, labels: Tensor | None) -> dict[str, Any]:
    f = meter.features(images).double()
    out = {"n": len(f), "sum": f.sum(0), "outer": f.T @ f, "correct": None}
    if labels is not None:
        out["correct"] = int((meter.predict(images) == labels).sum())
    return out


def _moments(sums: list[dict[str, Any]]) -> tuple[Tensor, Tensor]:
    """Mean and unbiased covariance of the features from per-shard sums, in shard order."""
    n = sum(s["n"] for s in sums)
    if n < 2:
        raise GenerationError(f"the Fréchet distance needs at least 2 samples, got {n}")
    mean = torch.stack([s["sum"] for s in sums]).sum(0) / n
    outer = torch.stack([s["outer"] for s in sums]).sum(0)
    return mean, (outer - n * torch.outer(mean, mean)) / (n - 1)


def _quality(meter: Any, sums: list[dict[str, Any]]) -> tuple[float, float | None]:
    """FCD and accuracy from per-shard feature sums."""
    from ..quality import frechet_distance_from_statistics

    mean, cov = _moments(sums)
    fcd = frechet_distance_from_statistics(mean.numpy(), cov.numpy(), meter.reference_mean,
                                           meter.reference_cov)
    correct = [s["correct"] for s in sums]
    n = sum(s["n"] for s in sums)
    accuracy = None if any(c is None for c in correct) else sum(correct) / n
    return fcd, accuracy


# ------------------------------------------------------------------------------- run


def _work_through(model: TarFlow, strategy: Strategy, spec: GenerationSpec,
                  ranges: list[range], out: Path, fingerprint: str, ctx: Context,
                  meter: Any | None, precision: Callable[[], AbstractContextManager[Any]],
                  progress: bool) -> dict[str, Any]:
    """This rank's shards: skip the finished ones, sample the rest, stop at a failure.

    Returns the rank's report (what it sampled and skipped, its time and cost, its
    failure if any, and the feature sums of all its finished shards).
    """
    mine = rank_shards(len(ranges), ctx.rank, ctx.world_size)
    bar = None
    if progress and ctx.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(mine), unit="shard", desc=f"rank 0 of {ctx.world_size}")
    sampled, skipped, steps, tokens = [], [], 0, 0
    failure: ShardFailure | None = None
    sums: dict[int, dict[str, Any]] = {}
    seconds = 0.0
    for k in mine:
        path = _shard_path(out, k)
        payload = _read_shard(path, fingerprint, ranges[k])
        if payload is None:
            start = time.perf_counter()
            try:
                result = _sample_shard(model, strategy, spec, ranges[k], ctx.device, precision)
            except _NonFinite as exc:
                failure = ShardFailure(ctx.rank, k, tuple(exc.indices), str(exc))
            except Exception as exc:  # reported collectively, so that no rank hangs
                last = traceback.extract_tb(exc.__traceback__)[-1]
                failure = ShardFailure(
                    ctx.rank, k, tuple(ranges[k]),
                    f"{type(exc).__name__}: {exc} (at {Path(last.filename).name}:{last.lineno})")
            seconds += time.perf_counter() - start
            if failure is not None:
                break
            payload = {"format": SHARD_FORMAT, "format_version": FORMAT_VERSION,
                       "fingerprint": fingerprint, "shard": k, "indices": list(ranges[k]),
                       "rank": ctx.rank, "world_size": ctx.world_size, **result}
            atomic_torch_save(payload, path)
            sampled.append(k)
            steps += result["dependent_steps"]
            tokens += result["token_evals"]
        else:
            skipped.append(k)
        if meter is not None:
            sums[k] = _feature_sums(meter, payload["images"], payload["labels"])
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return {"rank": ctx.rank, "sampled": sampled, "skipped": skipped, "seconds": seconds,
            "samples": sum(len(ranges[k]) for k in sampled), "steps": steps,
            "tokens": tokens, "failure": failure, "sums": sums}


def generate(
    model: TarFlow,
    spec: GenerationSpec,
    out_dir: str | Path,
    *,
    strategy: Strategy | None = None,
    context: Context | None = None,
    meter: Any | None = None,
    autocast_dtype: torch.dtype | None = None,
    checkpoint: str | Path | None = None,
    progress: bool = False,
    merge: bool = True,
) -> GenerationReport:
    """Sample ``spec.num_samples`` images in shards, this process's share of them.

    Args:
        model: the flow, already on ``context.device``.
        spec: sample count, shard size, seed and sampling options.
        out_dir: where ``shards/``, ``run.json``, ``samples.pt`` and ``report.json`` go;
            shared by all ranks.
        strategy: solver per block (default sequential).
        context: from :func:`fixedpoint.distributed.launch`; default one CPU process.
        meter: a :class:`fixedpoint.quality.QualityMeter` for FCD and accuracy, or None.
        autocast_dtype: e.g. ``torch.bfloat16`` to sample under autocast.
        checkpoint: the file the weights came from (hashed for the fingerprint; without it
            the weights themselves are hashed).
        progress: a progress bar on the main rank.
        merge: the main rank concatenates all shards into ``samples.pt``.

    Returns the same :class:`GenerationReport` on every rank.  Raises
    :class:`GenerationError` on every rank if any rank failed, and
    :class:`RunMismatchError` (a ``ValueError``) if ``out_dir`` holds shards of a run with
    other settings.
    """
    ctx = context or Context()
    strategy = strategy or Strategy.uniform(fp.Sequential(), model.config.blocks)
    _check_labels(model, spec)
    out = Path(out_dir)
    settings = run_settings(model, strategy, spec, ctx.device, autocast_dtype, checkpoint)
    fingerprint = _fingerprint(settings)
    _claim_output(ctx, out, settings, fingerprint)

    def precision() -> AbstractContextManager[Any]:
        if autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=ctx.device.type, dtype=autocast_dtype)

    ranges = shard_ranges(spec.num_samples, spec.shard_size)
    reports = ctx.gather(_work_through(model, strategy, spec, ranges, out, fingerprint, ctx,
                                       meter, precision, progress))
    _raise_failures(reports, len(ranges), out)
    samples_path = None
    if merge:
        samples_path = str(out / "samples.pt")
        if ctx.is_main:
            _merge(out, len(ranges), fingerprint, Path(samples_path))
    report = _report(spec, ctx, reports, len(ranges), meter, out, samples_path, fingerprint,
                     settings)
    if ctx.is_main:
        atomic_write_bytes(out / "report.json",
                           json.dumps(report.to_dict(), indent=1, default=str).encode())
    # Nobody leaves (and tears down the group) before the main rank has merged.
    ctx.barrier()
    return report


def _check_labels(model: TarFlow, spec: GenerationSpec) -> None:
    if spec.labels is None:
        return
    k = model.config.num_classes
    bad = [v for v in spec.labels if not -1 <= v < max(k, 0)]
    if k == 0 or bad:
        raise ValueError(f"labels {list(spec.labels)} do not fit a model with "
                         f"{k} classes (use None for unconditional sampling)")


def _claim_output(ctx: Context, out: Path, settings: dict[str, Any], fingerprint: str) -> None:
    """The main rank checks (or writes) the run manifest; every rank learns its verdict
    before touching shards, so none hangs, and raises the same error."""
    refusal = None
    if ctx.is_main:
        try:
            _check_manifest(out / "run.json", settings)
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(out / "run.json", json.dumps({"fingerprint": fingerprint,
                                                             "settings": settings},
                                                            indent=1).encode())
        except RunMismatchError as exc:
            refusal = ("mismatch", str(exc))
        except (GenerationError, OSError) as exc:
            refusal = ("error", str(exc))
    refusal = ctx.gather(refusal)[0]
    if refusal is not None:
        kind, message = refusal
        raise (RunMismatchError if kind == "mismatch" else GenerationError)(message)


def _raise_failures(reports: list[dict[str, Any]], shards: int, out: Path) -> None:
    failures = [r["failure"] for r in reports if r["failure"] is not None]
    if failures:
        done = sum(len(r["sampled"]) + len(r["skipped"]) for r in reports)
        raise GenerationError(
            "; ".join(f.describe() for f in failures)
            + f". {done} of {shards} shards are complete in {out / 'shards'}; "
            "rerunning the same command samples only the missing ones"
        )


def _report(spec: GenerationSpec, ctx: Context, reports: list[dict[str, Any]], shards: int,
            meter: Any | None, out: Path, samples_path: str | None, fingerprint: str,
            settings: dict[str, Any]) -> GenerationReport:
    """Everything the ranks did, reduced (quality from the per-shard feature sums)."""
    fcd = accuracy = None
    if meter is not None:
        merged = {k: s for r in reports for k, s in r["sums"].items()}
        fcd, accuracy = _quality(meter, [merged[k] for k in range(shards)])
    rank_seconds = [float(r["seconds"]) for r in reports]
    slowest = int(np.argmax(rank_seconds))
    return GenerationReport(
        num_samples=spec.num_samples, shard_size=spec.shard_size,
        world_size=ctx.world_size, shards_total=shards,
        shards_sampled=sum(len(r["sampled"]) for r in reports),
        shards_skipped=sum(len(r["skipped"]) for r in reports),
        samples_sampled=sum(r["samples"] for r in reports),
        rank_seconds=rank_seconds, slowest_rank=slowest,
        slowest_rank_seconds=rank_seconds[slowest],
        dependent_steps=sum(r["steps"] for r in reports),
        token_evals=sum(r["tokens"] for r in reports),
        fcd=fcd, accuracy=accuracy, out_dir=str(out), samples_path=samples_path,
        fingerprint=fingerprint, settings=settings,
    )


def _merge(out: Path, shards: int, fingerprint: str, path: Path) -> None:
    images, labels, indices = [], [], []
    for k in range(shards):
        payload = torch.load(_shard_path(out, k), map_location="cpu", weights_only=True)
        if payload.get("fingerprint") != fingerprint:
            raise GenerationError(f"{_shard_path(out, k)} changed during the run")
        images.append(payload["images"])
        indices.extend(payload["indices"])
        if payload["labels"] is not None:
            labels.append(payload["labels"])
    atomic_torch_save({
        "format": SAMPLES_FORMAT, "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint, "images": torch.cat(images),
        "labels": torch.cat(labels) if labels else None,
        "indices": torch.tensor(indices, dtype=torch.long),
    }, path)


def load_samples(path: str | Path) -> dict[str, Any]:
    """The merged ``samples.pt`` of a run: ``images``, ``labels`` (or None), ``indices``."""
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise GenerationError(f"{path}: no such samples file") from None
    except Exception as exc:
        raise GenerationError(f"{path}: unreadable samples file ({type(exc).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != SAMPLES_FORMAT:
        raise GenerationError(f"{path}: not a fixedpoint samples file")
    return payload

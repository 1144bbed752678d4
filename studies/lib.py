"""Models, noise and strategies shared by the study scripts.

Timing is :func:`fixedpoint.benchmark.interleaved_medians`, deviations
:func:`fixedpoint.quality.deviation`: one of each, in the library.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

import fixedpoint as fp
from fixedpoint.data import Dataset, load_dataset
from fixedpoint.tarflow import BlockPlan, InitialGuess, Sample, Strategy, TarFlow, reverse
from fixedpoint.tarflow.checkpoint import load_model
from fixedpoint.tarflow.train import PRESETS, train

from .common import CACHE, Mode, key

# Sampling settings used by every study (the paper samples with CFG; see paper/).
GUIDANCE = 1.0
SEED = 0
# Seeds of the quality samples (FCD, accuracy): QSEED for every row, QSEED + 1 for the
# second sequential draw that measures the metric's own noise.
QSEED = 100
# The error budget of the performance targets: max deviation from the sequential
# samples, for data scaled to [-1, 1].
BUDGET = 1e-3
# Tolerance of the tolerance-driven methods (max update per token, data in [-1, 1]).
TOL = 1e-4


@dataclass
class Trained:
    """A trained model with its data and training report."""

    preset: str
    model: TarFlow
    data: Dataset
    test_bpd: float
    train_time: float
    parameters: int
    epochs: float
    checkpoint: str


def trained(preset: str, mode: Mode, progress: bool = True) -> Trained:
    """Train ``preset`` (or resume / reuse its cached checkpoint) for ``mode``."""
    p = PRESETS[preset]
    epochs = mode.epochs.get(preset, p.train.epochs)
    ident = dataclasses.replace(p.train, epochs=epochs).identity()
    out_dir = CACHE / "models" / f"{preset}-{key(p.model.to_dict(), ident)}"
    cfg = dataclasses.replace(p.train, epochs=epochs, out_dir=str(out_dir))
    data = load_dataset(cfg.dataset)
    outcome = train(p.model, cfg, progress=progress, data=data)
    model = load_model(outcome.checkpoint).eval()
    return Trained(preset, model, data, outcome.test_bpd, outcome.train_time,
                   outcome.parameters, float(epochs), str(outcome.checkpoint))


def noise(model: TarFlow, batch: int, seed: int = SEED) -> tuple[Tensor, Tensor]:
    """Seeded prior noise (tokens) and balanced class labels."""
    c = model.config
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, c.seq_len, c.token_dim, generator=g)
    y = torch.arange(batch) % max(c.num_classes, 1) if c.num_classes else None
    return z, y


def sample(model: TarFlow, z: Tensor, y: Tensor | None, strategy: Strategy | None,
           **kwargs: Any) -> Sample:
    with torch.no_grad():
        return reverse(model, z, y, strategy=strategy, guidance=GUIDANCE, **kwargs)


def quality_images(model: TarFlow, n: int, seed: int, strategy: Strategy | None,
                   chunk: int = 250) -> tuple[Tensor, Tensor | None]:
    """``n`` denoised samples of seeded noise with balanced labels, drawn ``chunk`` at a
    time (memory stays that of one chunk; a chunk's result does not depend on the
    others, every sample keeps its own iteration count)."""
    z, y = noise(model, n, seed=seed)
    parts = []
    for lo in range(0, n, chunk):
        yc = y[lo:lo + chunk] if y is not None else None
        parts.append(sample(model, z[lo:lo + chunk], yc, strategy, denoise=True).x)
    return torch.cat(parts), y


def totals(s: Sample) -> dict[str, Any]:
    """Cost summed over blocks and the worst status."""
    return {
        "dependent_steps": sum(r.dependent_steps for r in s.blocks),
        "token_evals": sum(r.token_evals for r in s.blocks),
        "iterations": [r.iterations for r in s.blocks],
        "status": [r.status.name for r in s.blocks],
        "solver_time": sum(r.wall_time for r in s.blocks),
    }


def timing_clock() -> tuple[Callable[[], float], str]:
    """The clock the studies time with, and its name for the tables.

    With one torch thread: the CPU seconds of this process.  On an idle machine they equal
    the wall-clock; on a shared one they leave out the time spent waiting for a core,
    which would otherwise weigh long runs more than short calls (a short call often fits
    in one scheduler slice) and make every ratio depend on the neighbours' load.  With
    more threads CPU seconds add up over threads, so the wall-clock is used.
    """
    if torch.get_num_threads() == 1:
        return time.process_time, "CPU time of the process"
    return time.perf_counter, "wall-clock"


def sequential_strategy(blocks: int) -> Strategy:
    return Strategy.uniform(fp.Sequential(), blocks)


def jacobi_strategy(blocks: int, max_iter: int | None = None, atol: float | None = 0.0
                    ) -> Strategy:
    return Strategy.uniform(fp.Jacobi(atol=atol, max_iter=max_iter), blocks)


def per_block(methods: Sequence[fp.Method], inits: Sequence[InitialGuess] | None = None
              ) -> Strategy:
    inits = inits or [InitialGuess.NOISE] * len(methods)
    return Strategy(tuple(BlockPlan(m, i) for m, i in zip(methods, inits, strict=True)))

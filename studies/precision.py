"""Beyond the paper: stopping tolerances in bfloat16, raised to the noise floor or kept.

Under ``torch.autocast`` with bfloat16 the network's linear layers carry rounding noise
of order ``2**-7``, so a Jacobi tolerance of 1e-4 cannot be met and every block runs to
its finite-termination bound.  ``reverse`` raises such tolerances to
``fixedpoint.noise_floor(torch.bfloat16)`` (with a warning) unless
``adjust_tolerance=False``.  This study measures, per model, Jacobi (atol 1e-4 on every
block) in float32, in bfloat16 with the tolerance raised and with it kept, and the
sequential sampler in both dtypes: iterations per block, dependent steps, deviation
from the float32 sequential samples and wall-clock (CPU, round-robin median).

    python -m studies.precision --mode fast
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch

import fixedpoint as fp
from fixedpoint.benchmark import interleaved_medians
from fixedpoint.quality import deviation

from .common import Mode, study_main, write_json
from .lib import (
    GUIDANCE,
    SEED,
    TOL,
    jacobi_strategy,
    noise,
    sample,
    sequential_strategy,
    timing_clock,
    trained,
)

BATCH = 16


def run_model(preset: str, mode: Mode) -> dict[str, Any]:
    t = trained(preset, mode)
    model, blocks = t.model, t.model.config.blocks
    z, y = noise(model, BATCH, SEED)
    jacobi = jacobi_strategy(blocks, atol=TOL)
    bf16 = torch.bfloat16
    variants: dict[str, tuple[Any, torch.dtype | None, bool]] = {
        "float32 sequential": (sequential_strategy(blocks), None, True),
        "float32 jacobi": (jacobi, None, True),
        "bfloat16 sequential": (sequential_strategy(blocks), bf16, True),
        "bfloat16 jacobi, tolerance raised": (jacobi, bf16, True),
        "bfloat16 jacobi, tolerance kept": (jacobi, bf16, False),
    }

    def runner(strategy: Any, dtype: torch.dtype | None, adjust: bool) -> Callable[[], Any]:
        def run() -> Any:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", fp.PrecisionWarning)
                if dtype is None:
                    s = sample(model, z, y, strategy, adjust_tolerance=adjust)
                else:
                    with torch.autocast("cpu", dtype=dtype):
                        s = sample(model, z, y, strategy, adjust_tolerance=adjust)
            return s, [w for w in caught if issubclass(w.category, fp.PrecisionWarning)]
        return run

    fns = {name: runner(*v) for name, v in variants.items()}
    results = {name: fn() for name, fn in fns.items()}
    clock, clock_name = timing_clock()
    times = interleaved_medians(fns, mode.repeats, clock=clock)
    ref = results["float32 sequential"][0].x
    rows = []
    for name, (s, caught) in results.items():
        plan = s.strategy.plans[0].method if s.strategy is not None else None
        rows.append({
            "variant": name,
            "tol_used": getattr(plan, "atol", None),
            "iterations": [r.iterations for r in s.blocks],
            "status": [r.status.name for r in s.blocks],
            "dependent_steps": sum(r.dependent_steps for r in s.blocks),
            "deviation_from_float32_sequential": deviation(s.x, ref),
            "precision_warnings": len(caught),
            "time_s": times[name],
        })
    out = {"preset": preset, "seq_len": model.config.seq_len, "batch": BATCH,
           "guidance": GUIDANCE, "tol": TOL, "noise_floor_bfloat16": fp.noise_floor(bf16),
           "threads": torch.get_num_threads(), "repeats": mode.repeats, "clock": clock_name,
           "rows": rows}
    write_json(mode.out_dir / f"precision-{preset}.json", out, seed=SEED)
    return out


if __name__ == "__main__":
    study_main(__doc__, run_model, "precision")

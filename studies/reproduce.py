"""Reproduce every figure and table of the GS-Jacobi paper, then write the paper.

    python -m studies.reproduce              # fast mode: tiny settings, a few minutes
    python -m studies.reproduce --mode full  # the real reproduction, writes paper/

Models are trained (or loaded from ``.cache/studies``) first; then each study runs per
model and writes JSON and PNG files into the mode's output directory (``paper/results``
in full mode).  A study whose output already exists is skipped, so an interrupted run
resumes where it stopped; ``--force`` reruns everything (trained models stay cached).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

from . import (
    batch_scaling,
    convergence,
    crm_igm,
    initial_guess,
    samples,
    speedup,
    trace,
    write_paper,
)
from .common import MODES, Mode, timed, write_json
from .lib import trained

# (name, output file stem or None for figures without JSON, per-model function), in
# dependency order: CRM/IGM reads the convergence results, later studies read CRM/IGM.
STUDIES: list[tuple[str, str, Callable[[str, Mode], object]]] = [
    ("convergence", "convergence-{}.json", convergence.run_model),
    ("crm_igm", "crm_igm-{}.json", crm_igm.run_model),
    ("trace", "trace-{}.png", trace.trace_figure),
    ("samples", "samples-{}.png", samples.samples_figure),
    ("initial_guess", "initial_guess-{}.json", initial_guess.initial_guess_study),
    ("speedup", "speedup-{}.json", speedup.run_model),
    ("batch_scaling", "batch_scaling-{}.json", batch_scaling.run_model),
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=MODES, default="fast")
    parser.add_argument("--force", action="store_true", help="rerun studies whose output exists")
    parser.add_argument("--only", nargs="*", help="run only these studies (names above)")
    parser.add_argument("--models", nargs="*", help="restrict to these training presets")
    parser.add_argument("--out", type=Path, help="output directory (default: the mode's)")
    args = parser.parse_args(argv)
    mode = MODES[args.mode]
    if args.models:
        unknown = set(args.models) - set(mode.models)
        if unknown:
            parser.error(f"unknown models {sorted(unknown)}; {mode.name} mode has {mode.models}")
        mode = dataclasses.replace(mode, models=tuple(args.models))
    if args.out:
        mode = dataclasses.replace(mode, out_dir=args.out.resolve())
    mode.out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    timings: dict[str, float] = {}
    for preset in mode.models:
        t0 = time.perf_counter()
        with timed(f"train {preset} ({mode.name} mode)"):
            t = trained(preset, mode)
        timings[f"train {preset}"] = time.perf_counter() - t0
        print(f"{preset}: test NLL {t.test_bpd:.3f} bits/dim, {t.parameters} parameters")
    for name, stem, fn in STUDIES:
        if args.only and name not in args.only:
            continue
        for preset in mode.models:
            target = mode.out_dir / stem.format(preset)
            if target.exists() and not args.force:
                print(f"[{name} {preset}] output exists, skipped ({target.name})")
                continue
            t0 = time.perf_counter()
            with timed(f"{name} {preset}"):
                fn(preset, mode)
            timings[f"{name} {preset}"] = time.perf_counter() - t0
    total = time.perf_counter() - start
    write_json(mode.out_dir / "run.json", {"mode": mode.name, "wall_clock_s": total,
                                           "timings_s": timings})
    write_paper.write(mode)
    print(f"all done in {total / 60:.1f} min; results in {mode.out_dir}")


if __name__ == "__main__":
    main()

"""Reproduce every figure and table of the GS-Jacobi paper, then write the paper.

    python -m studies.reproduce              # fast mode: tiny settings, a few minutes
    python -m studies.reproduce --mode full  # the real reproduction, writes paper/

Models are trained (or loaded from ``.cache/studies``) first; then each study runs per
model and writes JSON and PNG files into the mode's output directory (``paper/results``
in full mode).  A study this checkout already finished is skipped (see ``Ledger``), so
an interrupted run resumes where it stopped; ``--force`` reruns everything (trained
models stay cached).  Without MNIST files only the embedded digits model runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from fixedpoint.data import MNIST_ENV, DatasetError, load_dataset
from fixedpoint.tarflow.train import PRESETS

from . import (
    batch_scaling,
    convergence,
    crm_igm,
    initial_guess,
    precision,
    samples,
    scaleout,
    speedup,
    trace,
    write_paper,
)
from .common import CACHE, MODES, Mode, atomic_write_bytes, key, timed, write_json
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
    ("scaleout", "scaleout-{}.json", scaleout.run_model),
    ("precision", "precision-{}.json", precision.run_model),
]


def _needs_mnist(preset: str) -> bool:
    return PRESETS[preset].train.dataset == "mnist"


def _mnist_available() -> str | None:
    """None if the MNIST files can be found, else the reason they cannot."""
    try:
        load_dataset("mnist")
    except (DatasetError, OSError) as exc:
        return str(exc)
    return None


class Ledger:
    """Which (study, model) pairs this checkout's runs finished, kept in the cache.

    A study is skipped only when the ledger records it for the same output directory and
    settings: committed results in a fresh clone are recomputed, an interrupted run here
    resumes after the last finished study.
    """

    def __init__(self, mode: Mode):
        self.path = CACHE / f"ledger-{key(str(mode.out_dir), mode.name, mode.epochs)}.json"
        self.done: set[str] = set()
        if self.path.exists():
            self.done = set(json.loads(self.path.read_text()))

    def finished(self, entry: str) -> bool:
        return entry in self.done

    def add(self, entry: str) -> None:
        self.done.add(entry)
        atomic_write_bytes(self.path, json.dumps(sorted(self.done)).encode())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=MODES, default="fast")
    parser.add_argument("--force", action="store_true", help="rerun studies already finished")
    names = [name for name, _, _ in STUDIES]
    # choices: an unknown name is refused (exit 2) instead of running nothing and still
    # rewriting the paper.
    parser.add_argument("--only", nargs="*", choices=names, metavar="STUDY",
                        help="run only these studies: " + ", ".join(names))
    parser.add_argument("--models", nargs="*", help="restrict to these training presets")
    parser.add_argument("--out", type=Path, help="output directory (default: the mode's)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads for training and timing (default: 1, the "
                             "paper's regime; recorded in run.json)")
    args = parser.parse_args(argv)
    mode = MODES[args.mode]
    torch.set_num_threads(max(1, args.threads))
    if args.models:
        unknown = set(args.models) - set(mode.models)
        if unknown:
            parser.error(f"unknown models {sorted(unknown)}; {mode.name} mode has {mode.models}")
        mode = dataclasses.replace(mode, models=tuple(args.models))
    elif any(_needs_mnist(p) for p in mode.models):
        reason = _mnist_available()
        if reason is not None:
            print(f"MNIST not found ({reason}); running the embedded digits model only. "
                  f"Set {MNIST_ENV} to a folder with the MNIST IDX files for the rest.")
            mode = dataclasses.replace(
                mode, models=tuple(p for p in mode.models if not _needs_mnist(p)))
    if args.out:
        mode = dataclasses.replace(mode, out_dir=args.out.resolve())
    mode.out_dir.mkdir(parents=True, exist_ok=True)
    ledger = Ledger(mode)
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
            entry = f"{name}/{preset}"
            if ledger.finished(entry) and (mode.out_dir / stem.format(preset)).exists() \
                    and not args.force:
                print(f"[{entry}] finished earlier, skipped (--force reruns it)")
                continue
            t0 = time.perf_counter()
            with timed(entry):
                fn(preset, mode)
            timings[entry] = time.perf_counter() - t0
            ledger.add(entry)
    total = time.perf_counter() - start
    write_json(mode.out_dir / "run.json", {"mode": mode.name, "wall_clock_s": total,
                                           "threads": torch.get_num_threads(),
                                           "models": list(mode.models), "timings_s": timings,
                                           "only": args.only or None, "force": args.force})
    write_paper.write(mode)
    print(f"all done in {total / 60:.1f} min; results in {mode.out_dir}")


if __name__ == "__main__":
    main()

"""What every study script shares: settings per mode, the cache, provenance, output files.

Every study writes its results as JSON (and figures as PNG) into one output directory,
each JSON file carrying the provenance of the run that produced it: command, seed, git
revision, library versions and hardware.  Expensive steps (trained models, sampled
references) are cached under ``.cache/studies`` keyed by their configuration, so a rerun
reuses them and an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fixedpoint.atomic import atomic_write_bytes

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "studies"


@dataclass(frozen=True)
class Mode:
    """Settings that differ between the fast smoke run and the full reproduction."""

    name: str
    models: tuple[str, ...]          # training presets, see fixedpoint.tarflow.train.PRESETS
    epochs: dict[str, float]          # epochs per preset (overrides the preset's default)
    eval_batch: int                  # samples per deviation measurement
    # Samples per quality row (FCD, class accuracy), per seed: the metric's own noise is
    # the difference between two seeds, and must be smaller than the differences judged.
    quality_samples: int
    batch_sizes: tuple[int, ...]     # for the speed-up vs batch size study
    repeats: int                     # wall-clock repeats (median)
    out_dir: Path


FAST = Mode(
    name="fast",
    models=("digits", "mnist-p4"),
    epochs={"digits": 4, "mnist-p4": 0.5, "mnist-p2": 0.5},
    eval_batch=16,
    quality_samples=32,
    batch_sizes=(1, 8),
    repeats=2,
    out_dir=ROOT / ".cache" / "fast-output",
)

FULL = Mode(
    name="full",
    models=("digits", "mnist-p4", "mnist-p2"),
    # Sized so that training all three fits the 90-minute budget on 2 CPU cores.
    epochs={"digits": 60, "mnist-p4": 8, "mnist-p2": 6},
    eval_batch=256,
    # About a second per 64 samples at T = 49 (twice that with guidance): 2,000 samples
    # keep the binomial noise of an accuracy near 50% at about 1 percentage point.
    quality_samples=2000,
    batch_sizes=(1, 8, 64, 256),
    repeats=3,
    out_dir=ROOT / "paper" / "results",
)

MODES = {"fast": FAST, "full": FULL}


# What the studies rewrite themselves (paper/results, paper/paper.md, paper/finc.md:
# everything under paper/ is generated): changes there do not make the checkout dirty.
RUN_OUTPUTS = ("paper",)


def git_revision(root: Path = ROOT, outputs: tuple[str, ...] = RUN_OUTPUTS) -> str:
    """``HEAD``'s short hash, ``-dirty`` if tracked files other than ``outputs`` changed.

    ``outputs`` are paths relative to ``root`` (the repository's top level).  Untracked
    files are ignored (a new result file is an output too).
    """
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                ".", *(f":(exclude){p}" for p in outputs)],
                               cwd=root, capture_output=True, text=True, timeout=10).stdout
        return (rev or "unknown") + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def hardware() -> dict[str, Any]:
    return {
        "machine": platform.machine(),
        "processor": platform.processor() or "unknown",
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def versions() -> dict[str, str]:
    import matplotlib
    import numpy
    import scipy

    import fixedpoint

    return {"fixedpoint": fixedpoint.__version__, "torch": torch.__version__,
            "numpy": numpy.__version__, "scipy": scipy.__version__,
            "matplotlib": matplotlib.__version__}


def provenance(seed: int | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "seed": seed,
        "git_revision": git_revision(),
        "versions": versions(),
        "hardware": hardware(),
        "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **extra,
    }


def write_json(path: Path, payload: dict[str, Any], seed: int | None = None) -> None:
    body = {"provenance": provenance(seed), **payload}
    atomic_write_bytes(path, (json.dumps(body, indent=2, default=_jsonable) + "\n").encode())


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "name") and hasattr(value, "value"):  # enums
        return value.name
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def save_figure(fig: Any, path: Path) -> None:
    """Save a matplotlib figure atomically with its provenance in the PNG metadata."""
    import io

    buf = io.BytesIO()
    meta = {"Software": f"fixedpoint studies, git {git_revision()}",
            "Comment": " ".join(sys.argv)}
    fig.savefig(buf, format="png", dpi=130, bbox_inches="tight", metadata=meta)
    atomic_write_bytes(path, buf.getvalue())


def key(*parts: Any) -> str:
    """A short stable hash of a configuration, for cache file names."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def cached(name: str, parts: tuple[Any, ...], compute: Callable[[], Any]) -> Any:
    """Load ``name`` from the cache if its configuration matches, else compute and store.

    Stored with torch.save so tensors round-trip; written atomically so an interrupted
    run leaves either the old entry or none.
    """
    path = CACHE / f"{name}-{key(*parts)}.pt"
    if path.exists():
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # a corrupt entry is recomputed, never trusted
            print(f"warning: cache entry {path} unreadable ({exc}); recomputing",
                  file=sys.stderr)
    value = compute()
    import io

    buf = io.BytesIO()
    torch.save(value, buf)
    atomic_write_bytes(path, buf.getvalue())
    return value


@contextmanager
def timed(label: str) -> Iterator[None]:
    start = time.perf_counter()
    print(f"[{label}] ...", flush=True)
    yield
    print(f"[{label}] done in {time.perf_counter() - start:.1f} s", flush=True)


def study_main(doc: str, run: Callable[[str, Mode], object], label: str,
               argv: list[str] | None = None) -> None:
    """The command line every study script shares: ``--mode``, then each model in turn."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--mode", choices=MODES, default="fast")
    args = parser.parse_args(argv)
    mode = MODES[args.mode]
    for preset in mode.models:
        with timed(f"{label} {preset}"):
            run(preset, mode)

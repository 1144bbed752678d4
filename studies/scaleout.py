"""Beyond the paper: sharded sampling on this 2-core CPU, one process against two.

Runs ``fixedpoint generate`` (the command a user runs) on the trained model three ways,
each in a fresh output directory so nothing is resumed:

* one plain ``python`` process with 1 torch thread (the reference),
* one plain process with 2 torch threads,
* ``torchrun --nproc_per_node=2`` (gloo), 1 thread per process.

with the studies' sampling settings (guidance 1, the final denoising step) and records,
per way and strategy, the sampling time of the slowest rank, the
wall-clock of the whole command (interpreter start, model load, process group, the
classifier, merging), whether the samples are bit-for-bit those of the reference, and
the Fréchet classifier distance.  Ways are run round-robin, median of the mode's repeats.

    python -m studies.scaleout --mode fast
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from fixedpoint.tarflow.generate import load_samples

from .common import CACHE, ROOT, Mode, key, read_json, study_main, write_json
from .lib import GUIDANCE, SEED, TOL, trained

WAYS = {
    "1 process x 1 thread": ([], 1),
    "1 process x 2 threads": ([], 2),
    "2 processes x 1 thread (torchrun, gloo)": (["torchrun"], 1),
}
REFERENCE = "1 process x 1 thread"


def _settings(preset: str, mode: Mode) -> tuple[int, int, dict[str, list[str]]]:
    """Sample count, shard size and strategies for this model and mode."""
    if mode.name == "fast":
        return 64, 16, {"sequential": ["--strategy", "sequential"]}
    strategies = {"sequential": ["--strategy", "sequential"]}
    if preset != "mnist-p2":  # Jacobi at batch 64 on T=196 costs minutes per run here
        strategies["jacobi"] = ["--strategy", "jacobi", "--atol", str(TOL)]
    return 512, 64, strategies


def _run(way: str, checkpoint: str, out: Path, n: int, shard: int,
         strategy: list[str]) -> dict[str, Any]:
    launcher, threads = WAYS[way]
    args = ["generate", "--checkpoint", checkpoint, "--num-samples", str(n),
            "--shard-size", str(shard), "--out-dir", str(out), "--guidance", str(GUIDANCE),
            "--seed", str(SEED), "--threads", str(threads), "--denoise", "--metrics", "--quiet",
            *strategy]
    if launcher:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", "-m", "fixedpoint", *args]
    else:
        cmd = [sys.executable, "-m", "fixedpoint", *args]
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    report = read_json(out / "report.json")
    report["command_seconds"] = wall
    return report


def run_model(preset: str, mode: Mode) -> dict[str, Any]:
    t = trained(preset, mode)
    n, shard, strategies = _settings(preset, mode)
    # One scratch folder per output directory: a fast run (the smoke test) and a full run
    # at the same time must not write each other's shards.
    base = CACHE / "scaleout" / key(str(mode.out_dir), mode.name) / preset
    # The smoke run only checks that the pipeline works: one round.
    repeats = 1 if mode.name == "fast" else mode.repeats
    results: dict[str, Any] = {}
    for name, strategy in strategies.items():
        runs: dict[str, list[dict[str, Any]]] = {w: [] for w in WAYS}
        for _ in range(repeats):
            for way in WAYS:  # round-robin, so drifting machine load hits every way
                runs[way].append(_run(way, t.checkpoint, base / f"{name}-{len(runs[way])}-"
                                      f"{way.split()[0]}p{WAYS[way][1]}t", n, shard, strategy))
        ref = load_samples(Path(runs[REFERENCE][-1]["out_dir"]) / "samples.pt")["images"]
        rows = []
        for way, reports in runs.items():
            last = reports[-1]
            images = load_samples(Path(last["out_dir"]) / "samples.pt")["images"]
            sampling = statistics.median(r["slowest_rank_seconds"] for r in reports)
            rows.append({
                "way": way,
                "sampling_s": sampling,
                "rank_seconds": last["rank_seconds"],
                "command_s": statistics.median(r["command_seconds"] for r in reports),
                "samples_per_s": n / sampling,
                "identical_to_reference": bool(torch.equal(images, ref)),
                "max_abs_diff": float((images - ref).abs().max()),
                "fcd": last["fcd"],
                "accuracy": last["accuracy"],
                "dependent_steps": last["dependent_steps"],
            })
        ref_time = next(r["sampling_s"] for r in rows if r["way"] == REFERENCE)
        for r in rows:
            r["speedup"] = ref_time / r["sampling_s"]
        results[name] = rows
    out = {"preset": preset, "num_samples": n, "shard_size": shard, "guidance": GUIDANCE,
           "denoise": True,
           "repeats": repeats, "device": "cpu", "dtype": "float32",
           "strategies": results}
    write_json(mode.out_dir / f"scaleout-{preset}.json", out)
    return out


if __name__ == "__main__":
    study_main(__doc__, run_model, "scaleout")

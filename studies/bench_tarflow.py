"""Benchmark: the sequential TarFlow samplers (fast, lean, naive); Jacobi pass vs step.

Three samplers give the same images (the sequential solution; 'max abs diff' in the
table is their distance from the naive one):

* **fast**: :class:`~fixedpoint.tarflow.SequentialDecoder` (``sample_sequential``):
  inference mode, prepared weights and functional calls, preallocated key/value caches
  written in place, classifier-free guidance as one batched call with one input
  projection and one ``lerp``; no solver bookkeeping.  The sequential baseline.
* **fixed**: the same decoder with fixed shapes at every step (what ``torch.compile`` /
  CUDA graphs need), in eager mode: what the compile-ready form costs without a compiler.
* **lean**: ``reverse(model, z, y)`` with the default sequential strategy through
  ``fp.solve`` (preallocated KV cache, CFG batched, per-block results and costs).
* **naive**: :func:`~fixedpoint.tarflow.sample_sequential_naive`, the oracle: one
  network call per position for the conditional and one for the unconditional pass,
  caches grown by concatenation, as the reference implementations do.

Target: fast >= 2x faster than naive at batch 1 and 64.  Also the cost of one Jacobi
iteration (one full pass of the map, CFG batched) relative to one sequential step (one
token through the cached map) on block 0, and the same ratio through ``fp.solve``.

Models: architectures of the training presets (``--models``, random weights: timing
does not need trained ones; the out-projections are small random non-zero so the map is
not the identity) and trained checkpoints (``--checkpoint``, repeatable).

Run:  .venv/bin/python studies/bench_tarflow.py --threads 1 --repeats 5 --batch-sizes 1,64
      .venv/bin/python studies/bench_tarflow.py --models mnist-p2 --batch-sizes 1,64 \\
          --checkpoint .cache/studies/models/digits-<key>/checkpoint.pt

Timing: medians of interleaved repeats (``fixedpoint.benchmark.interleaved_medians``); with
one thread on the CPU seconds of this process (a shared machine's waiting time left out,
as in ``studies.lib.timing_clock``), else wall-clock.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from functools import partial
from pathlib import Path

import torch

import fixedpoint as fp
from fixedpoint.atomic import atomic_write_bytes
from fixedpoint.benchmark import interleaved_medians, markdown_table
from fixedpoint.quality import deviation
from fixedpoint.tarflow import (
    BlockInverse,
    SequentialDecoder,
    TarFlow,
    reverse,
    sample_sequential_naive,
)
from fixedpoint.tarflow.checkpoint import load_model
from fixedpoint.tarflow.train import PRESETS

TARGET_SPEEDUP = {1: 2.0, 64: 2.0}
TARGET_RATIO = 3.0


def random_model(preset: str, seed: int) -> TarFlow:
    """The preset's architecture with random weights and small non-zero out-projections."""
    g = torch.Generator().manual_seed(seed)
    model = TarFlow(PRESETS[preset].model).reset_parameters(g).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.proj_out.weight.normal_(0, 0.02, generator=g)
            block.proj_out.bias.normal_(0, 0.02, generator=g)
    return model


def sequential_steps(fmap: BlockInverse, z: torch.Tensor) -> torch.Tensor:
    """Forward substitution by hand: one ``advance`` per position, no solver bookkeeping."""
    x = z.clone()
    state = fmap.init_state(x)
    for t in range(z.shape[1]):
        x[:, t : t + 1] = fmap.advance(state, x, t, t + 1)
    return x


def measure(name: str, model: TarFlow, batch: int, guidance: float, repeats: int,
            seed: int, clock) -> dict:
    """One row: the samplers' median seconds, speed-ups and deviations."""
    c = model.config
    gen = torch.Generator().manual_seed(seed + batch)
    z = torch.randn(batch, c.seq_len, c.token_dim, generator=gen)
    y = torch.randint(0, c.num_classes, (batch,), generator=gen) if c.num_classes else None
    fast, fixed = SequentialDecoder(model), SequentialDecoder(model, fixed_shape=True)
    naive_x = sample_sequential_naive(model, z, y, guidance)
    diffs = {
        "fast": deviation(fast(z, y, guidance=guidance), naive_x)["max_abs"],
        "fixed": deviation(fixed(z, y, guidance=guidance), naive_x)["max_abs"],
        "lean": deviation(reverse(model, z, y, guidance=guidance).images,
                                     naive_x)["max_abs"],
    }
    fmap = BlockInverse(model, 0, z, y, guidance=guidance)
    t = interleaved_medians(
        {
            "fast": partial(fast, z, y, guidance=guidance),
            "fixed": partial(fixed, z, y, guidance=guidance),
            "lean": partial(reverse, model, z, y, guidance=guidance),
            "naive": partial(sample_sequential_naive, model, z, y, guidance),
            "pass": partial(fmap, z),
            "steps": partial(sequential_steps, fmap, z),
            "solve_seq": partial(fp.solve, fmap, z, fp.Sequential()),
            "solve_jac1": partial(fp.solve, fmap, z, fp.Jacobi(max_iter=1)),
        },
        repeats,
        clock=clock,
    )
    T = c.seq_len
    step = t["steps"] / (T - 1)  # T - 1 network calls (position 0 needs none)
    return {
        "model": name, "T": T, "batch": batch, "seconds": t,
        "speedup_fast": t["naive"] / t["fast"], "speedup_fixed": t["naive"] / t["fixed"],
        "speedup_lean": t["naive"] / t["lean"], "max_abs_diff_to_naive": diffs,
        "pass_over_step": t["pass"] / step,
        "pass_over_step_via_solve": t["solve_jac1"] / (t["solve_seq"] / (T - 1)),
    }


def _cells(r: dict) -> list[str]:
    t, B = r["seconds"], r["batch"]
    target = TARGET_SPEEDUP.get(B)
    mark = "-" if target is None else (
        f">= {target:g}x {'ok' if r['speedup_fast'] >= target else 'MISSED'}")
    rmark = ""
    if B == 1:
        rmark = f" ({'ok' if r['pass_over_step'] < TARGET_RATIO else 'MISSED'} < {TARGET_RATIO:g})"
    d = r["max_abs_diff_to_naive"]
    return [r["model"], str(r["T"]), str(B), f"{t['fast'] * 1e3:.0f}", f"{t['fixed'] * 1e3:.0f}",
            f"{t['lean'] * 1e3:.0f}", f"{t['naive'] * 1e3:.0f}", f"{r['speedup_fast']:.2f}x",
            mark, f"{r['speedup_fixed']:.2f}x", f"{r['speedup_lean']:.2f}x",
            f"{max(d.values()):.1e}", f"{r['pass_over_step']:.2f}{rmark}",
            f"{r['pass_over_step_via_solve']:.2f}"]


HEAD = ["model", "T", "batch", "fast (ms)", "fixed-shape (ms)", "lean (ms)", "naive (ms)",
        "fast speed-up", "target", "fixed-shape speed-up", "lean speed-up", "max abs diff",
        "Jacobi pass / step", "via fp.solve"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (median)")
    parser.add_argument("--batch-sizes", default="1,64", help="comma-separated, e.g. 1,64")
    parser.add_argument("--models", default="mnist-p4",
                        help="comma-separated training presets, timed with random weights "
                             f"({', '.join(PRESETS)}); '' for none")
    parser.add_argument("--checkpoint", action="append", default=[],
                        help="a trained checkpoint to time as well (repeatable)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--guidance", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    if args.repeats < 1 or args.threads < 1:
        parser.error("--repeats and --threads must be >= 1")
    try:
        batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    except ValueError:
        parser.error(f"--batch-sizes must be comma-separated integers, got {args.batch_sizes!r}")
    if not batch_sizes or min(batch_sizes) < 1:
        parser.error("--batch-sizes must list positive integers")
    presets = [m for m in args.models.split(",") if m.strip()]
    unknown = [m for m in presets if m not in PRESETS]
    if unknown:
        parser.error(f"unknown preset(s) {', '.join(unknown)}; choose from {', '.join(PRESETS)}")
    for path in args.checkpoint:
        if not Path(path).is_file():
            parser.error(f"no checkpoint at {path}")
    torch.set_num_threads(args.threads)
    clock, clock_name = ((time.process_time, "CPU time of the process")
                         if args.threads == 1 else (time.perf_counter, "wall-clock"))

    models = [(f"{p} (random weights)", random_model(p, args.seed)) for p in presets]
    models += [(f"{Path(c).parent.name} (trained)", load_model(c).eval()) for c in args.checkpoint]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"device: cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} "
        f"cores, load average {load:.1f}), dtype: float32, threads: "
        f"{torch.get_num_threads()}, torch {torch.__version__}; clock: {clock_name}; "
        f"CFG g={args.guidance}; {args.repeats} repeats (median)"
    )
    for name, model in models:
        c = model.config
        print(f"{name}: {c.image_size}x{c.image_size}x{c.channels}, patch {c.patch_size} "
              f"(T={c.seq_len}, d={c.token_dim}), width {c.width}, {c.blocks} blocks x "
              f"{c.layers} layers, {c.heads} heads")
    rows = [measure(name, model, B, args.guidance, args.repeats, args.seed, clock)
            for name, model in models for B in batch_sizes]
    print()
    print(markdown_table(HEAD, [_cells(r) for r in rows]))
    print(
        "\nspeed-up = naive / sampler, on the same samples ('max abs diff': the largest of"
        " the fast, fixed-shape and lean samplers' distances from the naive images).  Jacobi"
        " pass / step = one Jacobi pass (the map on all tokens, CFG batched) / one sequential"
        " step (the map on one new token from the KV cache), both on block 0 without solver"
        " bookkeeping; 'via fp.solve' = Jacobi(max_iter=1) solve / (Sequential solve /"
        " (T - 1)), fixed per-solve costs included."
    )
    if args.json is not None:
        payload = {"regime": {"device": "cpu", "dtype": "float32",
                              "threads": torch.get_num_threads(), "clock": clock_name,
                              "load_average": load, "guidance": args.guidance,
                              "repeats": args.repeats, "torch": torch.__version__},
                   "rows": rows}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(args.json, (json.dumps(payload, indent=2) + "\n").encode())
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

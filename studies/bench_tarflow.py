"""Benchmark: lean sequential TarFlow sampler vs a naive loop; Jacobi pass vs step.

A random-weight MNIST-sized TarFlow (28x28x1, patch 4 -> T = 49 tokens of 16 dims,
width 128, 4 blocks x 4 layers; out-projections small random non-zero so the map is not
the identity), classifier-free guidance on (g = 1.0).  Reports, per batch size:

* wall-clock of the lean sequential sampler (``model.reverse`` with the default
  sequential strategy: preallocated KV cache, CFG batched into one call per step) and of
  :func:`sample_sequential_naive` (cache re-concatenated every step, CFG passes run
  separately), medians over interleaved repeats of the same run, and the speed-up.
  Targets: >= 1.5x at batch 1, >= 2x at batch 64;
* the cost of one Jacobi iteration (one full pass of the map, CFG batched) relative to
  one sequential step (one token through the cached map), on block 0; also the same
  ratio measured through ``fp.solve``.  Target at batch 1: < 3.

Run:  .venv/bin/python studies/bench_tarflow.py --repeats 5 --batch-sizes 1,64

On a shared machine, compare with the load average printed in the header: when other
processes keep the cores busy, use ``--threads 1`` (intra-op threads that wait for a busy
core make every small operation slow, which hides what is being measured).
"""

from __future__ import annotations

import argparse
import os
import platform
from functools import partial

import torch

import fixedpoint as fp
from fixedpoint.benchmark import interleaved_medians, markdown_table
from fixedpoint.tarflow import (
    BlockInverse,
    TarFlow,
    TarFlowConfig,
    reverse,
    sample_sequential_naive,
)

CONFIG = TarFlowConfig(
    image_size=28, channels=1, patch_size=4, width=128, blocks=4, layers=4, head_dim=64,
    num_classes=10,
)
TARGET_SPEEDUP = {1: 1.5, 64: 2.0}
TARGET_RATIO = 3.0


def build_model(seed: int) -> TarFlow:
    torch.manual_seed(seed)
    model = TarFlow(CONFIG).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.proj_out.weight.normal_(0, 0.02)
            block.proj_out.bias.normal_(0, 0.02)
    return model


def sequential_steps(fmap: BlockInverse, z: torch.Tensor) -> torch.Tensor:
    """Forward substitution by hand: one ``advance`` per position, no solver bookkeeping."""
    x = z.clone()
    state = fmap.init_state(x)
    for t in range(z.shape[1]):
        x[:, t : t + 1] = fmap.advance(state, x, t, t + 1)
    return x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (median)")
    parser.add_argument("--batch-sizes", default="1,64", help="comma-separated, e.g. 1,64")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--guidance", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    try:
        batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    except ValueError:
        parser.error(f"--batch-sizes must be comma-separated integers, got {args.batch_sizes!r}")
    if not batch_sizes or min(batch_sizes) < 1:
        parser.error("--batch-sizes must list positive integers")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    model = build_model(args.seed)
    T = CONFIG.seq_len
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"device: cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} "
        f"cores, load average {load:.1f}), dtype: float32, threads: "
        f"{torch.get_num_threads()}, torch {torch.__version__}"
    )
    print(
        f"model: {CONFIG.image_size}x{CONFIG.image_size}x{CONFIG.channels}, patch "
        f"{CONFIG.patch_size} (T={T}, d={CONFIG.token_dim}), width {CONFIG.width}, "
        f"{CONFIG.blocks} blocks x {CONFIG.layers} layers, {CONFIG.heads} heads; "
        f"CFG g={args.guidance}; {args.repeats} repeats (median)\n"
    )
    rows = []
    gen = torch.Generator().manual_seed(args.seed + 1)
    for B in batch_sizes:
        z = torch.randn(B, T, CONFIG.token_dim, generator=gen)
        y = torch.randint(0, CONFIG.num_classes, (B,), generator=gen)
        lean_x = reverse(model, z, y, guidance=args.guidance).x
        naive_x = sample_sequential_naive(model, z, y, args.guidance)
        diff = float((lean_x - naive_x).abs().max())

        fmap = BlockInverse(model, 0, z, y, guidance=args.guidance)
        t = interleaved_medians(
            {
                "lean": partial(model.reverse, z, y, guidance=args.guidance),
                "naive": partial(sample_sequential_naive, model, z, y, args.guidance),
                "pass": partial(fmap, z),
                "steps": partial(sequential_steps, fmap, z),
                "solve_seq": partial(fp.solve, fmap, z, fp.Sequential()),
                "solve_jac1": partial(fp.solve, fmap, z, fp.Jacobi(max_iter=1)),
            },
            args.repeats,
        )
        step = t["steps"] / (T - 1)  # T - 1 network calls (position 0 needs none)
        solve_ratio = t["solve_jac1"] / (t["solve_seq"] / (T - 1))  # T - 1 solver steps
        rows.append((B, t["lean"], t["naive"], t["pass"], step, solve_ratio, diff))

    head = ["batch", "lean sequential (ms)", "naive loop (ms)", "speed-up", "target",
            "1 Jacobi pass (ms)", "1 sequential step (ms)", "ratio", "ratio via fp.solve",
            "max abs diff"]
    cells = []
    for B, lean, naive, jac, step, solve_ratio, diff in rows:
        target = TARGET_SPEEDUP.get(B)
        speed = naive / lean
        mark = "-" if target is None else f">= {target:g}x {'ok' if speed >= target else 'MISSED'}"
        ratio = jac / step
        rmark = ""
        if B == 1:
            rmark = f" ({'ok' if ratio < TARGET_RATIO else 'MISSED'} < {TARGET_RATIO:g})"
        cells.append([B, f"{lean * 1e3:.1f}", f"{naive * 1e3:.1f}", f"{speed:.2f}x", mark,
                      f"{jac * 1e3:.2f}", f"{step * 1e3:.3f}", f"{ratio:.2f}{rmark}",
                      f"{solve_ratio:.2f}", f"{diff:.1e}"])
    print(markdown_table(head, cells))
    print(
        "\nspeed-up = naive / lean, the same samples ('max abs diff' between them).  ratio ="
        " one Jacobi pass (the map on all tokens, CFG batched) / one sequential step (the"
        " map on one new token from the KV cache), both on block 0 without solver"
        " bookkeeping; 'via fp.solve' = Jacobi(max_iter=1) solve / (Sequential solve / (T - 1)),"
        " fixed per-solve costs included."
    )

if __name__ == "__main__":
    main()

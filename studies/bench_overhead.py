"""Solver bookkeeping per iteration: solve time minus the time spent inside the map.

    python studies/bench_overhead.py                         # this checkout
    python studies/bench_overhead.py --against /path/to/old  # and an older checkout, interleaved

The map is wrapped by a timer, so what remains of the solve's wall-clock is the driver's
and the method's own work (masks, copies, the stopping test, synchronisation).  Two maps:
a trivial shift map ``F(x)_t = x_{t-1} + 1`` (plain callable, ``B = 1, T = 64, d = 8``:
Jacobi needs exactly ``T`` iterations from zeros), and the digits TarFlow's block
inverse (batch 1, guidance 1, one thread), where the timer wraps each block's network
call.  With ``--against`` each measurement alternates between the two checkouts, each in
its own subprocess, so both see the same machine load; the table gives medians.
Methods ask for exact termination (``atol = rtol = 0``), so both versions run the same
iterations.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _exact(fp, cls, **kw):
    """The method asking for exact termination, in the old (``tol``) or new API."""
    try:
        return cls(atol=0.0, rtol=0.0, **kw)
    except TypeError:
        return cls(tol=0.0, **kw)


class Timed:
    """Wraps a callable; ``inside`` accumulates the seconds spent in it."""

    def __init__(self, fn):
        self.fn = fn
        self.inside = 0.0

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        out = self.fn(*args, **kwargs)
        self.inside += time.perf_counter() - start
        return out


def measure(checkpoint: str | None, repeats: int) -> dict:
    """Runs in the checkout on ``sys.path``: per-iteration overhead in ms per case."""
    import torch

    import fixedpoint as fp

    torch.set_num_threads(1)
    out = {}

    def shift(x):
        return torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1] + 1.0], dim=1)

    x0 = torch.zeros(1, 64, 8)
    methods = {"Sequential": fp.Sequential(), "Jacobi": _exact(fp, fp.Jacobi),
               "GSJacobi(4)": _exact(fp, fp.GSJacobi, modules=4)}
    for name, method in methods.items():
        samples = []
        for _ in range(repeats):
            timed = Timed(shift)
            start = time.perf_counter()
            res = fp.solve(timed, x0, method)
            total = time.perf_counter() - start
            samples.append((total - timed.inside) / res.iterations * 1e3)
        out[f"shift map, {name}"] = statistics.median(samples)
    if checkpoint:
        from fixedpoint.tarflow.checkpoint import load_model

        try:
            from fixedpoint.tarflow import reverse
        except ImportError:  # older layout
            from fixedpoint.tarflow.sampling import reverse
        from fixedpoint.tarflow import Strategy

        model = load_model(checkpoint)
        c = model.config
        z = torch.randn(1, c.seq_len, c.token_dim, generator=torch.Generator().manual_seed(0))
        y = torch.tensor([3])
        for name, method in (("Sequential", fp.Sequential()), ("Jacobi", _exact(fp, fp.Jacobi))):
            strategy = Strategy.uniform(method, c.blocks)
            samples, net_ms = [], []
            for _ in range(repeats):
                timers = []
                for block in model.blocks:
                    t = Timed(block.network)
                    block.network = t  # instance attribute shadows the method
                    timers.append(t)
                try:
                    with torch.no_grad():
                        start = time.perf_counter()
                        s = reverse(model, z, y, strategy=strategy, guidance=1.0)
                        total = time.perf_counter() - start
                finally:
                    for block in model.blocks:
                        del block.network
                iters = sum(r.iterations for r in s.blocks)
                inside = sum(t.inside for t in timers)
                samples.append((total - inside) / iters * 1e3)
                net_ms.append(inside / iters * 1e3)
            out[f"digits TarFlow, {name}"] = statistics.median(samples)
            out[f"digits TarFlow, {name} (network per iteration)"] = statistics.median(net_ms)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--against", type=Path, help="an older checkout to compare with")
    p.add_argument("--checkpoint", default=".cache/runs/digits/checkpoint.pt",
                   help="digits TarFlow checkpoint ('' to skip the TarFlow rows)")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", type=Path, help="write the medians here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    found = bool(args.checkpoint) and Path(args.checkpoint).exists()
    ckpt = str(Path(args.checkpoint).resolve()) if found else None
    if args.worker:
        print(json.dumps(measure(ckpt, args.repeats)))
        return 0
    trees = {"this checkout": ROOT}
    if args.against:
        trees = {"before": args.against.resolve(), **{"after": ROOT}}
    rows: dict[str, dict[str, list[float]]] = {}
    for _ in range(args.rounds):
        for label, tree in trees.items():
            env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker",
                   "--repeats", str(args.repeats), "--checkpoint", ckpt or ""]
            res = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True)
            if res.returncode:
                raise SystemExit(f"{label} failed:\n{res.stderr}")
            for case, ms in json.loads(res.stdout.strip().splitlines()[-1]).items():
                rows.setdefault(case, {}).setdefault(label, []).append(ms)
    labels = list(trees)
    print(f"CPU, 1 thread, batch 1, medians of {args.rounds} rounds x {args.repeats} solves; "
          "ms per iteration outside the map")
    print("| case | " + " | ".join(labels) + " |")
    print("| --- |" + " --- |" * len(labels))
    table = {}
    for case, per in rows.items():
        meds = {k: statistics.median(v) for k, v in per.items()}
        table[case] = meds
        print(f"| {case} | " + " | ".join(f"{meds[k]:.4f}" for k in labels) + " |")
    if args.json:
        args.json.write_text(json.dumps(table, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

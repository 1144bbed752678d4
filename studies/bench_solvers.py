"""Benchmark: every solver on the synthetic systems at several sizes and toughness levels.

Prints, per system, iterations, dependent steps, token evaluations, wall-clock (median
of repeats in this run) and max error against forward substitution, with
``scipy.optimize.anderson`` on the same problem as an outside reference.

    python studies/bench_solvers.py            # the table in the closing note
    python studies/bench_solvers.py --quick    # a smaller, faster sweep
"""

from __future__ import annotations

import argparse
import platform

import torch

import fixedpoint as fp
from fixedpoint.benchmark import compare, markdown, scipy_anderson_row
from fixedpoint.testing.systems import AffineAutoregressive, AttentionAutoregressive, MarkovSystem


def methods(length: int) -> list[fp.Method]:
    tol = 1e-8
    return [
        fp.Sequential(),
        fp.Jacobi(atol=tol),
        fp.GSJacobi(modules=4, atol=tol),
        fp.GSJacobi(modules=max(1, length // 8), atol=tol),
        fp.Anderson(memory=5, atol=tol, max_iter=4 * length),
        fp.TriangularAnderson(memory=3, atol=tol),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    lengths = (32,) if args.quick else (32, 128)
    toughness = (0.5, 2.0) if args.quick else (0.5, 1.0, 2.0)
    repeats = 2 if args.quick else args.repeats
    print(f"device cpu ({platform.processor() or platform.machine()}), float64, batch "
          f"{args.batch}, d 4, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"tolerance 1e-8; wall-clock = median of {repeats} runs in this process")
    for length in lengths:
        cases = {f"affine MLP, toughness {k}": AffineAutoregressive.random(
            args.batch, length, 4, toughness=k) for k in toughness}
        cases["Markov, toughness 1.0"] = MarkovSystem.random(args.batch, length, 4)
        cases["attention (incremental map)"] = AttentionAutoregressive.random(
            args.batch, length, 4)
        for name, system in cases.items():
            x0 = system.noise_guess()
            solution = system.solution()
            rows = compare(system, x0, methods(length), solution, repeats)
            rows.append(scipy_anderson_row(system, x0, solution, f_tol=1e-8, repeats=1))
            print(f"\n### T = {length}: {name}\n")
            print(markdown(rows), flush=True)


if __name__ == "__main__":
    main()

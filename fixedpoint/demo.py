"""A short demonstration: every method on a few synthetic triangular systems.

Run with ``python -m fixedpoint demo``.  For the full benchmark over sizes and
toughness levels (and scipy's Anderson as an outside reference) see
``studies/bench_solvers.py``.
"""

from __future__ import annotations

import argparse

import torch

from . import methods as m
from .benchmark import compare, markdown, scipy_anderson_row
from .systems import AffineAutoregressive, AttentionAutoregressive


def demo_methods(length: int) -> list[m.Method]:
    return [
        m.Sequential(),
        m.Jacobi(atol=1e-8),
        m.GSJacobi(modules=4, atol=1e-8),
        m.GSJacobi(modules=7, atol=1e-8),  # rarely divides T: uneven modules are fine
        m.Anderson(memory=5, atol=1e-8, max_iter=4 * length),
        m.TriangularAnderson(memory=3, atol=1e-8),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fixedpoint demo", description=__doc__)
    parser.add_argument("--length", type=int, default=64, help="sequence length T")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    systems = {
        "affine MLP, mild (toughness 0.5)": AffineAutoregressive.random(
            args.batch, args.length, 4, toughness=0.5),
        "affine MLP, tough (toughness 2)": AffineAutoregressive.random(
            args.batch, args.length, 4, toughness=2.0),
        "attention (mini TarFlow block, incremental)": AttentionAutoregressive.random(
            args.batch, args.length, 4),
    }
    print(f"device cpu, float64, batch {args.batch}, T {args.length}, d 4, "
          f"{torch.get_num_threads()} threads; wall-clock is the median of {args.repeats}")
    for name, system in systems.items():
        x0 = system.noise_guess()
        solution = system.solution()
        rows = compare(system, x0, demo_methods(args.length), solution, args.repeats)
        rows.append(scipy_anderson_row(system, x0, solution, f_tol=1e-8, repeats=1))
        print(f"\n### {name}\n")
        print(markdown(rows))


if __name__ == "__main__":
    main()

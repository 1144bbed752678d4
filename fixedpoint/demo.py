"""A short demonstration: every method on a few synthetic triangular systems.

Run with ``fixedpoint demo`` (options: ``--length``, ``--batch``, ``--repeats``,
``--threads``). For the full benchmark over sizes and toughness levels (and scipy's
Anderson as an outside reference) see ``studies/bench_solvers.py``.
"""

from __future__ import annotations

import torch

from . import methods as m
from .benchmark import compare, markdown, scipy_anderson_row
from .testing.systems import AffineAutoregressive, AttentionAutoregressive

DIM = 4  # state dimension per position of the demo systems


def demo_methods(length: int) -> list[m.Method]:
    """The methods compared; module counts are capped by the sequence length."""
    methods = [
        m.Sequential(),
        m.Jacobi(atol=1e-8),
        m.GSJacobi(modules=min(4, length), atol=1e-8),
        # 7 rarely divides T: uneven modules are fine.
        m.GSJacobi(modules=min(7, length), atol=1e-8),
        m.Anderson(memory=5, atol=1e-8, max_iter=4 * length),
        m.TriangularAnderson(memory=3, atol=1e-8),
    ]
    return list(dict.fromkeys(methods))  # short sequences cap both GS-Jacobi rows alike


def run(length: int = 64, batch: int = 4, repeats: int = 3) -> None:
    """Print one comparison table per system (seeded: the same numbers every run, up
    to wall-clock)."""
    for name, value in (("length", length), ("batch", batch), ("repeats", repeats)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    systems = {
        "affine MLP, mild (toughness 0.5)": AffineAutoregressive.random(
            batch, length, DIM, toughness=0.5),
        "affine MLP, tough (toughness 2)": AffineAutoregressive.random(
            batch, length, DIM, toughness=2.0),
        "attention (mini TarFlow block, incremental)": AttentionAutoregressive.random(
            batch, length, DIM),
    }
    print(f"device cpu, float64, batch {batch}, T {length}, d {DIM}, "
          f"{torch.get_num_threads()} threads; wall-clock is the median of {repeats}")
    for name, system in systems.items():
        x0 = system.noise_guess()
        solution = system.solution()
        rows = compare(system, x0, demo_methods(length), solution, repeats)
        rows.append(scipy_anderson_row(system, x0, solution, f_tol=1e-8, repeats=1))
        print(f"\n### {name}\n")
        print(markdown(rows))

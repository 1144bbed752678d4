"""Regression tests for solver bugs found while writing the notebooks."""

import torch

import fixedpoint as fp
from fixedpoint import testing as fpt
from fixedpoint.testing import systems


def shift_with_one(x: torch.Tensor) -> torch.Tensor:
    """x_0 = 1, x_t = x_{t-1}: the solution is all ones.

    From a zero start every position after the first already satisfies its update after
    one Jacobi step, though it was computed from a position that just moved: freezing
    it would return [1, 0, 0, ...] as converged.
    """
    out = torch.roll(x, 1, 1).clone()
    out[:, 0] = 1.0
    return out


def test_positions_behind_a_moving_input_do_not_freeze():
    x0 = torch.zeros(2, 7, 3, dtype=torch.float64)
    for method in (fp.Jacobi(), fp.Jacobi(atol=1e-3), fp.GSJacobi(modules=3),
                   fp.TriangularAnderson()):
        result = fp.solve(shift_with_one, x0, method)
        assert result.success
        assert torch.equal(result.x, torch.ones_like(x0)), method


def test_accelerated_methods_survive_singular_least_squares_in_float32():
    s = systems.AffineAutoregressive.random(4, 32, 4, toughness=1.0, seed=1,
                                            dtype=torch.float32)
    exact = s.solution()
    taa = fp.solve(s, s.empty(), fp.TriangularAnderson())
    assert taa.success
    assert float((taa.x - exact).abs().max()) < 1e-5
    aa = fp.solve(s, s.empty(), fp.Anderson(atol=1e-5, ridge=0.0))
    # ridge=0 makes the least squares singular once the history repeats; the solve must
    # still converge (measured: 16 of its 32 allowed iterations), to the float32
    # agreement tolerance of fixedpoint.testing.
    assert aa.status is fp.Status.SUCCESS, aa.summary()
    assert aa.iterations < s.length
    fpt.assert_close(aa.x, exact, what="Anderson(ridge=0)")


def test_a_known_first_position_saves_one_jacobi_iteration():
    """Finite termination: T - 1 iterations when x0 is already exact at position 0."""
    x0 = torch.zeros(1, 6, 2, dtype=torch.float64)
    assert fp.solve(shift_with_one, x0, fp.Jacobi()).iterations == 6
    x0[:, 0] = 1.0
    result = fp.solve(shift_with_one, x0, fp.Jacobi())
    assert result.iterations == 5
    assert torch.equal(result.x, torch.ones_like(x0))

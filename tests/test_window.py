"""SlidingWindow: ParaDiGMS's windowed Jacobi on the synthetic systems."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fixedpoint as fp
from fixedpoint import SlidingWindow
from fixedpoint import testing as fpt

EXACT = dict(atol=0.0, rtol=0.0)


@given(fpt.systems(max_length=40), st.integers(1, 48), st.data())
def test_every_width_reaches_the_sequential_solution(system, width, data):
    x0 = data.draw(fpt.initial_guesses(system))
    res = fpt.assert_matches_sequential(system, x0, SlidingWindow(width, **EXACT))
    assert res.iterations <= system.length
    assert res.dependent_steps <= res.iterations


@given(fpt.systems(max_length=40), st.data())
def test_width_one_is_forward_substitution(system, data):
    x0 = data.draw(fpt.initial_guesses(system))
    seq = fp.solve(system, x0, fp.Sequential())
    win = fp.solve(system, x0, SlidingWindow(1, **EXACT))
    fpt.assert_close(win.x, seq.x)
    assert win.iterations == system.length  # one position per step, each final at once


@given(fpt.systems(max_length=40), st.integers(0, 8), st.data())
def test_width_at_least_T_is_jacobi(system, extra, data):
    x0 = data.draw(fpt.initial_guesses(system))
    jac = fp.solve(system, x0, fp.Jacobi(**EXACT))
    win = fp.solve(system, x0, SlidingWindow(system.length + extra, **EXACT))
    assert torch.equal(win.x, jac.x)
    assert win.iterations == jac.iterations
    assert win.dependent_steps == jac.dependent_steps
    assert win.token_evals == jac.token_evals


def test_cost_per_window_on_an_incremental_map():
    system = fpt.RANDOM_SYSTEMS["attention"](1, 48, 4, seed=3)
    x0 = torch.zeros(1, 48, 4, dtype=system.dtype)
    for width in (1, 4, 12, 48):
        res = fp.solve(system, x0, SlidingWindow(width, **EXACT))
        # each iteration is one dependent call reading at most `width` new positions
        assert res.dependent_steps <= res.iterations
        assert res.token_evals <= res.iterations * width
    seq = fp.solve(system, x0, fp.Sequential())
    one = fp.solve(system, x0, SlidingWindow(1, **EXACT))
    assert one.token_evals == seq.token_evals and one.dependent_steps == seq.dependent_steps


def test_smaller_windows_trade_iterations_for_work():
    system = fpt.RANDOM_SYSTEMS["affine"](1, 64, 3, toughness=0.3, seed=1)
    x0 = torch.zeros(1, 64, 3, dtype=system.dtype)
    its = {w: fp.solve(system, x0, SlidingWindow(w, atol=1e-10, rtol=0.0)) for w in (2, 8, 64)}
    assert its[2].iterations >= its[8].iterations >= its[64].iterations


def test_rms_rule_with_per_position_tolerances():
    system = fpt.RANDOM_SYSTEMS["linear"](1, 32, 6, seed=2)
    x0 = torch.zeros(1, 32, 6, dtype=system.dtype)
    exact = fp.solve(system, x0, fp.Sequential()).x
    atol = torch.logspace(-10, -6, 32, dtype=torch.float64)
    for rms in (False, True):
        res = fp.solve(system, x0, SlidingWindow(8, atol=atol, rtol=0.0, rms=rms))
        assert res.status is fp.Status.SUCCESS
        assert float((res.x - exact).abs().max()) <= 1e-3
    loose = fp.solve(system, x0, SlidingWindow(8, atol=atol, rtol=0.0, rms=True))
    strict = fp.solve(system, x0, SlidingWindow(8, atol=atol, rtol=0.0))
    assert loose.iterations <= strict.iterations  # RMS <= max: never stricter


def test_nonfinite_sample_is_stopped():
    system = fpt.RANDOM_SYSTEMS["affine"](2, 16, 2, seed=0)

    def poisoned(x):
        y = system(x).clone()
        y[1, 5] = float("nan")  # depends on no input: still strictly causal
        return y

    x0 = torch.zeros(2, 16, 2, dtype=system.dtype)
    res = fp.solve(poisoned, x0, SlidingWindow(4, **EXACT))
    assert res.sample_status[1] is fp.Status.NONFINITE
    assert res.sample_status[0] is fp.Status.SUCCESS
    assert bool(torch.isfinite(res.x).all())


@pytest.mark.parametrize("bad", [0, -2, 1.5, True])
def test_bad_width(bad):
    with pytest.raises(ValueError, match="width"):
        SlidingWindow(bad)


# ---- triangular Anderson on a sliding window (ParaTAA's pairing) ----------------------


@given(fpt.systems(max_length=40), st.integers(1, 48), st.integers(1, 4), st.data())
def test_windowed_triangular_anderson_reaches_the_sequential_solution(
    system, width, memory, data
):
    x0 = data.draw(fpt.initial_guesses(system))
    method = fp.TriangularAnderson(memory=memory, ridge=1e-6, window_width=width, **EXACT)
    res = fpt.assert_matches_sequential(system, x0, method)
    assert res.iterations <= system.length
    assert res.dependent_steps <= res.iterations


@given(fpt.systems(max_length=40), st.integers(0, 8), st.data())
def test_windowed_triangular_anderson_with_width_at_least_T_is_the_plain_one(
    system, extra, data
):
    x0 = data.draw(fpt.initial_guesses(system))
    plain = fp.solve(system, x0, fp.TriangularAnderson(memory=2, ridge=1e-6, **EXACT))
    wide = fp.solve(
        system, x0,
        fp.TriangularAnderson(memory=2, ridge=1e-6, window_width=system.length + extra, **EXACT),
    )
    assert torch.equal(wide.x, plain.x)
    assert wide.iterations == plain.iterations
    assert wide.token_evals == plain.token_evals


@pytest.mark.parametrize("width", [0, -1, 1.5, True])
def test_windowed_triangular_anderson_rejects_bad_widths(width):
    with pytest.raises(ValueError, match="window_width"):
        fp.TriangularAnderson(window_width=width)

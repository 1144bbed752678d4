"""Damped Newton (fp.Newton): the method protocol's contracts, its Jacobian, its costs.

Oracles that do not go through fp.solve: the systems' explicit forward substitution
(``system.solution()``), and Jacobi's iterates for the zero trust radius.  Systems are
small: each iteration evaluates ``T x d`` directional derivatives.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fixedpoint as fp
from fixedpoint import testing as fpt
from fixedpoint.testing.systems import (
    AffineAutoregressive,
    LinearSystem,
    MarkovSystem,
    PoisonedSystem,
)

EXAMPLES = max(5, settings.default.max_examples // 5)
SMALL = dict(max_length=16, max_batch=3, max_dim=4)


def newtons(exact: bool = True) -> st.SearchStrategy[fp.Newton]:
    tol = fpt.EXACT if exact else {}
    return st.builds(
        lambda radius, refresh: fp.Newton(radius=radius, refresh=refresh, **tol),
        st.sampled_from((0.0, 0.5, 1.0, 1e6)),
        st.sampled_from((1, 3)),
    )


@pytest.mark.slow
@settings(max_examples=EXAMPLES, deadline=None)
@given(fpt.systems(**SMALL), st.data())
def test_newton_matches_sequential_and_terminates_within_T(system, data):
    x0 = data.draw(fpt.initial_guesses(system))
    method = data.draw(newtons())
    F = system.plain() if hasattr(system, "plain") and data.draw(st.booleans()) else system
    x0_copy = x0.clone()
    res = fp.solve(F, x0, method)
    assert torch.equal(x0, x0_copy), "x0 was modified"
    assert res.status is fp.Status.SUCCESS, res.summary()
    assert res.iterations <= system.length
    assert res.dependent_steps <= res.iterations
    fpt.assert_close(res.x, system.solution(), what=method.describe())


@settings(max_examples=EXAMPLES, deadline=None)
@given(fpt.systems(**SMALL), st.data())
def test_k_newton_iterations_make_the_first_k_positions_exact(system, data):
    x0 = data.draw(fpt.initial_guesses(system))
    k = data.draw(st.integers(1, system.length))
    res = fp.solve(system, x0, fp.Newton(max_iter=k, radius=data.draw(st.sampled_from((1.0, 1e6)))))
    assert res.iterations <= k
    fpt.assert_close(res.x[:, :k], system.solution()[:, :k])


def test_zero_radius_gives_jacobi_iterates():
    """rho = 0 clips every Newton correction: the iterates must be Jacobi's, bit for bit."""
    system = MarkovSystem.random(2, 16, 3, toughness=1.2, seed=3)
    x0 = system.noise_guess(seed=1)
    for k in (1, 4, 9):
        newton = fp.solve(system, x0, fp.Newton(radius=0.0, max_iter=k, **fpt.EXACT))
        jacobi = fp.solve(system, x0, fp.Jacobi(max_iter=k, **fpt.EXACT))
        assert torch.equal(newton.x, jacobi.x)


@pytest.mark.parametrize("toughness", [0.5, 1.0])
def test_undamped_newton_solves_a_linear_system_in_one_step(toughness):
    """F is affine, so with the exact Jacobian and an unbounded step the first iterate is
    the solution; the second iteration only confirms it.  A wrong Jacobian fails this."""
    system = LinearSystem.random(2, 24, 3, toughness=toughness, seed=5)
    x0 = torch.zeros_like(system.solution())
    one = fp.solve(system, x0, fp.Newton(radius=1e12, max_iter=1, **fpt.EXACT))
    fpt.assert_close(one.x, system.solution())
    jacobi = fp.solve(system, x0, fp.Jacobi(max_iter=1, **fpt.EXACT))
    assert not torch.allclose(jacobi.x, system.solution())


def test_trust_region_keeps_the_error_bounded_where_undamped_newton_blows_up():
    """On a tough nonlinear system undamped Newton's error grows far beyond the initial
    one before it converges; the trust region keeps every iterate within twice it."""
    system = AffineAutoregressive.random(2, 40, 3, toughness=2.0, seed=1)
    sol = system.solution()
    x0 = torch.zeros_like(sol)
    first = float((x0 - sol).abs().max())

    def worst(method: fp.Newton) -> float:
        res = fp.solve(system, x0, method, trace=True, reference=sol)
        assert res.success
        fpt.assert_close(res.x, sol)
        return max(float(row.error.max()) for row in res.trace)

    assert worst(fp.Newton(radius=1e12)) > 10 * first
    assert worst(fp.Newton()) <= 2 * first


def test_costs_count_the_jacobian_directions():
    """A plain map reads T positions per call; one Jacobian on the whole module adds
    (T - 1) * d directions of one full pass each, and no dependent step."""
    B, T, d = 2, 12, 3
    system = MarkovSystem.random(B, T, d, toughness=1.0, seed=2)
    x0 = torch.zeros(B, T, d, dtype=system.dtype)
    res = fp.solve(fp.PlainMap(system), x0, fp.Newton(refresh=10**6))
    assert res.success
    assert res.dependent_steps == res.iterations
    assert res.token_evals == B * T * res.dependent_steps + (T - 1) * d * B * T
    fresh = fp.solve(fp.PlainMap(system), x0, fp.Newton(refresh=1))
    assert fresh.token_evals > B * T * fresh.dependent_steps + (T - 1) * d * B * T


def test_nonfinite_map_value_stops_the_sample_and_keeps_its_last_finite_iterate():
    base = MarkovSystem.random(2, 12, 2, toughness=1.0, seed=4)
    system = PoisonedSystem(base, sample=1, position=7)
    x0 = base.noise_guess(seed=2)
    res = fp.solve(system, x0, fp.Newton())
    assert res.sample_status == (fp.Status.SUCCESS, fp.Status.NONFINITE)
    assert torch.isfinite(res.x).all()
    assert torch.equal(res.x[1], x0[1])  # poisoned from the first evaluation on
    fpt.assert_close(res.x[0], base.solution()[0])


@pytest.mark.parametrize(
    "kwargs, message",
    [({"radius": -1.0}, "radius"), ({"radius": float("inf")}, "radius"),
     ({"refresh": 0}, "refresh"), ({"chunk": 0}, "chunk"), ({"refresh": True}, "refresh"),
     ({"max_iter": 0}, "max_iter")],
)
def test_newton_rejects_bad_configuration(kwargs, message):
    with pytest.raises(ValueError, match=message):
        fp.Newton(**kwargs)

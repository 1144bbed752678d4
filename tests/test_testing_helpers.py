"""The public test helpers of fixedpoint.testing: strategies draw what they promise and
assertions fail when they should."""

from __future__ import annotations

import pytest
import torch
from hypothesis import find, given, settings
from hypothesis import strategies as st

import fixedpoint as fp
from fixedpoint import testing as fpt
from fixedpoint.testing.systems import (
    AttentionAutoregressive,
    MarkovSystem,
    NonCausalSystem,
    TriangularSystem,
)

F64 = torch.float64
EXAMPLES = settings.default.max_examples
FIND = settings(database=None, derandomize=True, max_examples=500)


def one(strategy, condition=lambda _: True):
    """A deterministic example satisfying ``condition`` (hypothesis.find)."""
    return find(strategy, condition, settings=FIND)


# ----------------------------------------------------------------------------------------
# Strategies
# ----------------------------------------------------------------------------------------
@settings(max_examples=EXAMPLES)
@given(
    fpt.systems(
        min_length=2,
        max_length=30,
        max_batch=3,
        max_dim=5,
        kinds=("affine", "markov"),
        dtypes=(torch.float32, torch.float64),
    )
)
def test_systems_strategy_respects_its_bounds(system):
    assert isinstance(system, TriangularSystem)
    assert 2 <= system.length <= 30 and 1 <= system.batch <= 3 and 1 <= system.dim <= 5
    assert system.dtype in (torch.float32, torch.float64)
    assert type(system).__name__ in ("AffineAutoregressive", "MarkovSystem")
    assert torch.isfinite(system.solution()).all()


@settings(max_examples=EXAMPLES)
@given(fpt.systems(max_length=256, max_dim=16, kinds=("linear",)))
def test_linear_systems_stay_small_enough(system):
    assert system.length * system.dim <= fpt.LINEAR_MAX_SIZE


@pytest.mark.parametrize(
    "strategy",
    [
        lambda: fpt.systems(kinds=("quadratic",)),
        lambda: fpt.solver_cases(method_kinds=("newton",)),
        lambda: fpt.initial_guesses(MarkovSystem.random(1, 3, 1), kinds=("lucky",)),
    ],
    ids=["system", "method", "guess"],
)
def test_strategies_reject_unknown_kinds(strategy):
    with pytest.raises(ValueError, match="unknown .* kinds"):
        one(strategy())


@settings(max_examples=EXAMPLES)
@given(fpt.systems(max_length=20, max_batch=4, max_dim=3), st.data())
def test_initial_guesses_are_finite_and_shaped(system, data):
    x0 = data.draw(fpt.initial_guesses(system))
    assert x0.shape == system.shape and x0.dtype == system.dtype
    assert torch.isfinite(x0).all()


@pytest.mark.parametrize("kind", ["zeros", "solution", "near", "noise", "prefix", "huge"])
def test_initial_guess_kinds(kind):
    system = MarkovSystem.random(3, 10, 2, seed=0)
    x0 = one(fpt.initial_guesses(system, kinds=(kind,)), lambda x: kind != "noise" or x.any())
    sol = system.solution()
    if kind == "zeros":
        assert (x0 == 0).all()
    elif kind == "solution":
        assert torch.equal(x0, sol)
    elif kind == "near":
        assert 0 < float((x0 - sol).abs().max()) < 1e-7
    elif kind == "huge":
        assert float(x0.abs().max()) > 100
    elif kind == "noise":
        assert not (x0 == sol).any(-1).any()
    else:  # prefix: exact up to some k per sample, nowhere exact after it
        for b in range(3):
            exact = (x0[b] == sol[b]).all(-1)
            k = int(exact.int().cumprod(0).sum())
            assert not exact[k:].any(), (b, exact)


def test_prefix_guesses_cover_empty_partial_and_full_prefixes():
    system = MarkovSystem.random(1, 10, 2, seed=0)
    sol = system.solution()
    strategy = fpt.initial_guesses(system, kinds=("prefix",))
    for k in (0, 4, 10):
        one(strategy, lambda x, k=k: int((x[0] == sol[0]).all(-1).int().cumprod(0).sum()) == k)


@settings(max_examples=EXAMPLES)
@given(fpt.systems(max_length=20, max_batch=3, max_dim=3, kinds=("markov", "affine")), st.data())
def test_consistent_guess_is_a_fixed_point_after_the_moved_position(system, data):
    x0 = data.draw(fpt.initial_guesses(system, kinds=("consistent",)))
    sol = system.solution()
    f = system(x0)
    for b in range(system.batch):
        moved = (x0[b] != sol[b]).any(-1).nonzero()
        assert len(moved) > 0
        k = int(moved[0])
        assert torch.equal(x0[b, :k], sol[b, :k])
        assert torch.equal(f[b, k + 1 :], x0[b, k + 1 :])


@settings(max_examples=EXAMPLES)
@given(st.integers(1, 40), st.data())
def test_methods_strategy_draws_valid_configurations(T, data):
    method = data.draw(fpt.methods(T, kinds=fpt.METHOD_KINDS))
    assert isinstance(
        method, (fp.Sequential, fp.Jacobi, fp.GSJacobi, fp.Anderson, fp.TriangularAnderson)
    )
    if isinstance(method, fp.GSJacobi):
        edges = method.boundaries(T)
        assert edges[0] == 0 and edges[-1] == T
        assert all(a < b for a, b in zip(edges[:-1], edges[1:]))
    if isinstance(method, (fp.Jacobi, fp.GSJacobi, fp.TriangularAnderson)):
        assert method.atol == 0 and method.rtol == 0


def test_methods_strategy_covers_non_divisors_and_boundaries():
    strategy = fpt.methods(12, kinds=("gsjacobi",))
    one(strategy, lambda m: isinstance(m.modules, int) and 12 % m.modules != 0)
    one(strategy, lambda m: isinstance(m.modules, tuple) and len(m.modules) > 2)
    one(strategy, lambda m: isinstance(m.modules, int) and m.modules == 12)


@settings(max_examples=EXAMPLES)
@given(fpt.solver_cases(max_length=16, max_batch=3, max_dim=3))
def test_solver_cases_are_consistent(case):
    assert case.x0.shape == case.system.shape
    if case.incremental:
        assert case.F is case.system
    fpt.assert_matches_sequential(case.F, case.x0, case.method, reference=case.system.solution())


def test_solver_cases_hand_attention_over_both_ways():
    strategy = fpt.solver_cases(max_length=4, max_batch=1, max_dim=1, kinds=("attention",))
    assert one(strategy, lambda c: c.incremental).F is not None
    plain = one(strategy, lambda c: not c.incremental)
    assert not isinstance(plain.F, fp.IncrementalMap)


# ----------------------------------------------------------------------------------------
# Tolerances and assert_close
# ----------------------------------------------------------------------------------------
def test_default_tolerances():
    assert fpt.default_rtol(torch.float64) == 1e-10
    assert fpt.default_rtol(torch.float32) == 1e-4
    assert fpt.default_rtol(torch.bfloat16) == 5e-2


def test_assert_close_is_relative_to_max_one_and_magnitude():
    ref = torch.tensor([[[0.0, 1e6]]], dtype=F64)
    fpt.assert_close(ref + torch.tensor([[[5e-11, 5e-5]]], dtype=F64), ref)
    with pytest.raises(AssertionError, match=r"\(0, 0, 0\)"):
        fpt.assert_close(ref + torch.tensor([[[2e-10, 0.0]]], dtype=F64), ref)
    with pytest.raises(AssertionError, match=r"\(0, 0, 1\)"):
        fpt.assert_close(ref + torch.tensor([[[0.0, 2e-4]]], dtype=F64), ref)
    with pytest.raises(AssertionError, match="non-finite"):
        fpt.assert_close(ref * float("nan"), ref)
    with pytest.raises(AssertionError, match="shape"):
        fpt.assert_close(ref[:, :, :1], ref)
    fpt.assert_close(ref.float() + 1e-5, ref.float())  # float32 default 1e-4


# ----------------------------------------------------------------------------------------
# Assertions pass on correct inputs and fail on wrong ones
# ----------------------------------------------------------------------------------------
def small_system():
    return MarkovSystem.random(3, 12, 2, toughness=1.0, seed=0)


def test_assert_matches_sequential():
    system = small_system()
    x0 = system.noise_guess()
    res = fpt.assert_matches_sequential(system, x0, fp.GSJacobi(modules=5))
    assert res.success
    with pytest.raises(AssertionError, match="MAX_ITER"):
        fpt.assert_matches_sequential(system, x0, fp.Jacobi(max_iter=2))
    with pytest.raises(AssertionError, match="relative error"):
        fpt.assert_matches_sequential(system, x0, fp.Jacobi(), reference=system.solution() + 1e-6)


def test_assert_finite_termination():
    system = small_system()
    fpt.assert_finite_termination(system, system.noise_guess())
    fpt.assert_finite_termination(system, system.noise_guess(), steps=range(1, 13))
    wrong = system.solution()
    wrong[:, 0] += 1e-3
    with pytest.raises(AssertionError):
        fpt.assert_finite_termination(system, system.noise_guess(), reference=wrong)
    with pytest.raises(AssertionError, match="within 5"):
        fpt.assert_finite_termination(system, system.noise_guess(), length=5)


def test_assert_finite_termination_catches_a_map_that_is_not_causal():
    system = NonCausalSystem(small_system(), position=4, lookahead=1, weight=0.1)
    with pytest.raises(AssertionError):
        fpt.assert_finite_termination(system, system.noise_guess())


@pytest.mark.parametrize(
    "method",
    [fp.Sequential(), fp.Jacobi(), fp.GSJacobi(modules=4), fp.TriangularAnderson()],
    ids=repr,
)
def test_assert_batch_independent_passes(method):
    system = small_system()
    fpt.assert_batch_independent(system, system.noise_guess(), method)
    # The factory form.
    fpt.assert_batch_independent(lambda idx: system.select(idx), system.noise_guess(), method)


def test_assert_batch_independent_catches_coupled_samples():
    system = small_system()

    def make(idx):
        sub = system.select(idx)

        def F(x):
            # Couples the samples through the batch mean of the previous position.
            y = sub(x)
            shifted = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)
            return y + 0.3 * torch.tanh(shifted.mean(0, keepdim=True))

        return F

    with pytest.raises(AssertionError):
        fpt.assert_batch_independent(make, system.noise_guess(), fp.Jacobi())


def test_assert_causal():
    system = AttentionAutoregressive.random(2, 8, 2, seed=0)
    fpt.assert_causal(system, system.noise_guess())
    fpt.assert_causal(system.plain(), system.noise_guess(), positions=[0, 7])
    bad = NonCausalSystem(system, position=2)
    with pytest.raises(AssertionError, match="output position 2"):
        fpt.assert_causal(bad, system.noise_guess())


def test_forward_substitution_is_the_oracle():
    system = small_system()
    assert torch.allclose(
        fpt.forward_substitution(system, system.empty()), system.solution(), rtol=0, atol=1e-14
    )


@settings(max_examples=EXAMPLES)
@given(fpt.systems(max_length=8, max_batch=2, max_dim=2, max_toughness=0.5))
def test_systems_strategy_respects_max_toughness(system):
    assert 0.0 <= system.toughness <= 0.5

"""The synthetic systems of fixedpoint.testing.systems: oracles, causality, determinism, caches."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fixedpoint as fp
from fixedpoint.testing.systems import (
    RANDOM_SYSTEMS,
    SYSTEM_KINDS,
    AffineAutoregressive,
    AttentionAutoregressive,
    LinearSystem,
    MarkovSystem,
    NonCausalSystem,
    PoisonedSystem,
    forward_substitution,
)

F64 = torch.float64
EXAMPLES = settings.default.max_examples


def bump_causal_to_the_bit(F, x):
    """Independent of fp.check_causal: bump each input, earlier outputs must not move."""
    base = F(x)
    for s in range(x.shape[1]):
        y = x.clone()
        y[:, s] += 1.0
        assert torch.equal(F(y)[:, : s + 1], base[:, : s + 1]), s


@pytest.mark.parametrize("kind", SYSTEM_KINDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_solution_is_the_fixed_point(kind, dtype):
    s = RANDOM_SYSTEMS[kind](3, 17, 4, toughness=1.0, seed=5, dtype=dtype)
    sol = s.solution()
    assert sol.shape == (3, 17, 4) and sol.dtype == dtype
    assert torch.isfinite(sol).all()
    tol = 1e-13 if dtype == F64 else 1e-5
    assert ((s(sol) - sol).abs() <= tol * sol.abs().clamp(min=1)).all()
    # The explicit recurrences agree with generic forward substitution.
    ref = forward_substitution(s, sol)
    assert ((ref - sol).abs() <= tol * sol.abs().clamp(min=1)).all()


@pytest.mark.parametrize("kind", SYSTEM_KINDS)
def test_solution_is_cached_but_returned_as_a_copy(kind):
    s = RANDOM_SYSTEMS[kind](2, 6, 2, seed=1)
    a = s.solution()
    a += 1.0
    assert not torch.equal(a, s.solution())


@pytest.mark.parametrize("kind", SYSTEM_KINDS)
def test_maps_are_causal_to_the_bit(kind):
    s = RANDOM_SYSTEMS[kind](2, 12, 3, toughness=1.0, seed=2)
    x = s.noise_guess(scale=2.0, seed=7)
    bump_causal_to_the_bit(s, x)
    fp.check_causal(s, x)


@pytest.mark.parametrize("kind", SYSTEM_KINDS)
def test_deterministic_given_seed(kind):
    a = RANDOM_SYSTEMS[kind](2, 9, 3, seed=11)
    b = RANDOM_SYSTEMS[kind](2, 9, 3, seed=11)
    c = RANDOM_SYSTEMS[kind](2, 9, 3, seed=12)
    x = a.noise_guess(seed=3)
    assert torch.equal(a(x), b(x))
    assert torch.equal(a.solution(), b.solution())
    assert not torch.equal(a.solution(), c.solution())
    assert torch.equal(a.noise_guess(seed=3), x)


@pytest.mark.parametrize("kind", SYSTEM_KINDS)
def test_float32_is_the_same_problem(kind):
    s64 = RANDOM_SYSTEMS[kind](2, 20, 3, seed=4, dtype=torch.float64)
    s32 = RANDOM_SYSTEMS[kind](2, 20, 3, seed=4, dtype=torch.float32)
    err = (s32.solution().double() - s64.solution()).abs() / s64.solution().abs().clamp(min=1)
    assert float(err.max()) < 1e-4


@pytest.mark.parametrize("kind", SYSTEM_KINDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_select_is_batch_independent_to_the_bit(kind, dtype):
    """A sample gets the same bits alone and in any batch of 1..8 (the products keep the
    batch dimension out of the kernel's shape; a folded ``(B*T, k) @ (k, m)`` does not)."""
    s = RANDOM_SYSTEMS[kind](8, 17, 16 if kind != "linear" else 5, seed=8, dtype=dtype)
    x = s.noise_guess(seed=1)
    alone = [s.select(b) for b in range(8)]
    ref = [one(x[b : b + 1]) for b, one in enumerate(alone)]
    for B in range(1, 9):
        sub = s.select(list(range(B)))
        y = sub(x[:B])
        for b in range(B):
            assert torch.equal(y[b : b + 1], ref[b]), (B, b)
    for b in range(8):
        assert alone[b].batch == 1
        assert torch.equal(alone[b].solution(), s.solution()[b : b + 1])
    pair = s.select([3, 1])
    assert torch.equal(pair(x[[3, 1]]), s(x)[[3, 1]])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_attention_windows_are_batch_independent_to_the_bit(dtype):
    """The incremental path too: the same window gives a sample the same bits alone and
    in any batch of 1..8."""
    s = AttentionAutoregressive.random(8, 17, 16, seed=2, dtype=dtype)
    x = s.noise_guess(seed=3)

    def window(system, x, lo, hi):
        state = system.init_state(x)
        if lo:
            system.advance(state, x, 0, lo)
        return system.advance(state, x, lo, hi)

    for lo, hi in ((0, 17), (5, 17), (1, 6)):
        ref = [window(s.select(b), x[b : b + 1], lo, hi) for b in range(8)]
        for B in range(1, 9):
            y = window(s.select(list(range(B))), x[:B], lo, hi)
            for b in range(B):
                assert torch.equal(y[b : b + 1], ref[b]), (lo, hi, B, b)


@pytest.mark.parametrize("kind", SYSTEM_KINDS)
def test_prefix_evaluation_matches_full(kind):
    s = RANDOM_SYSTEMS[kind](2, 10, 3, seed=8)
    x = s.noise_guess(seed=1)
    y = s(x)
    for t in (1, 4, 10):
        assert torch.allclose(s(x[:, :t]), y[:, :t], rtol=0, atol=1e-13)


@pytest.mark.parametrize("kind", SYSTEM_KINDS)
def test_input_validation(kind):
    s = RANDOM_SYSTEMS[kind](2, 5, 3)
    with pytest.raises(ValueError):
        s(torch.zeros(2, 5, dtype=F64))
    with pytest.raises(ValueError):
        s(torch.zeros(3, 5, 3, dtype=F64))
    with pytest.raises(ValueError):
        s(torch.zeros(2, 6, 3, dtype=F64))
    with pytest.raises(TypeError):
        s(torch.zeros(2, 5, 3, dtype=torch.float32))


@pytest.mark.parametrize(
    "cls", [LinearSystem, AffineAutoregressive, AttentionAutoregressive, MarkovSystem]
)
def test_constructor_validation(cls):
    with pytest.raises(ValueError):
        cls.random(0, 5, 2)
    with pytest.raises(ValueError):
        cls.random(1, 0, 2)
    with pytest.raises(TypeError):
        cls.random(1, 5, 2, dtype=torch.int64)


# -- linear ----------------------------------------------------------------------------
def test_linear_matrix_is_strictly_block_lower_and_nilpotent():
    s = LinearSystem.random(2, 6, 3, toughness=1.0, seed=3)
    L = s.L
    pos = torch.arange(18) // 3
    assert (L[pos[:, None] <= pos[None, :]] == 0).all()
    assert (L[pos[:, None] > pos[None, :]] != 0).all()
    P = torch.eye(18, dtype=F64)
    for _ in range(6):
        P = P @ L
    assert (P == 0).all()
    e0 = torch.randn(2, 6, 3, dtype=F64)
    assert (s.jacobi_error(e0, 6) == 0).all()
    with pytest.raises(ValueError, match="strictly block-lower"):
        LinearSystem(L + torch.eye(18, dtype=F64), s.b)


def test_linear_bandwidth():
    s = LinearSystem.random(1, 8, 2, bandwidth=2, seed=0)
    pos = torch.arange(16) // 2
    lag = pos[:, None] - pos[None, :]
    assert (s.L[lag > 2] == 0).all()
    assert (s.L[(lag > 0) & (lag <= 2)] != 0).all()


def test_linear_jacobi_error_matches_plain_iteration():
    s = LinearSystem.random(3, 9, 2, toughness=1.0, seed=6)
    sol = s.solution()
    x0 = s.noise_guess(seed=2)
    x = x0
    for k in range(11):
        e = s.jacobi_error(x0 - sol, k)
        assert torch.allclose(x - sol, e, rtol=0, atol=1e-13), k
        if k >= 9:
            assert (e == 0).all()
        # Positions < k are exact after k steps.
        assert (e[:, :k] == 0).all()
        x = s(x)


# -- affine with overflow ---------------------------------------------------------------
def test_overflow_variant_solution_is_moderate_and_bad_starts_overflow():
    s = AffineAutoregressive.random(3, 40, 4, toughness=1.0, overflow=True, seed=2)
    sol = s.solution()
    assert torch.isfinite(sol).all() and float(sol.abs().max()) < s.radius
    plain = AffineAutoregressive.random(3, 40, 4, toughness=1.0, seed=2)
    assert torch.allclose(sol, plain.solution(), rtol=0, atol=1e-12)
    huge = torch.full_like(sol, 1e3)
    y = s(huge)
    assert torch.isfinite(y[:, 0]).all()
    assert not torch.isfinite(y[:, 1:]).any(-1).any()
    for dtype in (torch.float32, torch.float64):
        s2 = AffineAutoregressive.random(1, 5, 2, overflow=True, seed=0, dtype=dtype)
        assert not torch.isfinite(s2(torch.full((1, 5, 2), 1e3, dtype=dtype))[:, 1:]).all()


def test_overflow_variant_refuses_a_solution_outside_the_radius():
    with pytest.raises(ValueError, match="radius"):
        AffineAutoregressive.random(2, 30, 2, toughness=2.0, overflow=True, radius=1.0, seed=0)


# -- attention: the incremental path ------------------------------------------------------
def test_attention_is_an_incremental_map_and_plain_view_is_not():
    s = AttentionAutoregressive.random(2, 5, 3)
    assert isinstance(s, fp.IncrementalMap)
    assert not isinstance(s.plain(), fp.IncrementalMap)
    x = s.noise_guess()
    assert torch.equal(s.plain()(x), s(x))


@st.composite
def window_schedules(draw):
    T = draw(st.integers(1, 24))
    steps = []
    n = 0
    for _ in range(draw(st.integers(1, 8))):
        lo = draw(st.integers(n, T - 1))
        hi = draw(st.integers(lo + 1, T))
        steps.append((lo, hi, draw(st.integers(0, 2**16))))
        n = lo
    return T, steps


@settings(max_examples=max(10, EXAMPLES))
@given(window_schedules(), st.integers(1, 3), st.integers(1, 4), st.integers(0, 100))
def test_attention_advance_matches_full_evaluation(schedule, batch, dim, seed):
    """Any legal schedule of windows, with uncommitted inputs changing between calls,
    returns F(x)[:, lo:hi], and reads exactly positions_read(...) new inputs."""
    T, steps = schedule
    s = AttentionAutoregressive.random(batch, T, dim, seed=seed)
    pushed = []
    original = s._shifted

    def counting(x_prev, first):
        pushed.append(x_prev.shape[1])
        return original(x_prev, first)

    s._shifted = counting
    x = s.noise_guess(seed=seed)
    state = s.init_state(x)
    for lo, hi, change in steps:
        n = s.committed(state)
        g = torch.Generator().manual_seed(change)
        x = x.clone()
        x[:, n:] = torch.randn(x[:, n:].shape, generator=g, dtype=F64)  # may still change
        pushed.clear()
        out = s.advance(state, x, lo, hi)
        assert sum(pushed) == s.positions_read(n, lo, hi, T)
        assert s.committed(state) == lo
        full = s(x)[:, lo:hi]
        assert torch.allclose(out, full, rtol=1e-12, atol=1e-12)


def test_attention_advance_rejects_illegal_windows():
    s = AttentionAutoregressive.random(1, 6, 2)
    x = s.noise_guess()
    state = s.init_state(x)
    s.advance(state, x, 3, 5)
    with pytest.raises(ValueError):
        s.advance(state, x, 2, 4)  # behind the committed prefix
    with pytest.raises(ValueError):
        s.advance(state, x, 4, 4)
    with pytest.raises(ValueError):
        s.advance(state, x, 4, 7)


def test_attention_incremental_sequential_matches_solution():
    s = AttentionAutoregressive.random(2, 30, 3, toughness=1.0, seed=9)
    x = torch.zeros_like(s.solution())
    state = s.init_state(x)
    for t in range(30):
        x[:, t] = s.advance(state, x, t, t + 1)[:, 0]
    assert torch.allclose(x, s.solution(), rtol=1e-12, atol=1e-12)


# -- markov ---------------------------------------------------------------------------
def test_markov_depends_on_the_previous_position_only():
    s = MarkovSystem.random(2, 8, 3, seed=1)
    x = s.noise_guess()
    y = s(x)
    for t in range(2, 8):
        x2 = x.clone()
        x2[:, : t - 1] += 1.0
        assert torch.equal(s(x2)[:, t], y[:, t])


# -- failure variants ---------------------------------------------------------------------
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_poisoned_system(value):
    base = AffineAutoregressive.random(3, 10, 2, seed=0)
    s = PoisonedSystem(base, sample=1, position=4, value=value)
    sol = s.solution()
    ref = base.solution()
    assert torch.equal(sol[[0, 2]], ref[[0, 2]])
    assert torch.equal(sol[1, :4], ref[1, :4])
    assert not torch.isfinite(sol[1, 4:]).any()
    with pytest.raises(ValueError):
        PoisonedSystem(base, position=10)
    with pytest.raises(ValueError):
        PoisonedSystem(base, value=1.0)


@pytest.mark.parametrize("lookahead", [0, 1])
@pytest.mark.parametrize("position", [0, 3, 6])
def test_non_causal_system_is_detected_at_its_position(lookahead, position):
    base = MarkovSystem.random(2, 8, 2, seed=0)
    s = NonCausalSystem(base, position=position, lookahead=lookahead)
    with pytest.raises(fp.NonCausalError) as info:
        fp.check_causal(s, s.noise_guess())
    assert info.value.position == position
    assert info.value.source == position + lookahead
    with pytest.raises(ValueError):
        s.solution()


def test_non_causal_system_validation():
    base = MarkovSystem.random(1, 4, 1)
    with pytest.raises(ValueError, match="position"):
        NonCausalSystem(base, position=3, lookahead=1)
    with pytest.raises(ValueError, match="lookahead"):
        NonCausalSystem(base, lookahead=-1)
    with pytest.raises(ValueError, match="lookahead"):
        NonCausalSystem(base, lookahead="future")

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
from fixedpoint.methods.newton import bandwidth_leak
from fixedpoint.testing.systems import (
    AffineAutoregressive,
    LinearSystem,
    MarkovSystem,
    PoisonedSystem,
    TriangularSystem,
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


# ---- banded Jacobians (bandwidth=k: k x d colour-compressed directions) ------------------

class BandedSystem(TriangularSystem):
    """``x_t = tanh(sum_{j=1..k} x_{t-j} A_j + c) + z_t`` (``x_{<0} = 0``): nonlinear
    and banded with bandwidth exactly ``k`` (every ``A_j`` is a dense Gaussian block)."""

    _per_sample = ("z",)

    def __init__(self, A: torch.Tensor, c: torch.Tensor, z: torch.Tensor):
        self.A, self.c, self.z = A, c, z  # A: (k, d, d)
        self.batch, self.length, self.dim = z.shape
        self.dtype, self.device = z.dtype, z.device
        self.bandwidth = A.shape[0]

    @classmethod
    def random(cls, batch, length, dim, *, bandwidth, toughness=1.0, seed=0, dtype=torch.float64):
        g = torch.Generator().manual_seed(seed)
        A = torch.randn(bandwidth, dim, dim, generator=g, dtype=torch.float64)
        A = toughness * A / (bandwidth * dim) ** 0.5
        c = 0.5 * torch.randn(dim, generator=g, dtype=torch.float64)
        z = 0.5 * torch.randn(batch, length, dim, generator=g, dtype=torch.float64)
        return cls(A.to(dtype), c.to(dtype), z.to(dtype))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        t = self._check_input(x)
        k = self.bandwidth
        padded = torch.cat([x.new_zeros(x.shape[0], k, self.dim), x[:, : t - 1]], 1)
        # padded[:, p] is x_{p-k}: output t reads x_{t-j} at padded[:, t + k - j].
        pre = sum(padded[:, k - j : k - j + t] @ self.A[j - 1] for j in range(1, k + 1))
        return torch.tanh(pre + self.c) + self.z[:, :t]


@st.composite
def banded_systems(draw, dtypes=(torch.float64,)):
    """(system, its true bandwidth): Markov, linear banded or nonlinear banded."""
    kind = draw(st.sampled_from(("markov", "linear", "nonlinear")))
    batch = draw(st.integers(1, 3))
    length = draw(st.integers(1, 14))
    dim = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    dtype = draw(st.sampled_from(dtypes))
    toughness = draw(st.sampled_from((0.3, 1.0, 1.4)))
    if kind == "markov":
        return MarkovSystem.random(batch, length, dim, toughness=toughness, seed=seed,
                                   dtype=dtype), 1
    k = draw(st.integers(1, 4))
    if kind == "linear":
        return LinearSystem.random(batch, length, dim, toughness=min(toughness, 1.0),
                                   bandwidth=k, seed=seed, dtype=dtype), k
    return BandedSystem.random(batch, length, dim, bandwidth=k, toughness=toughness,
                               seed=seed, dtype=dtype), k


def test_banded_test_system_is_causal_and_banded_as_built():
    """The oracle system of these tests: causal to the bit, and its band is exactly k."""
    system = BandedSystem.random(2, 12, 3, bandwidth=3, seed=1)
    fpt.assert_causal(system, system.noise_guess(seed=2))
    x = system.noise_guess(seed=3)
    assert bandwidth_leak(system, x, 3) == 0.0
    assert bandwidth_leak(system, x, 2) > 1e-3


@settings(max_examples=EXAMPLES, deadline=None)
@given(banded_systems(dtypes=(torch.float32, torch.float64)), st.data())
def test_banded_newton_matches_sequential(case, data):
    """Declared bandwidth >= the true one (a map banded with k is banded with any more):
    the exact fixed point, within T iterations, and k iterations fix the first k."""
    system, true_k = case
    k = true_k + data.draw(st.sampled_from((0, 0, 1, 20)))
    radius = data.draw(st.sampled_from((0.5, 1.0, 1e6)))
    refresh = data.draw(st.sampled_from((1, 3)))
    x0 = data.draw(fpt.initial_guesses(system))
    method = fp.Newton(bandwidth=k, radius=radius, refresh=refresh, **fpt.EXACT)
    res = fp.solve(system, x0, method)
    assert res.status is fp.Status.SUCCESS, res.summary()
    assert res.iterations <= system.length
    assert res.dependent_steps == res.iterations
    fpt.assert_close(res.x, system.solution(), what=method.describe())
    m = data.draw(st.integers(1, system.length))
    part = fp.solve(system, x0, fp.Newton(bandwidth=k, radius=radius, max_iter=m))
    fpt.assert_close(part.x[:, :m], system.solution()[:, :m])


@settings(max_examples=EXAMPLES, deadline=None)
@given(banded_systems(), st.data())
def test_banded_newton_iterates_equal_dense_newtons_on_a_banded_map(case, data):
    """Same Jacobian, fewer directions: every iterate equals the dense method's up to
    the summation order of the substitution (float64)."""
    system, true_k = case
    k = true_k + data.draw(st.sampled_from((0, 2)))
    radius = data.draw(st.sampled_from((0.5, 1e6)))
    refresh = data.draw(st.sampled_from((1, 2)))
    x0 = data.draw(fpt.initial_guesses(system, kinds=("zeros", "noise")))
    for m in range(1, system.length + 1):
        kw = dict(radius=radius, refresh=refresh, max_iter=m, **fpt.EXACT)
        banded = fp.solve(system, x0, fp.Newton(bandwidth=k, **kw))
        dense = fp.solve(system, x0, fp.Newton(**kw))
        assert banded.iterations == dense.iterations
        fpt.assert_close(banded.x, dense.x, rtol=1e-12, what=f"iterate {m}")


def test_markov_bandwidth_one_gives_dense_iterates_to_the_bit():
    system = MarkovSystem.random(2, 16, 3, toughness=1.2, seed=3)
    x0 = system.noise_guess(seed=1)
    for m in (1, 3, 6):
        banded = fp.solve(system, x0, fp.Newton(bandwidth=1, max_iter=m, **fpt.EXACT))
        dense = fp.solve(system, x0, fp.Newton(max_iter=m, **fpt.EXACT))
        assert torch.equal(banded.x, dense.x)


@pytest.mark.parametrize("k", [1, 2, 5, 11, 40])
def test_banded_costs_count_k_times_d_directions(k):
    """One Jacobian on the whole module (refresh never comes): min(k, T - 1) * d
    directions of one full pass each on top of the Jacobi passes; k >= T - 1 costs
    exactly the dense count."""
    B, T, d = 2, 12, 3
    system = BandedSystem.random(B, T, d, bandwidth=min(k, T - 1), toughness=0.8, seed=2)
    x0 = torch.zeros(B, T, d, dtype=system.dtype)
    res = fp.solve(fp.PlainMap(system), x0, fp.Newton(bandwidth=k, refresh=10**6))
    assert res.success
    assert res.dependent_steps == res.iterations
    assert res.token_evals == B * T * res.dependent_steps + min(k, T - 1) * d * B * T
    dense = fp.solve(fp.PlainMap(system), x0, fp.Newton(refresh=10**6))
    if k >= T - 1:
        assert res.token_evals == dense.token_evals
    else:
        assert res.token_evals < dense.token_evals


@pytest.mark.parametrize("k, true_k", [(1, 1), (2, 3), (3, 3), (6, 3)])
def test_undamped_banded_newton_solves_a_banded_linear_system_in_one_step(k, true_k):
    """Affine F: with the right band the first undamped iterate is the solution; with a
    band too narrow the colours alias (inputs of one colour summed into one block) and it
    is not.  The test that a wrong bandwidth is a wrong Jacobian."""
    system = LinearSystem.random(2, 20, 3, toughness=0.8, bandwidth=true_k, seed=1)
    x0 = torch.zeros_like(system.solution())
    one = fp.solve(system, x0, fp.Newton(bandwidth=k, radius=1e12, max_iter=1, **fpt.EXACT))
    error = float((one.x - system.solution()).abs().max())
    if k >= true_k:
        assert error < 1e-12
    else:
        assert error > 1e-2


@pytest.mark.slow
@settings(max_examples=EXAMPLES, deadline=None)
@given(fpt.systems(kinds=("affine", "attention", "linear"), **SMALL), st.data())
def test_wrong_bandwidth_still_gives_the_fixed_point(system, data):
    """On maps that are not banded (dense dependence on the prefix) a declared bandwidth
    gives a wrong Jacobian, yet the solve ends at the sequential solution within T
    iterations: stopping test and freezing use F, never J."""
    k = data.draw(st.sampled_from((1, 2)))
    x0 = data.draw(fpt.initial_guesses(system))
    res = fp.solve(system, x0, fp.Newton(bandwidth=k, radius=data.draw(
        st.sampled_from((1.0, 1e6))), **fpt.EXACT))
    assert res.status is fp.Status.SUCCESS, res.summary()
    assert res.iterations <= system.length
    fpt.assert_close(res.x, system.solution())


def test_wrong_bandwidth_is_slower_but_right():
    """A concrete case: the affine system's running mean reads the whole prefix."""
    system = AffineAutoregressive.random(2, 30, 3, toughness=1.5, seed=1)
    x0 = torch.zeros_like(system.solution())
    assert bandwidth_leak(system, x0, 1) > 1e-3
    tol = dict(atol=1e-10, rtol=0.0)
    wrong = fp.solve(system, x0, fp.Newton(bandwidth=1, **tol))
    right = fp.solve(system, x0, fp.Newton(**tol))
    assert wrong.success and right.success
    fpt.assert_close(wrong.x, system.solution())
    assert wrong.iterations > right.iterations


def test_banded_nonfinite_map_value_stops_the_sample():
    base = MarkovSystem.random(2, 12, 2, toughness=1.0, seed=4)
    system = PoisonedSystem(base, sample=1, position=7)
    res = fp.solve(system, base.noise_guess(seed=2), fp.Newton(bandwidth=1))
    assert res.sample_status == (fp.Status.SUCCESS, fp.Status.NONFINITE)
    assert torch.isfinite(res.x).all()
    fpt.assert_close(res.x[0], base.solution()[0])


def test_ddim_markov_form_is_banded_and_banded_newton_samples_it():
    """The diffusion use: the Markov form of a DDIM chain reads only the previous state
    (band 1, leak exactly 0), the Picard form reads the whole prefix; banded Newton on
    the Markov form reaches the sequential sample."""
    from fixedpoint.diffusion import (
        DDIMChain,
        GaussianMixture,
        MarkovMap,
        MixtureDenoiser,
        NoiseSchedule,
        PicardMap,
        sample_loop,
        solve_chain,
    )

    schedule = NoiseSchedule.default()
    mixture = GaussianMixture.random(2, components=4, seed=0)
    den = MixtureDenoiser(mixture, schedule.alphas_cumprod)
    chain = DDIMChain.from_schedule(schedule, 12)
    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    markov, picard = MarkovMap(chain, den, x), PicardMap(chain, den, x)
    guess = markov.initial_guess()
    assert bandwidth_leak(markov, guess, 1) == 0.0
    assert bandwidth_leak(picard, guess, 1) > 1e-6
    exact = sample_loop(chain, den, x)
    out = solve_chain(markov, fp.Newton(bandwidth=1, atol=1e-12, rtol=0.0))
    assert out.result.success
    fpt.assert_close(out.sample, exact)


@pytest.mark.parametrize("value", [0, -1, True, 1.5, "2"])
def test_newton_rejects_bad_bandwidth(value):
    with pytest.raises(ValueError, match="bandwidth"):
        fp.Newton(bandwidth=value)


def test_bandwidth_leak_rejects_bad_input():
    system = MarkovSystem.random(1, 4, 2, seed=0)
    with pytest.raises(ValueError, match="bandwidth"):
        bandwidth_leak(system, system.noise_guess(), 0)
    with pytest.raises(ValueError, match="shape"):
        bandwidth_leak(system, torch.zeros(4, 2), 1)

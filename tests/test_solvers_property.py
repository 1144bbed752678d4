"""Property tests of the solvers over random triangular systems (hypothesis).

Every property compares with an oracle that does not go through fp.solve: the explicit
forward substitution of fixedpoint.systems, or the closed form L^k e0 of a linear system.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fixedpoint as fp
from fixedpoint import testing as fpt
from fixedpoint.testing.systems import AttentionAutoregressive, LinearSystem

F64 = torch.float64
EXAMPLES = settings.default.max_examples

NON_ATTENTION = ("linear", "affine", "markov")
# Attention costs ~T^2 per evaluation: shorter sequences keep the suite fast; a T = 256
# attention case runs in test_solvers_unit.
BIG = dict(max_length=256, max_batch=8, max_dim=16, kinds=NON_ATTENTION)
ATTN = dict(max_length=48, max_batch=8, max_dim=16, kinds=("attention",))


def cases(**kw):
    return fpt.solver_cases(**{**BIG, **kw}) | fpt.solver_cases(**{**ATTN, **kw})


def check_result_invariants(res: fp.Result, x0: torch.Tensor, x0_copy: torch.Tensor) -> None:
    """Contract invariants that hold for every solve."""
    B, T, d = x0.shape
    assert torch.equal(x0, x0_copy), "x0 was modified"
    assert res.x.shape == (B, T, d) and res.x.dtype == x0.dtype
    assert res.converged.shape == (B,) and res.converged.dtype == torch.bool
    assert len(res.sample_status) == B
    for b in range(B):
        ok = res.sample_status[b] is fp.Status.SUCCESS
        assert bool(res.converged[b]) == ok
        if ok:
            assert torch.isfinite(res.x[b]).all(), "a non-finite sample is marked converged"
    worst = max(res.sample_status, key=lambda s: s.value)
    assert res.status is worst
    assert res.iterations == sum(res.module_iterations)
    # Costs: a dependent step is an evaluation (at most one per iteration) that pushed at
    # least one position of every sample through the map, at most all T of them.
    assert res.dependent_steps <= res.iterations
    assert B * res.dependent_steps <= res.token_evals <= B * T * res.dependent_steps
    assert (res.token_evals == 0) == (res.dependent_steps == 0)


# ----------------------------------------------------------------------------------------
# 1. Every method returns the sequential solution
# ----------------------------------------------------------------------------------------
# Hypothesis favours the first entries of sampled_from, so each method kind gets its own
# run instead of being one more drawn value.
KINDS = pytest.mark.parametrize("kind", fpt.EXACT_METHOD_KINDS)


@KINDS
@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_every_method_matches_sequential_fp64(kind, data):
    case = data.draw(cases(method_kinds=(kind,)))
    x0_copy = case.x0.clone()
    res = fp.solve(case.F, case.x0, case.method)
    check_result_invariants(res, case.x0, x0_copy)
    assert res.status is fp.Status.SUCCESS, res.summary()
    fpt.assert_close(res.x, case.system.solution(), what=str(case.method))


@KINDS
@settings(max_examples=max(10, EXAMPLES // 2))
@given(data=st.data())
def test_every_method_matches_sequential_fp32(kind, data):
    case = data.draw(cases(dtypes=(torch.float32,), method_kinds=(kind,)))
    res = fp.solve(case.F, case.x0, case.method)
    assert res.status is fp.Status.SUCCESS, res.summary()
    # Documented float32 tolerance (fpt.default_rtol): 1e-4 relative to max(1, |x|).
    fpt.assert_close(res.x, case.system.solution(), rtol=1e-4, what=str(case.method))


@settings(max_examples=EXAMPLES)
@given(
    fpt.solver_cases(
        method_kinds=("anderson",),
        max_length=48,
        max_batch=4,
        max_dim=8,
        max_toughness=1.0,
    )
)
def test_anderson_on_mild_systems_matches_sequential(case):
    """Global Anderson has no finite termination; on mild systems it must still converge,
    and then to the sequential solution (residual tol 1e-12 -> error ~1e-11 here)."""
    x0_copy = case.x0.clone()
    res = fp.solve(case.F, case.x0, case.method)
    check_result_invariants(res, case.x0, x0_copy)
    assert res.status is fp.Status.SUCCESS, res.summary()
    fpt.assert_close(res.x, case.system.solution(), what=str(case.method))


@settings(max_examples=EXAMPLES)
@given(fpt.systems(max_length=64, max_batch=4, max_dim=6, kinds=("attention",)), st.data())
def test_incremental_and_plain_paths_agree(system, data):
    x0 = data.draw(fpt.initial_guesses(system))
    method = data.draw(fpt.methods(system.length))
    inc = fp.solve(system, x0, method)
    plain = fp.solve(system.plain(), x0, method)
    assert inc.success and plain.success
    fpt.assert_close(inc.x, plain.x)
    fpt.assert_close(inc.x, system.solution())


# ----------------------------------------------------------------------------------------
# 2. Finite termination
# ----------------------------------------------------------------------------------------
@settings(max_examples=EXAMPLES)
@given(fpt.systems(max_length=96, max_batch=4, max_dim=8), st.data())
def test_jacobi_finite_termination(system, data):
    x0 = data.draw(fpt.initial_guesses(system))
    T = system.length
    extra = data.draw(st.lists(st.integers(1, T), max_size=2))
    steps = sorted({1, T // 2 or 1, T, *extra})
    fpt.assert_finite_termination(system, x0, steps=steps, reference=system.solution())


@settings(max_examples=EXAMPLES)
@given(fpt.systems(max_length=96, max_batch=4, max_dim=8), st.data())
def test_gsjacobi_each_module_terminates_within_its_width(system, data):
    T = system.length
    x0 = data.draw(fpt.initial_guesses(system))
    method = data.draw(fpt.methods(T, kinds=("gsjacobi",)))
    edges = method.boundaries(T)
    widths = [b - a for a, b in zip(edges[:-1], edges[1:])]
    res = fp.solve(system, x0, method)
    assert res.success, res.summary()
    assert len(res.module_iterations) == len(widths)
    for i, (n, w) in enumerate(zip(res.module_iterations, widths)):
        assert 1 <= n <= w, f"module {i} of width {w} ran {n} iterations"
    fpt.assert_close(res.x, system.solution())

    # With a per-module cap k: modules no wider than k are exact; in the first module
    # wider than k, its first k positions are exact; nothing is promised after that.
    k = data.draw(st.integers(1, max(widths)))
    capped = fp.solve(system, x0, fp.GSJacobi(modules=method.modules, max_iter=k))
    assert all(n <= k for n in capped.module_iterations)
    exact_to = T
    for a, w in zip(edges[:-1], widths):
        if w > k:
            exact_to = a + k
            break
    fpt.assert_close(capped.x[:, :exact_to], system.solution()[:, :exact_to])
    if exact_to == T:
        assert capped.success


@settings(max_examples=EXAMPLES)
@given(cases(method_kinds=("triangular_anderson",)))
def test_triangular_anderson_keeps_finite_termination(case):
    res = fp.solve(case.F, case.x0, case.method)
    assert res.success, res.summary()
    assert res.iterations <= case.system.length
    fpt.assert_close(res.x, case.system.solution())


@settings(max_examples=EXAMPLES)
@given(fpt.systems(max_length=64, max_batch=4, max_dim=6), st.data())
def test_k_iterations_make_the_first_k_positions_exact_for_every_triangular_method(system, data):
    """After k iterations positions < k are exact (Jacobi and triangular Anderson)."""
    x0 = data.draw(fpt.initial_guesses(system))
    T = system.length
    k = data.draw(st.integers(1, T))
    sol = system.solution()
    for method in (fp.Jacobi(max_iter=k), fp.TriangularAnderson(max_iter=k)):
        res = fp.solve(system, x0, method)
        assert res.iterations <= k
        fpt.assert_close(res.x[:, :k], sol[:, :k], what=str(method))


# ----------------------------------------------------------------------------------------
# 3. Linear systems: the Jacobi error is exactly L^k e0
# ----------------------------------------------------------------------------------------
@settings(max_examples=EXAMPLES)
@given(
    st.integers(1, 48),
    st.integers(1, 6),
    st.integers(1, 4),
    st.floats(0.0, 1.0),
    st.integers(0, 2**31 - 1),
    st.data(),
)
def test_linear_jacobi_error_is_L_power_k(T, d, B, toughness, seed, data):
    system = LinearSystem.random(B, T, d, toughness=toughness, seed=seed)
    x0 = data.draw(fpt.initial_guesses(system))
    sol = system.solution()
    e0 = x0 - sol
    scale = max(1.0, float(e0.abs().max()), float(sol.abs().max()))
    for k in sorted({1, data.draw(st.integers(1, T)), T}):
        res = fp.solve(system, x0, fp.Jacobi(max_iter=k))
        err = res.x - sol
        expected = system.jacobi_error(e0, k)
        assert float((err - expected).abs().max()) <= 1e-12 * scale, k
        if k == T:
            assert float(err.abs().max()) <= 1e-12 * scale


# ----------------------------------------------------------------------------------------
# 4. Batch independence
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", fpt.METHOD_KINDS)
@settings(max_examples=max(10, EXAMPLES // 2))
@given(data=st.data())
def test_batch_independence(kind, data):
    case = data.draw(
        fpt.solver_cases(
            method_kinds=(kind,), max_length=40, max_batch=5, max_dim=4, max_toughness=1.0
        )
    )
    fpt.assert_batch_independent(case.system, case.x0, case.method)


# ----------------------------------------------------------------------------------------
# 5. Cost accounting
# ----------------------------------------------------------------------------------------
class CountingAttention(AttentionAutoregressive):
    """Counts the input positions its incremental path actually pushes through."""

    def __init__(self, base: AttentionAutoregressive):
        self.__dict__.update(base.__dict__)
        self.pushed = 0
        self.calls = 0

    def _shifted(self, x_prev, first):
        self.pushed += x_prev.shape[1]
        self.calls += 1
        return super()._shifted(x_prev, first)


@KINDS
@settings(max_examples=max(10, EXAMPLES // 2))
@given(data=st.data())
def test_cost_accounting_closed_forms(kind, data):
    case = data.draw(cases(method_kinds=(kind,)))
    B, T, _ = case.x0.shape
    res = fp.solve(case.F, case.x0, case.method)
    assert res.success, res.summary()
    m = case.method
    if isinstance(m, fp.Sequential):
        # Incremental: position 0 reads no input (the right shift), so it is no step.
        assert res.dependent_steps == (T - 1 if case.incremental else T)
        assert res.module_iterations == (1,) * T
        expected = B * (T - 1) if case.incremental else T * B * T
        assert res.token_evals == expected
    else:
        assert sum(res.module_iterations) == res.iterations
        if not case.incremental:
            assert res.dependent_steps == res.iterations
            assert res.token_evals == res.iterations * B * T
        else:
            assert res.dependent_steps <= res.iterations
            assert res.token_evals <= res.iterations * B * max(T - 1, 0)
    if isinstance(m, fp.Jacobi):
        assert len(res.module_iterations) == 1 and res.iterations <= T


@settings(max_examples=EXAMPLES)
@given(fpt.systems(max_length=48, max_batch=4, max_dim=4, kinds=("attention",)), st.data())
def test_incremental_token_evals_count_what_the_map_computes(system, data):
    """token_evals == B * input positions the incremental map really pushed through."""
    counting = CountingAttention(system)
    x0 = data.draw(fpt.initial_guesses(system))
    method = data.draw(fpt.methods(system.length))
    res = fp.solve(counting, x0, method)
    assert res.success
    assert res.token_evals == system.batch * counting.pushed
    # A dependent step is an evaluation that pushed inputs through the network.
    assert res.dependent_steps == counting.calls
    fpt.assert_close(res.x, system.solution())


# ----------------------------------------------------------------------------------------
# 6. Traces
# ----------------------------------------------------------------------------------------
@KINDS
@settings(max_examples=max(10, EXAMPLES // 2))
@given(data=st.data())
def test_trace_has_one_row_per_iteration_and_error_reaches_zero(kind, data):
    case = data.draw(
        fpt.solver_cases(
            method_kinds=(kind,),
            max_length=64,
            max_batch=4,
            max_dim=4,
            kinds=("linear", "affine", "markov"),
        )
    )
    F = case.system  # plain maps: solvers reproduce forward substitution to the bit
    ref = fpt.forward_substitution(F, case.x0)
    res = fp.solve(F, case.x0, case.method, trace=True, reference=ref)
    assert res.success
    rows = res.trace
    assert rows is not None and len(rows) == res.iterations
    i = 0
    for module, n in enumerate(res.module_iterations):
        for it in range(1, n + 1):
            row = rows[i]
            assert (row.module, row.iteration) == (module, it)
            assert row.residual.shape == (case.system.batch,)
            assert row.error is not None and row.error.shape == (case.system.batch,)
            i += 1
    final = rows[-1].error
    if isinstance(case.method, fp.TriangularAnderson):
        assert float(final.max()) <= 1e-10 * max(1.0, float(ref.abs().max()))
    else:
        assert float(final.max()) == 0.0, final
    untraced = fp.solve(F, case.x0, case.method)
    assert untraced.trace is None
    assert torch.equal(untraced.x, res.x)


@settings(max_examples=EXAMPLES)
@given(fpt.systems(max_length=48, max_batch=6, max_dim=4), st.data())
def test_converged_samples_stop_changing(system, data):
    """In Jacobi each sample's residual is zero in every iteration after it converged."""
    x0 = data.draw(fpt.initial_guesses(system))
    res = fp.solve(system, x0, fp.Jacobi(), trace=True)
    assert res.success
    for b, n in enumerate(res.sample_iterations):
        assert 1 <= n <= system.length
        for row in res.trace[n:]:
            assert float(row.residual[b]) == 0.0
    assert res.iterations == max(res.sample_iterations)

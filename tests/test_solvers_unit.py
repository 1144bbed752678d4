"""Unit tests of the solvers: failures, bad arguments, exact costs, adversarial starts."""

from __future__ import annotations

import math

import pytest
import torch

import fixedpoint as fp
from fixedpoint import testing as fpt
from fixedpoint.testing.systems import (
    AffineAutoregressive,
    AttentionAutoregressive,
    LinearSystem,
    MarkovSystem,
    NonCausalSystem,
    PoisonedSystem,
)

F64 = torch.float64

TRIANGULAR = [
    fp.Sequential(),
    fp.Jacobi(),
    fp.GSJacobi(modules=3),
    fp.GSJacobi(modules=(0, 2, 7)),
    fp.TriangularAnderson(),
]
ALL = [*TRIANGULAR, fp.Anderson(atol=1e-12, max_iter=300)]


def ids(methods):
    return [repr(m) for m in methods]


# ----------------------------------------------------------------------------------------
# Non-finite values
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("method", ALL, ids=ids(ALL))
def test_poisoned_sample_is_nonfinite_and_never_marked_converged(method, value):
    base = AffineAutoregressive.random(3, 12, 2, toughness=0.5, seed=1)
    system = PoisonedSystem(base, sample=1, position=5, value=value)
    res = fp.solve(system, torch.zeros(3, 12, 2, dtype=F64), method)
    assert res.status is fp.Status.NONFINITE
    assert res.sample_status == (fp.Status.SUCCESS, fp.Status.NONFINITE, fp.Status.SUCCESS)
    assert res.converged.tolist() == [True, False, True]
    assert torch.isfinite(res.x).all()
    fpt.assert_close(res.x[[0, 2]], base.solution()[[0, 2]])
    with pytest.raises(fp.SolveError) as info:
        fp.solve(system, torch.zeros(3, 12, 2, dtype=F64), method, throw=True)
    assert info.value.result.status is fp.Status.NONFINITE
    assert f"{fp.Status.NONFINITE.message} (samples 1);" in str(info.value)


@pytest.mark.parametrize("method", ALL, ids=ids(ALL))
def test_overflowing_start_is_reported_not_hidden(method):
    """A start far outside the overflow system's radius makes exp overflow for every
    method that reads the guess; forward substitution never reads it."""
    system = AffineAutoregressive.random(2, 10, 3, toughness=0.5, overflow=True, seed=3)
    x0 = torch.zeros(2, 10, 3, dtype=F64)
    x0[1] = 1e3
    res = fp.solve(system, x0, method)
    assert torch.isfinite(res.x).all()
    expected = fp.Status.SUCCESS if isinstance(method, fp.Sequential) else fp.Status.NONFINITE
    assert res.sample_status == (fp.Status.SUCCESS, expected)
    fpt.assert_close(res.x[:1], system.solution()[:1])
    if isinstance(method, fp.Sequential):
        fpt.assert_close(res.x, system.solution())


def test_map_producing_nan_everywhere_after_first_call():
    calls = []

    def F(x):
        calls.append(1)
        y = torch.tanh(torch.roll(x, 1, dims=1))
        y[:, 0] = 0.0
        return y if len(calls) == 1 else torch.full_like(x, math.nan)

    res = fp.solve(F, torch.ones(2, 6, 1, dtype=F64), fp.Jacobi())
    assert res.status is fp.Status.NONFINITE
    assert not res.converged.any()
    assert all(s is fp.Status.NONFINITE for s in res.sample_status)


# ----------------------------------------------------------------------------------------
# Iteration caps
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "method",
    [
        fp.Jacobi(max_iter=2),
        fp.GSJacobi(modules=2, max_iter=2),
        fp.TriangularAnderson(max_iter=2),
        fp.Anderson(max_iter=2, atol=1e-14),
    ],
    ids=repr,
)
def test_max_iter_status_and_throw(method):
    system = MarkovSystem.random(2, 16, 3, toughness=1.0, seed=0)
    x0 = system.noise_guess(seed=1)
    res = fp.solve(system, x0, method)
    assert res.status is fp.Status.MAX_ITER
    assert all(s is fp.Status.MAX_ITER for s in res.sample_status)
    assert not res.converged.any()
    assert res.module_iterations and max(res.module_iterations) <= 2
    with pytest.raises(fp.SolveError) as info:
        fp.solve(system, x0, method, throw=True)
    assert info.value.result.status is fp.Status.MAX_ITER
    message = str(info.value)
    assert message.startswith(f"solve failed: {fp.Status.MAX_ITER.message} (samples 0, 1);")
    assert message.endswith(info.value.result.summary())


def test_throw_does_not_raise_on_success():
    system = MarkovSystem.random(2, 8, 2, seed=0)
    res = fp.solve(system, system.noise_guess(), fp.Jacobi(), throw=True)
    assert res.success


def test_mixed_statuses_per_sample():
    """One sample starts at the solution (converges), the other is capped."""
    system = MarkovSystem.random(2, 16, 3, toughness=1.0, seed=0)
    x0 = system.noise_guess(seed=1)
    x0[0] = fpt.forward_substitution(system, x0)[0]
    res = fp.solve(system, x0, fp.Jacobi(max_iter=2))
    assert res.sample_status == (fp.Status.SUCCESS, fp.Status.MAX_ITER)
    assert res.converged.tolist() == [True, False]
    assert res.status is fp.Status.MAX_ITER


# ----------------------------------------------------------------------------------------
# Causality
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("lookahead", [0, 1])
@pytest.mark.parametrize("position", [0, 1, 5, 10])
def test_check_causal_names_the_first_offending_position(lookahead, position):
    base = AffineAutoregressive.random(2, 12, 3, seed=0)
    system = NonCausalSystem(base, position=position, lookahead=lookahead)
    with pytest.raises(fp.NonCausalError) as info:
        fp.check_causal(system, system.noise_guess())
    assert info.value.position == position
    assert str(position) in str(info.value)
    assert info.value.source == position + lookahead
    with pytest.raises(AssertionError, match="not strictly causal"):
        fpt.assert_causal(system, system.noise_guess())


@pytest.mark.parametrize("lookahead", [0, 1])
@pytest.mark.parametrize("method", TRIANGULAR, ids=ids(TRIANGULAR))
def test_solve_with_check_causality_raises(lookahead, method):
    base = MarkovSystem.random(2, 12, 3, seed=0)
    system = NonCausalSystem(base, position=0, lookahead=lookahead)
    x0 = system.noise_guess()
    with pytest.raises(fp.NonCausalError):
        fp.solve(system, x0, method, check_causality=True)
    # A causal map passes the check and solves normally.
    res = fp.solve(base, x0, method, check_causality=True)
    assert res.success


@pytest.mark.parametrize("method", TRIANGULAR, ids=ids(TRIANGULAR))
def test_causality_probe_is_not_counted_in_the_cost(method):
    system = AttentionAutoregressive.random(2, 10, 2, seed=0)
    x0 = system.noise_guess()
    for F in (system, system.plain()):
        plain = fp.solve(F, x0, method)
        probed = fp.solve(F, x0, method, check_causality=True)
        assert probed.token_evals == plain.token_evals
        assert probed.dependent_steps == plain.dependent_steps
        assert torch.equal(probed.x, plain.x)


def test_check_causal_passes_on_every_system_kind():
    for random in fpt.RANDOM_SYSTEMS.values():
        system = random(2, 9, 3, seed=1)
        fp.check_causal(system, system.noise_guess())
        fpt.assert_causal(system, system.noise_guess())


# ----------------------------------------------------------------------------------------
# Bad arguments
# ----------------------------------------------------------------------------------------
def good():
    system = MarkovSystem.random(2, 6, 3, seed=0)
    return system, system.noise_guess()


@pytest.mark.parametrize(
    "x0, exc, words",
    [
        (torch.zeros(6, 3, dtype=F64), ValueError, "shape"),
        (torch.zeros(1, 2, 6, 3, dtype=F64), ValueError, "shape"),
        (torch.zeros(2, 0, 3, dtype=F64), ValueError, "empty"),
        (torch.zeros(2, 6, 3, dtype=torch.int64), TypeError, "floating"),
        (torch.zeros(2, 6, 3, dtype=torch.bool), TypeError, "floating"),
        (torch.full((2, 6, 3), math.nan, dtype=F64), ValueError, "finite"),
        (torch.full((2, 6, 3), math.inf, dtype=F64), ValueError, "finite"),
        ([[[0.0]]], TypeError, "Tensor"),
    ],
)
def test_bad_initial_guess(x0, exc, words):
    system, _ = good()
    with pytest.raises(exc, match=words):
        fp.solve(system, x0, fp.Jacobi())


def test_initial_guess_with_one_nan_is_rejected():
    system, x0 = good()
    x0[1, 3, 2] = math.nan
    with pytest.raises(ValueError, match="non-finite"):
        fp.solve(system, x0, fp.Sequential())


@pytest.mark.parametrize(
    "F, exc, words",
    [
        (lambda x: x[:, :-1], ValueError, "shape"),
        (
            lambda x: torch.zeros(x.shape[0], x.shape[1], x.shape[2] + 1, dtype=x.dtype),
            ValueError,
            "shape",
        ),
        (lambda x: x.float(), TypeError, "float32"),
        (lambda x: x.numpy(), TypeError, "Tensor"),
    ],
)
@pytest.mark.parametrize("method", [fp.Sequential(), fp.Jacobi(), fp.GSJacobi(modules=2)], ids=repr)
def test_map_returning_the_wrong_thing(F, exc, words, method):
    _, x0 = good()
    with pytest.raises(exc, match=words):
        fp.solve(F, x0, method)


def test_not_a_map_or_not_a_method():
    _, x0 = good()
    with pytest.raises(TypeError, match="callable"):
        fp.solve(3, x0, fp.Jacobi())
    with pytest.raises(TypeError, match="method"):
        fp.solve(lambda x: x, x0, "jacobi")
    with pytest.raises(TypeError, match="method"):
        fp.solve(lambda x: x, x0, fp.Jacobi)


def test_bad_reference():
    system, x0 = good()
    with pytest.raises(ValueError, match="reference"):
        fp.solve(system, x0, fp.Jacobi(), trace=True, reference=x0[:, :3])


@pytest.mark.parametrize(
    "make, exc, words",
    [
        (lambda: fp.GSJacobi(modules=0), ValueError, "modules"),
        (lambda: fp.GSJacobi(modules=-2), ValueError, "modules"),
        (lambda: fp.GSJacobi(modules=2.5), TypeError, "modules"),
        (lambda: fp.GSJacobi(modules=True), TypeError, "modules"),
        (lambda: fp.GSJacobi(modules=[0, 2]), TypeError, "modules"),
        (lambda: fp.GSJacobi(modules=()), ValueError, "start with 0"),
        (lambda: fp.GSJacobi(modules=(1, 3)), ValueError, "start with 0"),
        (lambda: fp.GSJacobi(modules=(0, 4, 2)), ValueError, "increasing"),
        (lambda: fp.GSJacobi(modules=(0, 2, 2)), ValueError, "increasing"),
        (lambda: fp.GSJacobi(modules=(0, 2.0)), TypeError, "int"),
        (lambda: fp.GSJacobi(max_iter=0), ValueError, "max_iter"),
        (lambda: fp.Jacobi(atol=-1e-3), ValueError, "tol"),
        (lambda: fp.Jacobi(rtol=-1.0), ValueError, "rtol"),
        (lambda: fp.Jacobi(atol=math.nan), ValueError, "tol"),
        (lambda: fp.Jacobi(atol=math.inf), ValueError, "tol"),
        (lambda: fp.Jacobi(max_iter=0), ValueError, "max_iter"),
        (lambda: fp.Jacobi(max_iter=2.0), ValueError, "max_iter"),
        (lambda: fp.Anderson(memory=0), ValueError, "memory"),
        (lambda: fp.Anderson(damping=0.0), ValueError, "damping"),
        (lambda: fp.Anderson(damping=1.5), ValueError, "damping"),
        (lambda: fp.Anderson(ridge=-1.0), ValueError, "ridge"),
        (lambda: fp.Anderson(atol=-1.0), ValueError, "tol"),
        (lambda: fp.TriangularAnderson(memory=0), ValueError, "memory"),
        (lambda: fp.TriangularAnderson(ridge=-1.0), ValueError, "ridge"),
        (lambda: fp.TriangularAnderson(atol=-1.0), ValueError, "tol"),
    ],
)
def test_bad_method_parameters(make, exc, words):
    with pytest.raises(exc, match=words):
        make()


@pytest.mark.parametrize(
    "method, words",
    [
        (fp.GSJacobi(modules=7), "exceeds"),
        (fp.GSJacobi(modules=(0, 6)), "outside"),
        (fp.GSJacobi(modules=(0, 3, 9)), "outside"),
    ],
    ids=repr,
)
def test_modules_that_do_not_fit_the_sequence(method, words):
    system, x0 = good()  # T = 6
    with pytest.raises(ValueError, match=words):
        fp.solve(system, x0, method)


# ----------------------------------------------------------------------------------------
# Module layouts
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "T, G, widths",
    [(10, 3, [4, 3, 3]), (10, 4, [3, 3, 2, 2]), (7, 7, [1] * 7), (7, 1, [7]), (5, 2, [3, 2])],
)
def test_module_count_layout(T, G, widths):
    edges = fp.GSJacobi(modules=G).boundaries(T)
    assert [b - a for a, b in zip(edges[:-1], edges[1:])] == widths


@pytest.mark.parametrize("T", [1, 2, 5, 13])
def test_gsjacobi_extremes_are_jacobi_and_sequential(T):
    system = AffineAutoregressive.random(3, T, 2, toughness=1.0, seed=T)
    x0 = system.noise_guess(seed=1)
    one = fp.solve(system, x0, fp.GSJacobi(modules=1))
    jac = fp.solve(system, x0, fp.Jacobi())
    assert torch.equal(one.x, jac.x)
    assert one.iterations == jac.iterations and one.token_evals == jac.token_evals
    every = fp.solve(system, x0, fp.GSJacobi(modules=T))
    seq = fp.solve(system, x0, fp.Sequential())
    assert torch.equal(every.x, seq.x)
    assert every.dependent_steps == seq.dependent_steps == T


# ----------------------------------------------------------------------------------------
# Exact costs on small cases
# ----------------------------------------------------------------------------------------
def test_costs_sequential_plain_and_incremental():
    system = AttentionAutoregressive.random(3, 10, 2, seed=0)
    x0 = system.noise_guess()
    plain = fp.solve(system.plain(), x0, fp.Sequential())
    inc = fp.solve(system, x0, fp.Sequential())
    # The plain map recomputes position 0 (a constant) at step 0; the incremental map
    # needs no network call for it, so that step is not a dependent one.
    assert plain.dependent_steps == 10 and inc.dependent_steps == 9
    assert plain.token_evals == 10 * 3 * 10
    assert inc.token_evals == 3 * 9
    fpt.assert_close(plain.x, inc.x)


def test_costs_jacobi_from_the_solution_is_one_iteration():
    system = MarkovSystem.random(2, 9, 2, seed=0)
    x0 = fpt.forward_substitution(system, system.empty())
    res = fp.solve(system, x0, fp.Jacobi())
    assert res.iterations == 1 and res.dependent_steps == 1
    assert res.token_evals == 2 * 9
    assert torch.equal(res.x, x0)


def test_costs_jacobi_needs_all_T_iterations_on_a_chain():
    """x_t = x_{t-1} + 1 from zeros: Jacobi fixes exactly one more position per step."""

    def F(x):
        y = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1) + 1.0
        return y

    T = 7
    res = fp.solve(F, torch.zeros(2, T, 1, dtype=F64), fp.Jacobi(), trace=True)
    assert res.success
    assert res.iterations == T and res.dependent_steps == T
    assert res.token_evals == T * 2 * T
    assert torch.equal(res.x[0, :, 0], torch.arange(1, T + 1, dtype=F64))
    gs = fp.solve(F, torch.zeros(2, T, 1, dtype=F64), fp.GSJacobi(modules=(0, 3)))
    assert gs.module_iterations == (3, 4)
    assert gs.dependent_steps == 7 and gs.token_evals == 7 * 2 * T


def test_trace_errors_with_reference_reach_zero():
    system = LinearSystem.random(2, 12, 2, toughness=1.0, seed=0)
    x0 = system.noise_guess(seed=4)
    ref = fpt.forward_substitution(system, x0)
    res = fp.solve(system, x0, fp.Jacobi(), trace=True, reference=ref)
    assert len(res.trace) == res.iterations
    assert float(res.trace[-1].error.max()) == 0.0
    assert float(res.trace[0].error.max()) > 0.0
    # The residual of each row is the max-abs change of the iterate in that iteration.
    manual = x0.clone()
    for row in res.trace[:3]:
        new = system(manual)
        assert torch.allclose(row.residual, (new - manual).abs().amax((1, 2)), rtol=0, atol=1e-12)
        manual = new
    no_ref = fp.solve(system, x0, fp.Jacobi(), trace=True)
    assert all(row.error is None for row in no_ref.trace)


# ----------------------------------------------------------------------------------------
# Adversarial starts and larger cases
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", TRIANGULAR, ids=ids(TRIANGULAR))
def test_start_consistent_with_a_wrong_prefix(method):
    """x0 satisfies x_t = F(x0)_t for every t > 0 but has a wrong x_0: every position
    after 0 has a zero first update, yet none of them is correct."""
    system = MarkovSystem.random(2, 9, 2, toughness=1.0, seed=0)
    x0 = system.solution()
    x0[:, 0] += 1.0
    for t in range(1, 9):
        x0[:, t] = system(x0)[:, t]
    res = fp.solve(system, x0, method)
    assert res.success
    fpt.assert_close(res.x, system.solution())


@pytest.mark.parametrize("tol", [1e-3, 1e-8])
def test_tolerance_stops_early_within_the_contraction_bound(tol):
    """x_t = tanh(q x_{t-1}) + z_t with |q| = 1/2: a tolerance stops Jacobi early, and the
    error obeys E_t <= q (E_{t-1} + tol) <= tol q / (1 - q) = tol (see
    test_solvers_tolerance for the derivation); exact tolerances run to finite
    termination."""
    T = 64
    q = torch.tensor([[0.5]], dtype=F64)
    z = torch.linspace(-1, 1, 4 * T, dtype=F64).reshape(4, T, 1)
    system = MarkovSystem(q, torch.zeros(1, dtype=F64), z)
    x0 = torch.zeros(4, T, 1, dtype=F64)
    exact = fp.solve(system, x0, fp.Jacobi(atol=0.0, rtol=0.0))
    loose = fp.solve(system, x0, fp.Jacobi(atol=tol, rtol=0.0))
    assert exact.success and loose.success
    assert loose.iterations < exact.iterations <= T
    error = float((loose.x - system.solution()).abs().max())
    assert 0 < error <= tol * 0.5 / (1 - 0.5)


@pytest.mark.slow
@pytest.mark.parametrize("incremental", [True, False])
def test_attention_T256_every_method(incremental):
    system = AttentionAutoregressive.random(2, 256, 4, toughness=1.0, seed=0)
    F = system if incremental else system.plain()
    x0 = system.noise_guess(seed=1)
    sol = system.solution()
    for method in (fp.Sequential(), fp.GSJacobi(modules=5), fp.Jacobi(), fp.TriangularAnderson()):
        res = fp.solve(F, x0, method)
        assert res.success, (method, res.summary())
        fpt.assert_close(res.x, sol, what=str(method))
    assert fp.solve(F, x0, fp.Sequential()).token_evals == (
        2 * 255 if incremental else 2 * 256 * 256
    )


@pytest.mark.parametrize("method", TRIANGULAR, ids=ids(TRIANGULAR))
def test_trace_error_is_measured_after_the_iteration(method):
    """Row i's error is the distance of the iterate *after* iteration i."""
    T = 9
    x0 = torch.zeros(1, T, 1, dtype=F64)
    ref = torch.ones_like(x0)
    res = fp.solve(lambda x: torch.ones_like(x), x0, method, trace=True, reference=ref)
    assert res.success and torch.equal(res.x, ref)
    assert float(res.trace[-1].error[0]) == 0.0
    if isinstance(method, fp.Sequential):
        # After step t, positions 0..t are exact: the error vanishes only at the end.
        assert [float(r.error[0]) for r in res.trace] == [1.0] * (T - 1) + [0.0]
        assert [float(r.residual[0]) for r in res.trace] == [1.0] * T

"""Non-zero tolerances: what freezes when, how far the answer may be, per-position tensors.

The frozen-prefix methods (Jacobi, GS-Jacobi, triangular Anderson, and the user-written
damped Jacobi of test_solvers_contract) share one stopping rule: in each iteration a
sample freezes its first unfrozen position ``p`` (its inputs are final) and then every
following position whose update met the tolerance, up to and including the first one
that did not (its inputs have all settled).  A frozen position keeps its plain value
``F(x)`` of that iteration.  The tests below observe this from outside, through a map
that records every evaluation, and derive the error it allows.

**The error bound.**  Let ``l_ts`` bound how much ``F_t`` moves per unit change of
``x_s`` (max-norm Lipschitz constants; ``l_ts = 0`` for ``s >= t``).  Position ``t``
froze at ``F_t(x^k)`` for the iterate ``x^k`` of its freezing iteration, whose earlier
positions ``s`` were either final (frozen before) or frozen in the same iteration after
meeting the tolerance, ``|x^k_s - x_s| <= tau_s`` with ``tau_s = max_c (atol_s + rtol_s
|x_sc|)`` (the default tolerance: ``tau_s = 4 eps max_c |x_sc|``).  So the error ``E_t =
max_c |x_t - x*_t|`` obeys ``E_t <= sum_{s<t} l_ts (E_s + tau_s)``, which is the bound
checked, computed by that recursion (plus the documented float64 agreement
``1e-10 max(1, |x*|)`` for rounding).  For a linear system ``x = L x + b`` (nilpotent
``L``) ``l_ts`` is the max-norm of block ``L_ts``; for the Markov system ``x_t =
tanh(x_{t-1} A + c) + z_t`` it is ``q = max_j sum_i |A_ij|`` for ``s = t - 1`` and 0
otherwise, so with a contraction ``q < 1`` the bound is at most ``max tau * q / (1 - q)``.
"""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_solvers_contract import DAMPINGS, DampedJacobi, Recorder, plain

import fixedpoint as fp
from fixedpoint import testing as fpt
from fixedpoint.precision import NOISE_FLOOR_ULPS
from fixedpoint.testing.systems import LinearSystem, MarkovSystem

EXAMPLES = settings.default.max_examples
F64 = torch.float64


# ---- strategies ------------------------------------------------------------------------
def prefix_methods(T: int, tol: dict):
    """A frozen-prefix method with tolerances ``tol``."""
    return st.one_of(
        st.just(fp.Jacobi(**tol)),
        st.integers(1, T).map(lambda g: fp.GSJacobi(modules=g, **tol)),
        st.integers(1, 4).map(lambda m: fp.TriangularAnderson(memory=m, **tol)),
        st.sampled_from(DAMPINGS).map(lambda b: DampedJacobi(damping=b, **tol)),
    )


@st.composite
def tolerances(draw, length: int, smallest: float = 1e-9):
    """``{"atol": ..., "rtol": ...}``: the default, floats, or 1-D tensors over positions,
    each at least ``smallest`` when positive (above the rounding floor)."""
    exponent = st.floats(math.log10(smallest), -1.0)
    value = exponent.map(lambda e: 10.0**e)
    shape = draw(st.sampled_from(("default", "atol", "rtol", "both", "tensor")))
    if shape == "default":
        return {}
    if shape == "tensor":
        values = draw(st.lists(st.just(0.0) | value, min_size=length, max_size=length))
        return {"atol": torch.tensor(values, dtype=F64), "rtol": draw(st.just(0.0) | value)}
    return {
        "atol": draw(value) if shape in ("atol", "both") else 0.0,
        "rtol": draw(value) if shape in ("rtol", "both") else 0.0,
    }


def per_position(value, length: int) -> torch.Tensor:
    """A tolerance as a ``(T, 1)`` tensor (floats broadcast)."""
    if isinstance(value, torch.Tensor):
        return value.to(F64)[:, None]
    return torch.full((length, 1), float(value or 0.0), dtype=F64)


def allowance(tol: dict, x: torch.Tensor, eps: float) -> torch.Tensor:
    """``tau``: per sample and position, the largest update the tolerance accepts when
    the new value is ``x`` (``(B, T)``; see the module docstring)."""
    T = x.shape[1]
    if not tol:
        return NOISE_FLOOR_ULPS * eps * x.abs().amax(-1)
    atol, rtol = per_position(tol.get("atol"), T), per_position(tol.get("rtol"), T)
    return (atol + rtol * x.abs()).amax(-1)


def settled(x_old: torch.Tensor, f: torch.Tensor, lo: int, tol: dict, length: int,
            eps: float) -> torch.Tensor:
    """Per sample and window position (the window starts at ``lo``): did the update
    ``x_old -> f`` meet ``tol``?  (Same arithmetic as the definition in the README:
    ``|f - x_old| - rtol |f| - atol <= 0``; the default: ``max |f - x_old| <= 4 eps max |f|``.)"""
    window = slice(lo, lo + f.shape[1])
    if not tol:
        d = (f - x_old).abs().amax(-1)
        return d <= NOISE_FLOOR_ULPS * eps * f.abs().amax(-1)
    d = (f - x_old).abs()
    atol = per_position(tol.get("atol"), length)[window].to(f.dtype)
    rtol = per_position(tol.get("rtol"), length)[window].to(f.dtype)
    return ((d - rtol * f.abs()) - atol).amax(-1) <= 0


def freezing(recorder: Recorder, length: int):
    """For a single-sample solve: per evaluation ``(lo, end, x, f, frozen_until)``, where
    positions ``lo .. frozen_until - 1`` froze in it (the next evaluation of the same
    module starts at ``frozen_until``; a module's last evaluation freezes the rest)."""
    calls = recorder.calls
    out = []
    for k, (lo, end, x, f) in enumerate(calls):
        nxt = calls[k + 1] if k + 1 < len(calls) else None
        until = nxt[0] if nxt is not None and nxt[1] == end else end
        out.append((lo, end, x, f, until))
    return out


def lipschitz(system) -> torch.Tensor:
    """``l_ts``, ``(T, T)``: max-norm Lipschitz constants of ``F_t`` in ``x_s``."""
    T, d = system.length, system.dim
    if isinstance(system, LinearSystem):
        return system.L.abs().double().reshape(T, d, T, d).sum(3).amax(1)
    assert isinstance(system, MarkovSystem)
    q = float(system.A.abs().double().sum(0).max())
    return q * torch.diag(torch.ones(T - 1, dtype=F64), -1)


def error_bound(system, tau: torch.Tensor) -> torch.Tensor:
    """``E_t <= sum_{s<t} l_ts (E_s + tau_s)`` per sample, ``(B, T)``."""
    ell = lipschitz(system)
    bound = torch.zeros_like(tau)
    for t in range(system.length):
        bound[:, t] = ((bound[:, :t] + tau[:, :t]) * ell[t, :t]).sum(1)
    return bound


# ---- 1. what freezes, and when ---------------------------------------------------------
@settings(max_examples=EXAMPLES)
@given(fpt.systems(max_length=48, max_batch=1, max_dim=6, dtypes=(F64, torch.float32)),
       st.data())
def test_each_frozen_position_met_the_tolerance_when_it_froze(system, data):
    """Observed from the evaluations of a one-sample solve (window start = the sample's
    first unfrozen position): in every iteration the positions that froze, except the
    last of them, met the tolerance; the last is the first one that did not (unless the
    window ran out); at least one position froze; and a frozen position keeps the plain
    value ``F(x)`` of the iteration it froze in."""
    T = system.length
    smallest = 1e-9 if system.dtype == F64 else 1e-5
    tol = data.draw(tolerances(T, smallest), label="tol")
    method = data.draw(prefix_methods(T, tol), label="method")
    x0 = data.draw(fpt.initial_guesses(system), label="x0")
    recorder = Recorder(plain(system))
    res = fp.solve(recorder, x0, method)
    assert res.success, res.summary()
    eps = torch.finfo(system.dtype).eps
    for lo, end, x, f, until in freezing(recorder, T):
        assert lo < until <= end, "an iteration froze nothing"
        met = settled(x[:, lo:end], f, lo, tol, T, eps)[0]  # (window,)
        assert met[: until - 1 - lo].all(), (lo, until, met)
        if until < end:
            assert not met[until - 1 - lo], f"position {until - 1} froze, {until} did not"
        assert torch.equal(res.x[:, lo:until], f[:, : until - lo])


@settings(max_examples=EXAMPLES)
@given(fpt.solver_cases(method_kinds=("sequential",), max_length=64, max_batch=4, max_dim=6),
       st.data())
def test_a_tolerance_never_costs_iterations(case, data):
    """iterations(tol) <= iterations(0), per module and per sample, for any tolerance."""
    T = case.system.length
    tol = data.draw(tolerances(T), label="tol")
    method = data.draw(prefix_methods(T, tol), label="method")
    exact = fp.solve(case.F, case.x0, type(method)(**{**_fields(method), **fpt.EXACT}))
    loose = fp.solve(case.F, case.x0, method)
    assert loose.success and exact.success
    assert loose.iterations <= exact.iterations
    assert all(a <= b for a, b in zip(loose.module_iterations, exact.module_iterations))
    assert all(a <= b for a, b in zip(loose.sample_iterations, exact.sample_iterations))


def _fields(method):
    return {k: getattr(method, k) for k in method.__dataclass_fields__}


# ---- 2. the error bound ----------------------------------------------------------------
@settings(max_examples=EXAMPLES)
@given(fpt.systems(kinds=("linear", "markov"), max_length=64, max_batch=4, max_dim=6),
       st.data())
def test_final_error_is_within_the_derived_bound(system, data):
    """``|x_t - x*_t| <= sum_{s<t} l_ts (E_s + tau_s)`` (module docstring), on nilpotent
    linear systems and on Markov systems with Lipschitz constant ``q`` (drawn up to the
    strategy's cap, so ``q`` may exceed 1: the bound is finite for any ``T``)."""
    T = system.length
    tol = data.draw(tolerances(T), label="tol")
    method = data.draw(prefix_methods(T, tol), label="method")
    x0 = data.draw(fpt.initial_guesses(system), label="x0")
    res = fp.solve(system, x0, method)
    assert res.success, res.summary()
    sol = system.solution()
    error = (res.x - sol).abs().amax(-1)
    tau = allowance(tol, res.x, torch.finfo(system.dtype).eps)
    bound = error_bound(system, tau)
    rounding = fpt.default_rtol(F64) * sol.abs().amax(-1).clamp(min=1.0)
    assert (error <= bound + rounding).all(), float((error - bound).max())


def test_the_bound_is_tight_enough_to_matter():
    """On a scalar chain ``x_t = q x_{t-1} + 1`` the bound is ``tau q / (1 - q)``-like and
    the error reaches a good part of it: the check would catch an error of a few tau."""
    T, q, tau = 40, 0.5, 1e-4
    system = MarkovSystem(torch.full((1, 1), q, dtype=F64), torch.zeros(1, dtype=F64),
                          torch.ones(1, T, 1, dtype=F64))
    res = fp.solve(system, torch.zeros(1, T, 1, dtype=F64), fp.Jacobi(atol=tau, rtol=0.0))
    error = (res.x - system.solution()).abs().amax(-1)
    bound = error_bound(system, allowance({"atol": tau, "rtol": 0.0}, res.x, 0.0))
    assert float(bound.max()) <= 2 * tau * q / (1 - q)  # tanh' <= 1: about tau q/(1-q)
    assert float(error.max()) > 0.05 * float(bound.max())
    assert res.iterations < T


# ---- 3. per-position tolerance tensors ---------------------------------------------------
@settings(max_examples=EXAMPLES)
@given(fpt.solver_cases(method_kinds=("sequential",), max_length=48, max_batch=4, max_dim=6),
       st.floats(-9, -1), st.floats(-9, -1) | st.just(-math.inf), st.data())
def test_constant_tolerance_tensors_equal_the_scalar_case(case, log_atol, log_rtol, data):
    """``atol=torch.full((T,), a)`` is ``atol=a`` to the bit, for every method."""
    T = case.system.length
    a, r = 10.0**log_atol, 10.0**log_rtol
    scalar = {"atol": a, "rtol": r}
    tensor = {"atol": torch.full((T,), a, dtype=F64), "rtol": torch.full((T,), r, dtype=F64)}
    kind = data.draw(st.sampled_from(("prefix", "anderson")), label="kind")
    if kind == "anderson":
        memory = data.draw(st.integers(1, 5))
        methods = [fp.Anderson(memory=memory, max_iter=4 * T, **t) for t in (scalar, tensor)]
    else:
        one = data.draw(prefix_methods(T, scalar), label="method")
        methods = [one, type(one)(**{**_fields(one), **tensor})]
    a_res, t_res = (fp.solve(case.F, case.x0, m) for m in methods)
    assert torch.equal(a_res.x, t_res.x)
    assert a_res.sample_status == t_res.sample_status
    assert a_res.sample_iterations == t_res.sample_iterations
    assert a_res.module_iterations == t_res.module_iterations


@settings(max_examples=EXAMPLES)
@given(fpt.systems(max_length=48, min_length=2, max_batch=1, max_dim=6), st.data())
def test_a_loose_tolerance_on_late_positions_only_freezes_them_earlier(system, data):
    """Tight (exact) tolerance before position ``m``, loose from ``m`` on, against exact
    everywhere: positions before ``m`` get the same bits and freeze in the same iterations;
    positions from ``m`` on freeze no later; and no run takes more iterations."""
    T = system.length
    m = data.draw(st.integers(1, T - 1), label="m")
    loose = 10.0 ** data.draw(st.floats(-6, -1), label="log loose")
    atol = torch.zeros(T, dtype=F64)
    atol[m:] = loose
    method = data.draw(prefix_methods(T, fpt.EXACT), label="method")
    x0 = data.draw(fpt.initial_guesses(system), label="x0")
    runs = {}
    for name, tol in (("exact", fpt.EXACT), ("late", {"atol": atol, "rtol": 0.0})):
        recorder = Recorder(plain(system))
        res = fp.solve(recorder, x0, type(method)(**{**_fields(method), **tol}))
        assert res.success
        froze_at = torch.zeros(T, dtype=torch.long)
        for k, (lo, _, _, _, until) in enumerate(freezing(recorder, T)):
            froze_at[lo:until] = k
        runs[name] = res, froze_at
    (exact, f_exact), (late, f_late) = runs["exact"], runs["late"]
    assert torch.equal(late.x[:, :m], exact.x[:, :m])
    assert torch.equal(f_late[:m], f_exact[:m])
    assert (f_late[m:] <= f_exact[m:]).all(), (f_late, f_exact)
    assert late.iterations <= exact.iterations

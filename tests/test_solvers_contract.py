"""Contracts every method keeps, including one written outside the package.

* A user-written method (damped Jacobi on ``fp.PrefixMethod``, below) runs through
  ``fp.solve`` and ``fixedpoint.testing.assert_matches_sequential``.
* Every method reaches the sequential solution with its default tolerance.
* One failure contract for every method (Sequential and Anderson included): a sample
  whose map value turns non-finite ends NONFINITE, the others are unaffected (bit for bit
  the result of solving them alone, and the sequential solution), ``x`` is finite
  everywhere and holds the poisoned sample's last finite iterate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fixedpoint as fp
from fixedpoint import testing as fpt
from fixedpoint.testing.systems import PoisonedSystem


# ---- a method written outside the package (the README's second example) ----------------
@dataclass(frozen=True)
class DampedJacobi(fp.PrefixMethod):
    """Jacobi with damping: an unsettled position takes ``x + damping * (F(x) - x)``.

    Built on ``fp.PrefixMethod``, which freezes every position whose inputs have settled
    at its plain value ``F(x)``, so damping slows the unsettled positions down but keeps
    Jacobi's finite termination (at most ``T`` iterations) and its tolerances.
    """

    damping: float = 0.5
    atol: float | torch.Tensor | None = None
    rtol: float | torch.Tensor | None = None
    max_iter: int | None = None

    def __post_init__(self):
        if not 0 < self.damping <= 1:
            raise ValueError(f"damping must be in (0, 1], got {self.damping!r}")

    def proposer(self, problem, lo0, hi):
        return self  # stateless: this object is its own proposer

    def propose(self, x, f, lo, unfrozen, first):
        return x + self.damping * (f - x)


# ---------------------------------------------------------------------------------------
EXAMPLES = settings.default.max_examples
PLAIN_KINDS = ("linear", "affine", "markov")
DAMPINGS = (1.0, 0.7, 0.3)


def test_user_method_is_a_method_and_validates():
    method = DampedJacobi(damping=0.3, atol=1e-9)
    assert isinstance(method, fp.Method)
    assert method.describe() == "DampedJacobi(damping=0.3, atol=1e-09)"
    try:
        DampedJacobi(damping=0.0)
    except ValueError as e:
        assert "damping" in str(e)
    else:
        raise AssertionError("damping=0 accepted")


@settings(max_examples=EXAMPLES)
@given(fpt.solver_cases(method_kinds=("sequential",), max_length=48, max_batch=4, max_dim=6),
       st.sampled_from(DAMPINGS), st.booleans())
def test_user_written_damped_jacobi_matches_sequential(case, damping, exact):
    """Through ``fp.solve`` and ``assert_matches_sequential``, on every kind of system and
    both evaluation paths; exact tolerances end within ``T`` iterations (finite
    termination survives the damping), the default ones at the rounding level."""
    tol = fpt.EXACT if exact else {}
    method = DampedJacobi(damping=damping, **tol)
    res = fpt.assert_matches_sequential(case.F, case.x0, method,
                                        reference=case.system.solution())
    assert res.iterations <= case.system.length
    if damping == 1.0:  # no damping: Jacobi up to rounding (x + (f - x) need not be f)
        jacobi = fp.solve(case.F, case.x0, fp.Jacobi(**tol))
        fpt.assert_close(res.x, jacobi.x, what="DampedJacobi(1.0) vs Jacobi")


# ---- defaults ------------------------------------------------------------------------
DEFAULT_METHODS = {
    "jacobi": lambda T: st.just(fp.Jacobi()),
    "gsjacobi": lambda T: st.integers(1, T).map(lambda g: fp.GSJacobi(modules=g)),
    "triangular_anderson": lambda T: st.integers(1, 5).map(
        lambda m: fp.TriangularAnderson(memory=m)),
    "damped": lambda T: st.sampled_from(DAMPINGS).map(lambda b: DampedJacobi(damping=b)),
}


@settings(max_examples=EXAMPLES)
@given(st.sampled_from(sorted(DEFAULT_METHODS)),
       fpt.solver_cases(method_kinds=("sequential",), max_length=64, max_batch=4,
                        max_dim=6, dtypes=(torch.float64, torch.float32)),
       st.data())
def test_every_method_with_default_tolerances_reaches_the_sequential_solution(kind, case,
                                                                               data):
    """The default tolerance (rounding level at the iterate's scale) ends within ``T``
    iterations at the sequential solution, to the documented agreement tolerance."""
    method = data.draw(DEFAULT_METHODS[kind](case.system.length))
    res = fpt.assert_matches_sequential(case.F, case.x0, method,
                                        reference=case.system.solution())
    assert res.iterations <= case.system.length
    exact = fp.solve(case.F, case.x0, method.__class__(
        **{**_fields(method), **fpt.EXACT}))
    assert res.iterations <= exact.iterations


@settings(max_examples=EXAMPLES)
@given(fpt.solver_cases(method_kinds=("sequential",), max_length=40, max_batch=4,
                        max_dim=6, max_toughness=1.0),
       st.integers(1, 6))
def test_anderson_with_default_tolerance_reaches_the_sequential_solution(case, memory):
    """Global Anderson has no finite termination: with its default tolerance and a cap
    of ``8 T`` it converges on mild systems, to the sequential solution."""
    method = fp.Anderson(memory=memory, max_iter=8 * case.system.length)
    fpt.assert_matches_sequential(case.F, case.x0, method, reference=case.system.solution())


def _fields(method):
    return {k: getattr(method, k) for k in method.__dataclass_fields__}


# ---- one failure contract ------------------------------------------------------------
def _methods(T: int, anderson: bool):
    exact = st.sampled_from(fpt.EXACT_METHOD_KINDS).flatmap(
        lambda k: fpt.METHODS[k](T, torch.float64))
    defaults = st.sampled_from(sorted(DEFAULT_METHODS)).flatmap(lambda k: DEFAULT_METHODS[k](T))
    choices = exact | defaults | st.sampled_from(DAMPINGS).map(lambda b: DampedJacobi(b))
    if anderson:
        choices = choices | fpt.METHODS["anderson"](T, torch.float64)
    return choices


@st.composite
def poisoned_cases(draw):
    base = draw(fpt.systems(kinds=PLAIN_KINDS + ("attention",), max_length=32, min_length=1,
                            max_batch=5, max_dim=4, max_toughness=1.0))
    B, T, _ = base.shape
    samples = draw(st.lists(st.integers(0, B - 1), min_size=1, max_size=B, unique=True))
    positions = [draw(st.integers(0, T - 1)) for _ in samples]
    value = draw(st.sampled_from((float("nan"), float("inf"), -float("inf"))))
    system = PoisonedSystem(base, samples, positions, value)
    x0 = draw(fpt.initial_guesses(base))
    method = draw(_methods(T, anderson=True))
    return base, system, x0, method


class Recorder(fp.PlainMap):
    """A plain map that keeps every evaluation: window, input, output on the window."""

    def __init__(self, fn):
        super().__init__(fn)
        self.calls: list[tuple[int, int, torch.Tensor, torch.Tensor]] = []

    def advance(self, state, x, lo, hi):
        f = super().advance(state, x, lo, hi)
        self.calls.append((lo, hi, x.clone(), f.clone()))
        return f


def plain(system):
    """The system as a plain map (attention systems are also incremental)."""
    return system.plain() if isinstance(system, fp.IncrementalMap) else system


@settings(max_examples=EXAMPLES)
@given(poisoned_cases())
def test_failure_contract_for_every_method(case):
    base, system, x0, method = case
    B, T, _ = base.shape
    bad = sorted(system.poisoned)
    good = [b for b in range(B) if b not in system.poisoned]
    recorder = Recorder(system)
    res = fp.solve(recorder, x0, method)

    assert torch.isfinite(res.x).all(), "a non-finite value reached x"
    assert res.status is fp.Status.NONFINITE
    for b in bad:
        assert res.sample_status[b] is fp.Status.NONFINITE and not res.converged[b]
    # The other samples are unaffected: bit for bit what they get alone, and sequential.
    if good:
        alone = fp.solve(plain(base.select(good)), x0[good], method)
        assert all(res.sample_status[b] is fp.Status.SUCCESS for b in good), res.sample_status
        assert torch.equal(res.x[good], alone.x)
        assert [res.sample_iterations[b] for b in good] == list(alone.sample_iterations)
        fpt.assert_close(res.x[good], base.solution()[good], what=str(method))
    # The poisoned samples keep their last finite iterate.
    for b in bad:
        if isinstance(method, fp.Sequential):
            # Forward substitution: the solved positions before the first non-finite
            # value, the initial guess from there on (later positions read the bad one).
            t = system.poisoned[b]
            sequential = fp.solve(plain(base.select([b])), x0[b : b + 1], method).x[0]
            assert torch.equal(res.x[b, :t], sequential[:t])
            assert torch.equal(res.x[b, t:], x0[b, t:])
        else:
            # The input of the first evaluation whose output is non-finite for b.
            first = next(x for _, _, x, f in recorder.calls if not torch.isfinite(f[b]).all())
            assert torch.equal(res.x[b], first[b])


def test_failure_contract_keeps_solved_modules_of_a_poisoned_sample():
    """GS-Jacobi: modules before the poisoned one are solved exactly (the sequential
    values), the poisoned module and later ones keep the initial guess."""
    base = fpt.RANDOM_SYSTEMS["affine"](2, 12, 3, seed=4)
    system = PoisonedSystem(base, sample=1, position=9)
    x0 = base.noise_guess(seed=2)
    res = fp.solve(system, x0, fp.GSJacobi(modules=(0, 4, 8), **fpt.EXACT))
    assert res.sample_status == (fp.Status.SUCCESS, fp.Status.NONFINITE)
    sequential = fp.solve(base, x0, fp.Sequential()).x
    assert torch.equal(res.x[1, :8], sequential[1, :8])
    assert torch.equal(res.x[1, 8:], x0[1, 8:])
    assert torch.equal(res.x[0], sequential[0])


def test_readme_prefix_method_example_runs():
    """The README's damped Jacobi on fp.PrefixMethod (section "Synthetic systems and
    property-based testing") is this file's method: it runs and matches sequential."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("## Synthetic systems and property-based testing", 1)[1]
    section = section.split("\n## ", 1)[0]
    (code,) = [c for c in re.findall(r"```python\n(.+?)\n```", section, flags=re.S)
               if "PrefixMethod" in c]
    namespace = {"dataclass": dataclass, "fp": fp, "torch": torch}
    exec(compile(code, "README.md (DampedJacobi)", "exec"), namespace)
    method = namespace["DampedJacobi"](damping=0.6, atol=0.0, rtol=0.0)
    system = fpt.RANDOM_SYSTEMS["affine"](3, 20, 2, seed=5)
    res = fpt.assert_matches_sequential(system, system.noise_guess(seed=1), method)
    assert res.iterations <= 20

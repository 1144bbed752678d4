"""Level scheduling (fp.LevelSchedule) and the dependency-level probe.

Properties on synthetic systems with random sparse dependency graphs: the schedule equals
the sequential solution; its dependent steps equal the longest dependency chain (found
independently, as the nilpotency index of the dependency pattern); for linear systems
that is the nilpotency index of the matrix; every position is evaluated exactly once,
after everything it reads.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fixedpoint as fp
from fixedpoint import testing as fpt
from fixedpoint.finc import FInCConv, FInCUnit, Layout
from fixedpoint.levels_probe import (
    check_levels,
    dependency_levels,
    dependency_matrix,
    levels_from_dependencies,
)
from fixedpoint.methods.levels import LevelSchedule
from fixedpoint.testing.systems import LinearSystem, MarkovSystem, NonCausalSystem, PoisonedSystem

F64 = torch.float64


def _pattern(length: int, density: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.tril(torch.rand(length, length, generator=g) < density, -1)


def _sparse_linear(length: int, dim: int, density: float, seed: int, batch: int = 2):
    """``x = L x + b`` whose position graph is a random DAG (blocks zero off the pattern)."""
    g = torch.Generator().manual_seed(seed + 1)
    pattern = _pattern(length, density, seed)
    blocks = torch.randn(length, dim, length, dim, generator=g, dtype=F64)
    L = (blocks * pattern[:, None, :, None]).reshape(length * dim, length * dim)
    L = 0.7 * L / max(1.0, float(pattern.sum(1).max()) ** 0.5)
    b = torch.randn(batch, length, dim, generator=g, dtype=F64)
    return LinearSystem(L, b), pattern


class SparseTanhSystem:
    """``x_t = tanh(sum_{s in deps(t)} x_s A_ts) + z_t``: nonlinear, on a random DAG."""

    def __init__(self, length: int, dim: int, density: float, seed: int, batch: int = 2):
        g = torch.Generator().manual_seed(seed + 2)
        self.pattern = _pattern(length, density, seed)
        self.A = torch.randn(length, length, dim, dim, generator=g, dtype=F64)
        self.A = self.A * self.pattern[..., None, None]
        self.z = torch.randn(batch, length, dim, generator=g, dtype=F64)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(torch.einsum("bsi,tsij->btj", x, self.A)) + self.z


def _nilpotency_index(A: torch.Tensor) -> int:
    """Smallest k with A^k = 0, by repeated products (A's zero pattern is exact)."""
    n = A.shape[0]
    power = torch.eye(n, dtype=A.dtype)
    for k in range(1, n + 2):
        power = power @ A
        if not bool((power != 0).any()):
            return k
    raise AssertionError("not nilpotent")


systems = st.tuples(
    st.integers(1, 18),                              # T
    st.integers(1, 3),                               # d
    st.sampled_from([0.0, 0.08, 0.25, 0.6, 1.0]),    # density of the dependency graph
    st.integers(0, 10_000),                          # seed
)


@given(systems)
def test_level_schedule_on_sparse_linear_systems(case):
    length, dim, density, seed = case
    system, pattern = _sparse_linear(length, dim, density, seed)
    x0 = system.noise_guess(seed=seed)
    deps = dependency_matrix(system, x0)
    assert torch.equal(deps, pattern)  # every non-zero block is found, nothing else
    levels = levels_from_dependencies(deps)
    result = fpt.assert_matches_sequential(system, x0, LevelSchedule(levels=levels))
    chain = _nilpotency_index(pattern.double())   # longest chain, found independently
    assert result.dependent_steps == int(levels.max()) == chain
    assert result.dependent_steps == _nilpotency_index(system.L)  # the matrix's index
    fpt.assert_close(result.x, system.solution())


@given(systems)
def test_level_schedule_on_sparse_nonlinear_systems(case):
    length, dim, density, seed = case
    system = SparseTanhSystem(length, dim, density, seed)
    x0 = torch.zeros(2, length, dim, dtype=F64)
    levels = dependency_levels(system, torch.randn(2, length, dim, dtype=F64))
    assert int(levels.max()) == _nilpotency_index(system.pattern.double())
    result = fpt.assert_matches_sequential(system, x0, LevelSchedule(levels=levels))
    assert result.dependent_steps == int(levels.max())
    assert result.status is fp.Status.SUCCESS


@given(systems)
def test_jacobi_is_exact_after_as_many_iterations_as_levels(case):
    length, dim, density, seed = case
    system, _ = _sparse_linear(length, dim, density, seed)
    x0 = system.noise_guess(seed=seed + 3)
    levels = int(dependency_levels(system, x0).max())
    jacobi = fp.solve(system, x0, fp.Jacobi(max_iter=levels, atol=0.0, rtol=0.0))
    fpt.assert_close(jacobi.x, system.solution())


class RecordingMap(fp.PlainMap):
    """A map that can evaluate position sets and records what it was asked for."""

    def __init__(self, system):
        super().__init__(system)
        self.system = system
        self.requests: list[list[int]] = []

    def evaluate_at(self, x, positions):
        self.requests.append(positions.tolist())
        return self.system(x)[:, positions]


@given(systems)
def test_every_position_is_evaluated_once_after_everything_it_reads(case):
    length, dim, density, seed = case
    system, pattern = _sparse_linear(length, dim, density, seed)
    levels = levels_from_dependencies(pattern)
    fmap = RecordingMap(system)
    result = fp.solve(fmap, system.noise_guess(), LevelSchedule(levels=levels))
    flat = [t for level in fmap.requests for t in level]
    assert sorted(flat) == list(range(length))
    assert result.token_evals == system.batch * length  # no wasted evaluation
    done: set[int] = set()
    for request in fmap.requests:
        for t in request:
            assert set(pattern[t].nonzero().flatten().tolist()) <= done
        done |= set(request)


def test_chains_need_one_level_per_position():
    system = MarkovSystem.random(2, 9, 3)
    levels = dependency_levels(system, system.noise_guess())
    assert torch.equal(levels, torch.arange(1, 10))
    result = fpt.assert_matches_sequential(system, system.noise_guess(), LevelSchedule(levels))
    assert result.dependent_steps == 9


def _finc(layout: Layout, unit: bool):
    torch.manual_seed(0)
    layer = (FInCUnit(8, 3) if unit else FInCConv(3, 3)).to(F64)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(2, 8 if unit else 3, 4, 5, dtype=F64)
    return layer.system(layer(x)[0], layout), x


@pytest.mark.parametrize("layout", list(Layout))
@pytest.mark.parametrize("unit", [False, True])
def test_finc_declared_levels_are_the_probed_levels_and_the_wavefront(layout, unit):
    system, x = _finc(layout, unit)
    probe = torch.randn(2, system.length, system.dim, dtype=F64)
    declared = system.levels(system.length)
    assert torch.equal(declared, dependency_levels(system, probe))
    check_levels(system, probe, declared)
    result = fp.solve(system, system.initial_guess(), LevelSchedule())  # declared levels
    chain = 2 if unit else 3  # channels per independent group
    expected = (4 + 5 - 1) * (chain if layout is Layout.CHANNEL else 1)
    assert result.dependent_steps == int(declared.max()) == expected
    assert result.token_evals == system.batch * system.length
    torch.testing.assert_close(system.to_image(result.x), x if not unit else
                               system.to_image(fp.solve(system, system.initial_guess(),
                                                        fp.Sequential()).x),
                               rtol=0, atol=1e-12)


def test_maps_without_position_sets_go_through_windows():
    system, _ = _sparse_linear(12, 2, 0.3, seed=5)
    levels = levels_from_dependencies(_pattern(12, 0.3, 5))
    result = fpt.assert_matches_sequential(system, system.noise_guess(), LevelSchedule(levels))
    assert result.dependent_steps == int(levels.max())


def test_a_poisoned_sample_stops_and_keeps_finite_values():
    base = MarkovSystem.random(3, 8, 2)
    system = PoisonedSystem(base, sample=1, position=4, value=float("nan"))
    levels = torch.arange(1, 9)
    result = fp.solve(system, base.noise_guess(), LevelSchedule(levels))
    assert result.sample_status[1] is fp.Status.NONFINITE
    assert result.sample_status[0] is fp.Status.SUCCESS
    assert bool(torch.isfinite(result.x).all())
    fpt.assert_close(result.x[[0, 2]], base.solution()[[0, 2]])


def test_probe_rejects_non_causal_maps():
    system = NonCausalSystem(MarkovSystem.random(1, 6, 2), position=3)
    with pytest.raises(fp.NonCausalError):
        dependency_levels(system, torch.randn(1, 6, 2, dtype=F64))


def test_check_levels_names_a_violated_dependence():
    system = MarkovSystem.random(1, 5, 2)
    x = system.noise_guess()
    check_levels(system, x, torch.arange(1, 6) * 2)  # not minimal, still valid
    with pytest.raises(ValueError, match="reads position"):
        check_levels(system, x, torch.tensor([1, 2, 2, 3, 4]))


@pytest.mark.parametrize("levels, message", [
    (torch.tensor([[1, 2]]), "1-D"),
    (torch.tensor([1.0, 2.0]), "integer"),
    (torch.tensor([0, 1]), "impossible"),
    (torch.tensor([1, 3]), "impossible"),
])
def test_bad_levels_are_rejected(levels, message):
    with pytest.raises(ValueError, match=message):
        LevelSchedule(levels=levels)


def test_levels_of_the_wrong_length_or_undeclared_are_rejected():
    system = MarkovSystem.random(1, 5, 2)
    with pytest.raises(ValueError, match="positions"):
        fp.solve(system, system.noise_guess(), LevelSchedule(levels=torch.arange(1, 4)))
    with pytest.raises(TypeError, match="declares no levels"):
        fp.solve(system, system.noise_guess(), LevelSchedule())

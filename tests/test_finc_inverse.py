"""The inverse of a FInC convolution as a triangular map: every core method and every
library baseline reach the same solution."""

from __future__ import annotations

import pytest
import torch

import fixedpoint as fp
from fixedpoint import testing as fpt
from fixedpoint.finc import ChannelSystem, FInCConv, FInCUnit, Layout, Orientation, PixelSystem
from fixedpoint.finc.baselines import solve_dense, solve_loop, solve_sparse

F64 = torch.float64


def _system(layout: Layout, k: int = 3, channels: int = 2, H: int = 5, W: int = 6,
            unit: bool = False, seed: int = 0, batch: int = 2, std: float = 0.3):
    g = torch.Generator().manual_seed(seed)
    layer = (FInCUnit(4 * channels, k) if unit else
             FInCConv(channels, k, Orientation.BOTTOM_RIGHT)).to(F64)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(std * torch.randn(p.shape, generator=g, dtype=F64))
    c = layer.convs[0].channels * 4 if unit else channels
    x = torch.randn(batch, c, H, W, generator=g, dtype=F64)
    y = layer(x)[0]
    return layer.system(y, layout), layer, x, y


def _methods(length: int):
    return [
        fp.Sequential(),
        fp.Jacobi(),
        fp.GSJacobi(modules=3),
        fp.GSJacobi(modules=(0, 1, length // 2)),
        fp.Anderson(memory=5, max_iter=400),
        fp.TriangularAnderson(memory=3),
    ]


@pytest.mark.parametrize("layout", list(Layout))
@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_every_core_method_matches_sequential_and_the_dense_triangular_solve(layout, k):
    system, _, _, _ = _system(layout, k=k)
    x0 = torch.randn(system.batch, system.length, system.dim, dtype=F64,
                     generator=torch.Generator().manual_seed(9))
    dense = system.from_image(solve_dense(system))
    for method in _methods(system.length):
        result = fpt.assert_matches_sequential(system, x0, method)
        fpt.assert_close(result.x, dense, what=f"{method} vs solve_triangular")


@pytest.mark.parametrize("layout", list(Layout))
def test_the_solution_inverts_the_convolution_and_all_baselines_agree(layout):
    system, layer, x, y = _system(layout, unit=True, channels=1)
    exact = fp.solve(system, system.initial_guess(), fp.Sequential())
    assert exact.dependent_steps == system.length
    back = layer.reverse(y, lambda s: fp.solve(s, s.initial_guess(), fp.Sequential()).x,
                         layout)
    torch.testing.assert_close(back, x, rtol=0, atol=1e-12)
    image = system.to_image(exact.x)
    for baseline in (solve_dense, solve_sparse, solve_loop):
        torch.testing.assert_close(baseline(system), image, rtol=0, atol=1e-12)


@pytest.mark.parametrize("layout", list(Layout))
def test_sequential_needs_one_step_per_position(layout):
    system, *_ = _system(layout, channels=3, H=4, W=3)
    result = fp.solve(system, system.initial_guess(), fp.Sequential())
    expected = 4 * 3 * (3 if layout is Layout.CHANNEL else 1)
    assert result.dependent_steps == system.length == expected


@pytest.mark.parametrize("layout", list(Layout))
@pytest.mark.parametrize("k", [2, 3])
def test_jacobi_is_exact_after_as_many_iterations_as_there_are_levels(layout, k):
    system, *_ = _system(layout, k=k, std=0.8, H=4, W=5)
    levels = int(system.levels(system.length).max())
    assert levels == (4 + 5 - 1) * (2 if layout is Layout.CHANNEL else 1)
    exact = fp.solve(system, system.initial_guess(), fp.Sequential()).x
    x0 = torch.randn(system.batch, system.length, system.dim, dtype=F64,
                     generator=torch.Generator().manual_seed(3))

    def jacobi(iterations: int):
        x = x0
        for _ in range(iterations):
            x = system(x)
        return (x - exact).abs().max()

    assert float(jacobi(levels)) < 1e-12
    # The Jacobi error is e_k = J^k e_0 with J the iteration matrix: nilpotent with index
    # exactly the number of levels (J^(L-1) != 0, so L - 1 iterations are not enough for
    # every start).  Zero patterns are exact in floating point, so this is checked exactly.
    n = system.length * system.dim
    zero = torch.zeros(1, system.length, system.dim, dtype=F64)
    basis = torch.eye(n, dtype=F64).reshape(n, system.length, system.dim)
    big = type(system)(system.kernel, system.bias, system.y[:1].expand(n, -1, -1, -1))
    J = (big(basis) - big(zero.expand(n, -1, -1))).reshape(n, n).T
    power = torch.linalg.matrix_power(J, levels - 1)
    assert bool((power != 0).any())
    assert bool((power @ J == 0).all())


@pytest.mark.parametrize("layout", list(Layout))
def test_windows_and_position_sets_equal_the_full_evaluation(layout):
    system, *_ = _system(layout, k=3, H=5, W=4)
    x = torch.randn(system.batch, system.length, system.dim, dtype=F64)
    full = system(x)
    T = system.length
    for lo, hi in [(0, 1), (0, T), (3, 4), (2, 9), (5, T), (T - 1, T), (1, T - 2)]:
        state = system.init_state(x)
        torch.testing.assert_close(system.advance(state, x, lo, hi), full[:, lo:hi],
                                   rtol=0, atol=1e-13)
        assert system.committed(state) == lo
        assert hi - lo <= system.positions_read(0, lo, hi, T) <= T
    positions = torch.tensor([0, 7, 3, T - 1, 11])
    torch.testing.assert_close(system.evaluate_at(x, positions), full[:, positions],
                               rtol=0, atol=1e-13)


@pytest.mark.parametrize("layout", list(Layout))
def test_the_map_is_strictly_causal(layout):
    system, *_ = _system(layout, k=3, H=3, W=4)
    fp.check_causal(system, torch.randn(system.batch, system.length, system.dim, dtype=F64))


@pytest.mark.parametrize("layout", list(Layout))
@pytest.mark.parametrize("unit", [False, True])
def test_declared_levels_respect_every_dependency(layout, unit):
    system, *_ = _system(layout, k=3, H=4, W=5, unit=unit)
    rows, cols, _ = system.matrix_entries()
    # Matrix entries index (pixel, channel) unknowns; map them to this layout's positions.
    per = 1 if layout is Layout.CHANNEL else system.channels
    t, s = rows // per, cols // per
    off = t != s
    level = system.levels(system.length)
    assert bool((level[t[off]] > level[s[off]]).all())
    assert int(level.min()) == 1


def test_unit_levels_count_the_group_chain_not_all_channels():
    system, *_ = _system(Layout.CHANNEL, unit=True, channels=2, H=3, W=3)
    # 8 channels in four independent groups of 2: chains of length 2 per pixel.
    assert int(system.levels(system.length).max()) == (3 + 3 - 1) * 2


def test_bad_kernels_and_shapes_are_rejected():
    good = torch.zeros(2, 2, 3, 3)
    good[:, :, -1, -1] = torch.eye(2)
    y = torch.zeros(1, 2, 4, 4)
    bad = good.clone()
    bad[0, 0, -1, -1] = 2.0
    with pytest.raises(ValueError, match="unit diagonal"):
        PixelSystem(bad, torch.zeros(2), y)
    bad = good.clone()
    bad[0, 1, -1, -1] = 0.5
    with pytest.raises(ValueError, match="lower triangular"):
        ChannelSystem(bad, torch.zeros(2), y)
    with pytest.raises(ValueError, match="shape"):
        PixelSystem(good, torch.zeros(2), torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="bias"):
        PixelSystem(good, torch.zeros(3), y)
    with pytest.raises(ValueError, match="positions"):
        PixelSystem(good, torch.zeros(2), y).levels(5)

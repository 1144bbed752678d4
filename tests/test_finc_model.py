"""FInC Flow layers: masked convolution, unit, flow; log-determinants and invertibility."""

from __future__ import annotations

import math

import pytest
import torch

import fixedpoint as fp
from fixedpoint.finc import FInCConv, FInCFlow, FInCFlowConfig, FInCUnit, Layout, Orientation
from fixedpoint.finc.model import ActNorm, AffineCoupling, Conv1x1, squeeze, unsqueeze

F64 = torch.float64


def _randomize(module: torch.nn.Module, seed: int = 0, std: float = 0.3) -> None:
    """Weights far from their initialisation, so that nothing holds by accident."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(std * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _exact(system) -> torch.Tensor:
    return fp.solve(system, system.initial_guess(), fp.Sequential()).x


@pytest.mark.parametrize("orientation", list(Orientation))
@pytest.mark.parametrize("k", [1, 2, 3])
def test_finc_conv_jacobian_is_unit_triangular_with_logdet_zero(orientation, k):
    torch.manual_seed(1)
    conv = FInCConv(3, k, orientation).to(F64)
    _randomize(conv)
    x = torch.randn(1, 3, 4, 5, dtype=F64)
    jac = torch.autograd.functional.jacobian(lambda v: conv(v)[0], x).reshape(60, 60)
    sign, logabsdet = torch.linalg.slogdet(jac)
    assert sign == 1 and abs(float(logabsdet)) < 1e-12
    assert float(conv(x)[1].abs().max()) == 0.0
    # In the canonical frame and (pixel, channel) raster order the Jacobian is unit
    # lower triangular: the structure the inverse relies on.
    canon = torch.autograd.functional.jacobian(
        lambda v: orientation.flip(conv(orientation.flip(v))[0]), x
    )
    canon = canon.permute(0, 2, 3, 1, 4, 6, 7, 5).reshape(60, 60)
    assert torch.equal(torch.triu(canon, 1), torch.zeros_like(canon))
    assert torch.equal(canon.diagonal(), torch.ones(60, dtype=F64))


def test_masked_entries_get_no_gradient_and_stay_masked_after_training_steps():
    conv = FInCConv(4, 3)
    opt = torch.optim.SGD(conv.parameters(), lr=0.5)
    for _ in range(3):
        loss = conv(torch.randn(2, 4, 5, 5))[0].pow(3).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    centre = conv.kernel()[:, :, -1, -1]
    assert torch.equal(centre.diagonal(), torch.ones(4))
    assert torch.equal(torch.triu(centre, 1), torch.zeros(4, 4))
    assert torch.tril(centre, -1).abs().sum() > 0  # the learnable part did move


@pytest.mark.parametrize("orientation", list(Orientation))
def test_forward_equals_the_dense_unit_lower_triangular_matrix(orientation):
    conv = FInCConv(2, 3, orientation).to(F64)
    _randomize(conv, seed=2)
    x = torch.randn(3, 2, 5, 4, dtype=F64)
    y = conv(x)[0]
    system = conv.system(y)
    M = system.dense_matrix()
    assert torch.equal(M.diagonal(), torch.ones(M.shape[0], dtype=F64))
    assert torch.equal(torch.triu(M, 1), torch.zeros_like(M))
    flat = system.from_image(orientation.flip(x)).reshape(3, -1)
    torch.testing.assert_close(flat @ M.T, system.rhs(), rtol=0, atol=1e-12)


def test_unit_inverse_restores_the_input_in_both_layouts():
    unit = FInCUnit(8, 3).to(F64)
    _randomize(unit, seed=3)
    x = torch.randn(2, 8, 6, 5, dtype=F64)
    y, logdet = unit(x)
    assert float(logdet.abs().max()) == 0.0
    for layout in Layout:
        back = unit.reverse(y, _exact, layout)
        torch.testing.assert_close(back, x, rtol=0, atol=1e-12)


def test_unit_rejects_channel_counts_not_divisible_by_four():
    with pytest.raises(ValueError, match="multiple of 4"):
        FInCUnit(6, 3)


def test_other_layers_invert_and_report_their_logdet():
    torch.manual_seed(4)
    x = torch.randn(3, 4, 3, 3, dtype=F64)
    for layer in (ActNorm(4), Conv1x1(4), AffineCoupling(4, 8)):
        layer = layer.to(F64)
        _randomize(layer, seed=5)
        layer.eval()
        y, logdet = layer(x)
        torch.testing.assert_close(layer.reverse(y), x, rtol=0, atol=1e-12)
        jac = torch.autograd.functional.jacobian(lambda v, m=layer: m(v[None])[0][0], x[0])
        expected = torch.linalg.slogdet(jac.reshape(36, 36))[1]
        torch.testing.assert_close(logdet[0], expected, rtol=0, atol=1e-10)


def test_actnorm_initialises_from_the_first_training_batch():
    layer = ActNorm(3)
    x = 2.0 + 5.0 * torch.randn(64, 3, 4, 4)
    y, _ = layer(x)
    assert bool(layer.initialized)
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(3), rtol=0, atol=1e-5)
    torch.testing.assert_close(y.std(dim=(0, 2, 3)), torch.ones(3), rtol=0, atol=1e-4)
    before = layer.shift.clone()
    layer(torch.randn(8, 3, 4, 4))
    assert torch.equal(layer.shift, before)  # initialised once only


def test_squeeze_round_trip():
    x = torch.randn(2, 3, 6, 4)
    assert squeeze(x).shape == (2, 12, 3, 2)
    assert torch.equal(unsqueeze(squeeze(x)), x)


def _tiny_flow(levels: int = 2) -> FInCFlow:
    torch.manual_seed(6)
    flow = FInCFlow(FInCFlowConfig(image_size=4, levels=levels, steps=2, hidden=8)).to(F64)
    _randomize(flow, seed=7, std=0.2)
    return flow.eval()


@pytest.mark.parametrize("levels", [1, 2])
def test_flow_log_density_is_the_change_of_variables_formula(levels):
    flow = _tiny_flow(levels)
    u = torch.rand(1, 1, 4, 4, dtype=F64) * 0.9 + 0.05

    def latents(v):
        return torch.cat([z.flatten() for z in flow(v)[0]])

    jac = torch.autograd.functional.jacobian(latents, u).reshape(16, 16)
    z = latents(u)
    expected = (-0.5 * z**2).sum() - 8 * math.log(2 * math.pi) + torch.linalg.slogdet(jac)[1]
    torch.testing.assert_close(flow(u)[1][0], expected, rtol=1e-10, atol=1e-9)


def test_flow_reverse_inverts_forward_with_every_layout():
    flow = _tiny_flow()
    u = torch.rand(3, 1, 4, 4, dtype=F64) * 0.9 + 0.05
    latents, _ = flow(u)
    for layout in Layout:
        torch.testing.assert_close(flow.reverse(latents, _exact, layout), u, rtol=0, atol=1e-10)


def test_latent_shapes_match_forward():
    flow = FInCFlow(FInCFlowConfig(image_size=8, levels=2, steps=1))
    latents, _ = flow(torch.rand(2, 1, 8, 8))
    assert [tuple(z.shape[1:]) for z in latents] == flow.latent_shapes()
    assert sum(math.prod(s) for s in flow.latent_shapes()) == 64


def test_bits_per_dim_counts_the_dequantization_cells():
    flow = FInCFlow(FInCFlowConfig(image_size=4, levels=1, steps=1, bins=256)).eval()
    u = torch.rand(2, 1, 4, 4)
    _, logp = flow(u)
    expected = (-logp / 16 + math.log(256)) / math.log(2)
    torch.testing.assert_close(flow.bits_per_dim(u), expected)


def test_dequantize_then_quantize_recovers_the_data_grid():
    flow = FInCFlow(FInCFlowConfig(bins=17))
    images = torch.randint(0, 17, (4, 1, 8, 8)).float() / 8 - 1
    u = flow.dequantize(images, torch.Generator().manual_seed(0))
    assert bool(((u > 0) & (u < 1)).all())
    assert torch.equal(flow.quantize(u), images)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(image_size=6, levels=2), "divisible"),
        (dict(kernel_size=0), "kernel_size"),
        (dict(bins=1), "bins"),
        (dict(logit_alpha=0.5), "logit_alpha"),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FInCFlowConfig(**kwargs)


def test_config_round_trips_and_rejects_unknown_fields():
    cfg = FInCFlowConfig(steps=3)
    assert FInCFlowConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown"):
        FInCFlowConfig.from_dict({**cfg.to_dict(), "width": 3})

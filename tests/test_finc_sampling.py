"""Sampling a FInC Flow through the core: every method and baseline give the same samples;
sharded generation is resumable and independent of the sharding."""

from __future__ import annotations

import json

import pytest
import torch

import fixedpoint as fp
from fixedpoint.finc import FInCFlow, FInCFlowConfig, Layout
from fixedpoint.finc.baselines import solve_dense, solve_loop, solve_sparse
from fixedpoint.finc.generate import GenerateError, GenerateSpec, generate
from fixedpoint.finc.sampling import (
    baseline_inverter,
    core_inverter,
    reconstruction_error,
    sample,
)


@pytest.fixture(scope="module")
def flow() -> FInCFlow:
    torch.manual_seed(0)
    model = FInCFlow(FInCFlowConfig(image_size=8, levels=2, steps=2, hidden=8))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


METHODS = [fp.Sequential(), fp.Jacobi(), fp.GSJacobi(modules=3), fp.LevelSchedule(),
           fp.TriangularAnderson(), fp.Anderson(max_iter=200)]


@pytest.mark.parametrize("layout", list(Layout))
def test_every_method_and_baseline_draws_the_sequential_samples(flow, layout):
    latents = flow.sample_latents(5, torch.Generator().manual_seed(2))
    ref = sample(flow, 5, method=fp.Sequential(), latents=latents, layout=layout)
    assert len(ref.results) == len(flow.finc_units())
    for method in METHODS:
        s = sample(flow, 5, method=method, latents=latents, layout=layout)
        assert all(r.status is fp.Status.SUCCESS for r in s.results), method
        torch.testing.assert_close(s.u, ref.u, rtol=0, atol=2e-5)
    for solve in (solve_dense, solve_sparse, solve_loop):
        s = sample(flow, 5, baseline_inverter(solve), latents=latents, layout=layout)
        torch.testing.assert_close(s.u, ref.u, rtol=0, atol=2e-5)


def test_level_schedule_takes_the_wavefront_steps(flow):
    s = sample(flow, 3, method=fp.LevelSchedule(), generator=torch.Generator().manual_seed(0))
    # Level 1 works on 4x4 images, level 2 on 2x2: 7 and 3 anti-diagonals per unit.
    assert [r.dependent_steps for r in s.results] == [3, 3, 7, 7]
    seq = sample(flow, 3, method=fp.Sequential(), generator=torch.Generator().manual_seed(0))
    assert [r.dependent_steps for r in seq.results] == [4, 4, 16, 16]
    assert s.images.shape == (3, 1, 8, 8)
    assert set(s.images.unique().tolist()) <= {v / 8 - 1 for v in range(17)}


def test_reconstruction_error_is_at_rounding_level(flow):
    u = flow.dequantize(torch.rand(4, 1, 8, 8) * 2 - 1, torch.Generator().manual_seed(3))
    for inverter in (core_inverter(fp.LevelSchedule()), baseline_inverter(solve_dense)):
        assert reconstruction_error(flow, u, inverter) < 1e-5


def test_sample_needs_exactly_one_of_method_and_inverter(flow):
    with pytest.raises(ValueError, match="exactly one"):
        sample(flow, 2)
    with pytest.raises(ValueError, match="exactly one"):
        sample(flow, 2, core_inverter(fp.Jacobi()), method=fp.Jacobi())


def _factory(method):
    return lambda results: core_inverter(method, results)


def test_generation_is_sharded_resumable_and_independent_of_history(flow, tmp_path):
    spec = GenerateSpec("model.pt", "levels", "PIXEL", num_samples=7, shard_size=3, seed=4)
    summary = generate(flow, spec, _factory(fp.LevelSchedule()), Layout.PIXEL,
                       tmp_path / "a", progress=False)
    assert summary["samples"] == 7 and summary["shards"] == 3
    full = torch.load(tmp_path / "a" / "samples.pt", weights_only=True)
    assert full.shape == (7, 1, 8, 8)
    # Delete one shard: the rerun regenerates exactly it, with the same content.
    (tmp_path / "a" / "shard-00001.pt").unlink()
    generate(flow, spec, _factory(fp.LevelSchedule()), Layout.PIXEL, tmp_path / "a",
             progress=False)
    assert torch.equal(torch.load(tmp_path / "a" / "samples.pt", weights_only=True), full)
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["samples"] == 7
    with pytest.raises(GenerateError, match="another run"):
        generate(flow, GenerateSpec("model.pt", "levels", "PIXEL", 7, 3, seed=5),
                 _factory(fp.LevelSchedule()), Layout.PIXEL, tmp_path / "a", progress=False)
    with pytest.raises(GenerateError, match=">= 1"):
        generate(flow, GenerateSpec("m", "levels", "PIXEL", 0, 3), _factory(fp.Jacobi()),
                 Layout.PIXEL, tmp_path / "b", progress=False)

"""Every core method on the sampler chains reaches the sequential sampler's solution."""

from __future__ import annotations

import pytest
import torch

import fixedpoint as fp
from fixedpoint.diffusion import (
    DDIMChain,
    DDPMChain,
    EulerChain,
    GaussianMixture,
    HeunChain,
    MarkovMap,
    MixtureDenoiser,
    NoiseSchedule,
    PicardMap,
    Split,
    block_picard,
    diffusers_loop,
    paradigms_tolerance,
    sample_loop,
    solve_chain,
    tiny_model,
)

CHAINS = (DDIMChain, DDPMChain, EulerChain, HeunChain)
SCHEDULE = NoiseSchedule.default()


def oracle(dim=6, components=3, seed=0):
    mixture = GaussianMixture.random(dim, components=components, seed=seed)
    return MixtureDenoiser(mixture, SCHEDULE.alphas_cumprod)


def problem(chain_type, steps, den, batch=2, seed=0, dtype=torch.float64, split=None):
    g = torch.Generator().manual_seed(seed)
    extra = {} if split is None else {"split": split}
    chain = chain_type.from_schedule(SCHEDULE, steps, **extra)
    shape = den.sample_shape
    x = torch.randn(batch, *shape, generator=g, dtype=dtype)
    noise = None
    if chain.stochastic:
        noise = torch.randn(batch, steps, *shape, generator=g, dtype=dtype)
    return chain, x, noise


def methods(steps):
    return [
        fp.Sequential(),
        fp.Jacobi(),
        fp.GSJacobi(modules=3),
        fp.TriangularAnderson(memory=2, ridge=1e-3),
        fp.TriangularAnderson(memory=2, ridge=1e-3, window_width=4),
        fp.SlidingWindow(1),
        fp.SlidingWindow(4),
        fp.SlidingWindow(steps + 3),
        fp.SlidingWindow(5, rms=True),
    ]


SPLIT_CASES = [(c, None) for c in CHAINS] + [(c, s) for c in (DDIMChain, DDPMChain) for s in Split]


@pytest.mark.parametrize(("chain_type", "split"), SPLIT_CASES)
@pytest.mark.parametrize("form", [MarkovMap, PicardMap])
def test_every_method_reaches_the_sequential_sampler_on_the_oracle(chain_type, split, form):
    den = oracle()
    steps = 24
    chain, x, noise = problem(chain_type, steps, den, split=split)
    labels = torch.tensor([0, 3])  # a component, and the null label (whole mixture)
    exact = sample_loop(chain, den, x, noise, labels=labels, guidance=1.5, trajectory=True)
    scale = float(exact.abs().max())
    for method in methods(steps):
        fmap = form(chain, den, x, noise, labels=labels, guidance=1.5)
        out = solve_chain(fmap, method)
        assert out.result.status is fp.Status.SUCCESS, method
        err = float((out.result.x - exact).abs().max())
        assert err <= 1e-10 * max(1.0, scale), (method, err)
        assert out.network.calls == out.result.dependent_steps * chain.stages or (
            chain.stages == 2 and out.network.calls < 2 * out.result.dependent_steps
        )


@pytest.mark.parametrize("split", list(Split))
@pytest.mark.parametrize("chain_type", [DDIMChain, DDPMChain])
def test_every_method_on_a_unet_chain(chain_type, split):
    model = tiny_model(num_classes=2, seed=1)
    den = model.denoiser()
    chain, x, noise = problem(chain_type, 6, den, dtype=torch.float32, split=split)
    labels = torch.tensor([1, 0])
    exact = sample_loop(chain, den, x, noise, labels=labels, guidance=2.0, trajectory=True)
    scale = float(exact.abs().max())
    for form in (MarkovMap, PicardMap):
        for method in methods(6):
            out = solve_chain(form(chain, den, x, noise, labels=labels, guidance=2.0), method)
            err = float((out.result.x - exact).abs().max())
            assert err <= 1e-5 * max(1.0, scale), (form, method, err)


def test_window_one_is_sequential_ddim_and_diffusers_ddim():
    """ParaDiGMS's users found window 1 differed from sequential DDIM; here it may not."""
    model = tiny_model(num_classes=None, seed=2)
    x = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    chain = DDIMChain.from_schedule(model.schedule, 25)
    for form in (MarkovMap, PicardMap):
        out = solve_chain(form(chain, model.denoiser(), x), fp.SlidingWindow(1))
        seq = sample_loop(chain, model.denoiser(), x)
        ref = diffusers_loop(model, model.schedule.ddim_scheduler(), 25, x)
        scale = max(1.0, float(ref.abs().max()))
        assert float((out.sample - seq).abs().max()) <= 1e-5 * scale
        assert float((out.sample - ref).abs().max()) <= 1e-5 * scale
        assert out.result.dependent_steps == 25


@pytest.mark.parametrize("form", [MarkovMap, PicardMap])
def test_error_goes_to_zero_with_the_tolerance(form):
    den = oracle(dim=8)
    chain, x, noise = problem(DDPMChain, 40, den, batch=1)
    exact = sample_loop(chain, den, x, noise, trajectory=True)
    errors = []
    for atol in (1e-2, 1e-4, 1e-6, 1e-8, 0.0):
        for method in (fp.Jacobi(atol=atol, rtol=0.0), fp.SlidingWindow(8, atol=atol, rtol=0.0)):
            out = solve_chain(form(chain, den, x, noise), method)
            errors.append(float((out.result.x - exact).abs().max()))
    jacobi, window = errors[0::2], errors[1::2]
    for errs in (jacobi, window):
        assert errs[-1] <= 1e-12
        assert all(b <= max(a, 1e-12) * 1.5 for a, b in zip(errs, errs[1:])), errs


def test_picard_form_needs_far_fewer_iterations_than_markov():
    """Euler on the PF-ODE does not contract: Jacobi on the Markov form waits for the
    wavefront to cross all N steps; the integral form converges geometrically."""
    den = oracle(dim=16, components=4, seed=1)
    chain, x, _ = problem(EulerChain, 100, den, batch=1)
    exact = sample_loop(chain, den, x, trajectory=True)
    its = {}
    for form in (MarkovMap, PicardMap):
        out = solve_chain(form(chain, den, x), fp.Jacobi(atol=1e-6, rtol=0.0))
        its[form] = out.result.iterations
        assert float((out.result.x - exact).abs().max()) <= 1e-4
    assert its[MarkovMap] >= 90
    assert its[PicardMap] <= 30


def test_block_picard_is_gs_jacobi_with_fixed_iterations():
    den = oracle(dim=4)
    chain, x, _ = problem(DDIMChain, 30, den, batch=1)
    exact = sample_loop(chain, den, x, trajectory=True)
    fmap = PicardMap(chain, den, x)
    out = solve_chain(fmap, block_picard(blocks=3, iterations=4))
    assert out.result.module_iterations == (4, 4, 4)
    assert out.result.dependent_steps == 12
    coarse = float((out.result.x - exact).abs().max())
    fine = solve_chain(fmap, block_picard(blocks=3, iterations=8))
    assert float((fine.result.x - exact).abs().max()) < coarse
    exact_blocks = solve_chain(fmap, block_picard(blocks=3, iterations=10))
    assert float((exact_blocks.result.x - exact).abs().max()) <= 1e-10


def test_paradigms_rule_stops_early_and_stays_close():
    den = oracle(dim=32)
    chain, x, noise = problem(DDPMChain, 200, den, batch=1)
    exact = sample_loop(chain, den, x, noise, trajectory=True)
    tol = paradigms_tolerance(chain, tau=0.1)
    assert tol.shape == (200,) and bool((tol > 0).all())
    out = solve_chain(
        PicardMap(chain, den, x, noise), fp.SlidingWindow(32, atol=tol, rtol=0.0, rms=True)
    )
    assert out.result.dependent_steps < 100
    assert float((out.result.x[:, -1] - exact[:, -1]).abs().max()) <= 0.05
    with pytest.raises(ValueError, match="tau"):
        paradigms_tolerance(chain, tau=0.0)


def test_heun_window_on_both_stages():
    den = oracle(dim=3)
    chain, x, _ = problem(HeunChain, 12, den, batch=3)
    exact = sample_loop(chain, den, x, trajectory=True)
    out = solve_chain(PicardMap(chain, den, x), fp.SlidingWindow(5))
    assert float((out.result.x - exact).abs().max()) <= 1e-10


@pytest.mark.parametrize("chain_type", (DDIMChain, DDPMChain))
def test_windowed_triangular_anderson_needs_fewer_iterations_than_the_plain_window(chain_type):
    # ParaTAA's pairing: the history fitted inside the window must cut the sweeps that
    # windowed Picard needs (a history mixing differences of positions never evaluated
    # would not converge faster, or at all).
    den = oracle(dim=16, seed=2)
    chain, x, noise = problem(chain_type, 100, den, batch=1, seed=3)
    exact = sample_loop(chain, den, x, noise, trajectory=True)
    tol = dict(atol=1e-6, rtol=0.0)
    runs = {}
    for name, method in (
        ("window", fp.SlidingWindow(25, **tol)),
        ("taa", fp.TriangularAnderson(memory=3, ridge=1e-4, window_width=25, **tol)),
    ):
        out = solve_chain(PicardMap(chain, den, x, noise), method)
        assert float((out.result.x - exact).abs().max()) <= 1e-4
        runs[name] = out.result.iterations
    assert runs["taa"] < runs["window"], runs


@pytest.mark.parametrize("chain_type", [DDIMChain, DDPMChain])
def test_both_splits_are_the_same_step_with_different_linear_parts(chain_type):
    noise_chain = chain_type.from_schedule(SCHEDULE, 50)
    clean_chain = chain_type.from_schedule(SCHEDULE, 50, split=Split.CLEAN)
    assert noise_chain.split is Split.NOISE  # the default: ParaDiGMS's form
    a_noise, a_clean = noise_chain.linear, clean_chain.linear
    # The clean split contracts on every step but the last, which lands on abar = 1
    # (its clean-split coefficient is 0) and keeps the noise split's.
    assert bool((a_clean[:-1] < 1).all()) and bool((a_clean[:-1] > 0).all())
    assert float(a_clean[-1]) == float(a_noise[-1])
    assert bool((a_noise[:-1] >= 1).all())
    den = oracle(dim=5)
    _, x, noise = problem(chain_type, 50, den, batch=3)
    one = noise_chain.step(x.reshape(3, -1), torch.full((3,), 7), _plain_eps(den), _row(noise, 7))
    two = clean_chain.step(x.reshape(3, -1), torch.full((3,), 7), _plain_eps(den), _row(noise, 7))
    assert torch.equal(one, two)
    with pytest.raises(ValueError, match="split"):
        chain_type.from_schedule(SCHEDULE, 50, split="bogus")


def _plain_eps(den):
    return lambda x, t, rows=None: den(x, t, None)


def _row(noise, n):
    return None if noise is None else noise[:, n].reshape(noise.shape[0], -1)


def test_the_clean_split_needs_fewer_picard_iterations_on_ddim_100():
    # The documented claim (exact-score mixture, d = 256, DDIM-100, atol 1e-4): the clean
    # split's Picard iteration contracts much faster than ParaDiGMS's noise split.
    den = MixtureDenoiser(
        GaussianMixture.random(256, components=8, std=0.05, seed=1), SCHEDULE.alphas_cumprod
    )
    iterations = {}
    for split in Split:
        chain, x, _ = problem(DDIMChain, 100, den, batch=2, seed=4, split=split)
        exact = sample_loop(chain, den, x, trajectory=True)
        out = solve_chain(PicardMap(chain, den, x), fp.Jacobi(atol=1e-4, rtol=0.0))
        assert float((out.result.x - exact).abs().max()) <= 1e-3
        iterations[split] = out.result.iterations
    assert 2 * iterations[Split.CLEAN] <= iterations[Split.NOISE], iterations

"""Sampler chains as triangular systems: parity with diffusers, both forms, the oracle."""

from __future__ import annotations

import math

import pytest
import torch

import fixedpoint as fp
from fixedpoint.diffusion import (
    DDIMChain,
    DDPMChain,
    DiffusionModel,
    EulerChain,
    GaussianMixture,
    HeunChain,
    MarkovMap,
    MixtureDenoiser,
    ModelError,
    NoiseSchedule,
    PicardMap,
    ScheduleError,
    UNetConfig,
    diffusers_ddpm_noise,
    diffusers_loop,
    load_model,
    sample_loop,
    solve_chain,
    tiny_model,
)
from fixedpoint.diffusion.schedule import default_scheduler_config

CHAINS = (DDIMChain, DDPMChain, EulerChain, HeunChain)


def close(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference relative to max(1, |b|): a random UNet's chain grows large."""
    return float((a - b).abs().max() / b.abs().max().clamp(min=1))


def noise_for(chain, batch, shape, seed=1):
    if not chain.stochastic:
        return None
    return torch.randn(batch, len(chain), *shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def cond_model():
    return tiny_model(num_classes=3)


@pytest.fixture(scope="module")
def x_init():
    return torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def clipped(model: DiffusionModel) -> DiffusionModel:
    """The same UNet with diffusers' default clamp of the predicted clean sample."""
    config = {**default_scheduler_config(), "clip_sample": True}
    return DiffusionModel(model.unet, NoiseSchedule(config), model.meta)


# ------------------------------------------------------------------ parity with diffusers


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("guidance", [None, 3.0])
def test_ddim_loop_equals_diffusers_scheduler(cond_model, x_init, clip, guidance):
    model = clipped(cond_model) if clip else cond_model
    labels = torch.tensor([0, 2])
    for steps in (1, 7, 20):
        chain = DDIMChain.from_schedule(model.schedule, steps)
        ours = sample_loop(chain, model.denoiser(), x_init, labels=labels, guidance=guidance)
        ref = diffusers_loop(
            model,
            model.schedule.ddim_scheduler(),
            steps,
            x_init,
            labels=labels,
            guidance=guidance,
        )
        assert close(ours, ref) <= 1e-5, steps
        if clip:  # bounded data: the absolute float32 bound applies directly
            assert float((ours - ref).abs().max()) <= 1e-5


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("guidance", [None, 2.0])
def test_ddpm_loop_equals_diffusers_scheduler(cond_model, x_init, clip, guidance):
    model = clipped(cond_model) if clip else cond_model
    labels = torch.tensor([1, 0])
    for steps in (1, 10, 50):
        chain = DDPMChain.from_schedule(model.schedule, steps)
        noise = diffusers_ddpm_noise(torch.Generator().manual_seed(5), chain, 2, (1, 8, 8))
        ours = sample_loop(chain, model.denoiser(), x_init, noise, labels=labels, guidance=guidance)
        ref = diffusers_loop(
            model,
            model.schedule.ddpm_scheduler(),
            steps,
            x_init,
            labels=labels,
            guidance=guidance,
            generator=torch.Generator().manual_seed(5),
        )
        assert close(ours, ref) <= 1e-5, steps


def test_unconditional_unet_parity():
    model = tiny_model(num_classes=None, seed=3)
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    chain = DDIMChain.from_schedule(model.schedule, 12)
    ours = sample_loop(chain, model.denoiser(), x)
    ref = diffusers_loop(model, model.schedule.ddim_scheduler(), 12, x)
    assert close(ours, ref) <= 1e-5


# ------------------------------------------------------------------ the two forms


@pytest.mark.parametrize("chain_type", CHAINS)
@pytest.mark.parametrize("form", [MarkovMap, PicardMap])
def test_forms_are_causal_and_solve_to_the_loop(cond_model, x_init, chain_type, form):
    chain = chain_type.from_schedule(cond_model.schedule, 8)
    den = cond_model.denoiser()
    labels = torch.tensor([2, 1])
    noise = noise_for(chain, 2, (1, 8, 8))
    loop = sample_loop(chain, den, x_init, noise, labels=labels, guidance=1.5, trajectory=True)
    fmap = form(chain, den, x_init, noise, labels=labels, guidance=1.5)
    fp.check_causal(fmap, fmap.initial_guess() + 0.1)
    # The map's fixed point is the loop's trajectory: F(trajectory) = trajectory.
    assert close(fmap(loop), loop) <= 1e-5
    for method in (fp.Sequential(), fp.Jacobi()):
        out = solve_chain(fmap, method)
        assert close(out.result.x, loop) <= 1e-5, method
        assert close(out.sample, loop[:, -1].reshape(x_init.shape)) <= 1e-5
        assert out.network.calls >= out.result.dependent_steps


def test_markov_sequential_is_the_loop_bit_for_bit(cond_model, x_init):
    chain = DDPMChain.from_schedule(cond_model.schedule, 10)
    noise = noise_for(chain, 2, (1, 8, 8))
    den = cond_model.denoiser()
    loop = sample_loop(chain, den, x_init, noise, trajectory=True)
    out = solve_chain(MarkovMap(chain, den, x_init, noise), fp.Sequential())
    assert torch.equal(out.result.x, loop)
    assert out.network.calls == 10 and out.result.dependent_steps == 10


def test_heun_costs_two_dependent_evaluations_per_step(cond_model, x_init):
    chain = HeunChain.from_schedule(cond_model.schedule, 6)
    out = solve_chain(MarkovMap(chain, cond_model.denoiser(), x_init), fp.Sequential())
    assert out.network.calls == 2 * 6 - 1  # the last step ends at abar = 1: Euler only


class CountingDenoiser:
    """A denoiser that counts its own calls and rows: a count independent of the map's."""

    def __init__(self, inner):
        self.inner = inner
        self.sample_shape = inner.sample_shape
        self.num_classes, self.null_label = inner.num_classes, inner.null_label
        self.calls = self.rows = 0

    def __call__(self, x, timesteps, labels):
        self.calls += 1
        self.rows += x.shape[0]
        return self.inner(x, timesteps, labels)


@pytest.mark.parametrize(
    "method",
    [fp.Jacobi(), fp.Newton(bandwidth=1, chunk=1), fp.Newton(bandwidth=1)],
    ids=["jacobi", "newton-chunk1", "newton"],
)
def test_network_count_covers_the_whole_solve(method):
    """Newton evaluates the full map for its Jacobian directions inside the solve; those
    calls add to the solve's count (they once restarted it from zero)."""
    schedule = NoiseSchedule.default()
    mixture = GaussianMixture.random(2, components=4, seed=0)
    den = CountingDenoiser(MixtureDenoiser(mixture, schedule.alphas_cumprod))
    chain = DDIMChain.from_schedule(schedule, 12)
    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    fmap = MarkovMap(chain, den, x)
    fmap(fmap.initial_guess())  # a call before the solve is not the solve's
    before = (den.calls, den.rows)
    out = solve_chain(fmap, method)
    assert out.result.success
    assert (out.network.calls, out.network.rows) == (den.calls - before[0], den.rows - before[1])
    if isinstance(method, fp.Jacobi):
        # Jacobi on the Markov form: N iterations, iteration k reads positions k .. N-1.
        assert out.network.calls == out.result.dependent_steps == 12
        assert out.network.rows == out.result.token_evals == 3 * 12 * 13 // 2
    else:
        assert out.network.calls > out.result.dependent_steps  # the Jacobian's calls
    if method == fp.Newton(bandwidth=1, chunk=1):
        # One direction per vectorised call: the rows the map counts are the rows run.
        assert out.network.rows == out.result.token_evals


# ------------------------------------------------------------------ the mixture oracle


def test_mixture_eps_is_the_exact_score():
    mixture = GaussianMixture.random(5, components=3, seed=2)
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    for abar in (0.01, 0.5, 0.99):
        a = torch.full((4,), abar, dtype=torch.float64)
        # log density of the noisy marginal, by hand
        var = abar * mixture.stds**2 + 1 - abar
        diff = x[:, None] - math.sqrt(abar) * mixture.means[None]
        logp = torch.logsumexp(
            mixture.weights.log()
            - 0.5 * (diff**2).sum(-1) / var
            - 2.5 * torch.log(2 * math.pi * var),
            dim=1,
        )
        (score,) = torch.autograd.grad(logp.sum(), x)
        eps = mixture.eps(x.detach(), a)
        torch.testing.assert_close(eps, -math.sqrt(1 - abar) * score, rtol=1e-10, atol=1e-10)
        # conditioning on a component gives that Gaussian's score
        k = torch.tensor([0, 1, 2, 3])
        one = mixture.eps(x.detach(), a, k)
        kk = k.clamp(max=2)
        expect = math.sqrt(1 - abar) * diff.detach()[torch.arange(4), kk] / var[kk, None]
        torch.testing.assert_close(one[:3], expect[:3])
        torch.testing.assert_close(one[3], eps[3])  # label K: the whole mixture


def test_ddpm_on_the_oracle_samples_the_mixture():
    mixture = GaussianMixture.random(2, components=2, spread=0.6, std=0.15, seed=4)
    schedule = NoiseSchedule.default()
    den = MixtureDenoiser(mixture, schedule.alphas_cumprod)
    g = torch.Generator().manual_seed(0)
    chain = DDPMChain.from_schedule(schedule, 200)
    x = torch.randn(2000, 2, generator=g, dtype=torch.float64)
    noise = torch.randn(2000, 200, 2, generator=g, dtype=torch.float64)
    out = sample_loop(chain, den, x, noise)
    data, _ = mixture.sample(20000, generator=g)
    torch.testing.assert_close(out.mean(0), data.mean(0), atol=0.05, rtol=0)
    torch.testing.assert_close(out.std(0), data.std(0), atol=0.05, rtol=0)


def test_euler_and_heun_converge_with_their_orders():
    mixture = GaussianMixture.random(3, components=2, seed=0)
    config = {**default_scheduler_config(), "timestep_spacing": "trailing"}
    schedule = NoiseSchedule(config)
    den = MixtureDenoiser(mixture, schedule.alphas_cumprod)
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    reference = sample_loop(HeunChain.from_schedule(schedule, 1000), den, x)

    def err(chain_type, n):
        return float(
            (sample_loop(chain_type.from_schedule(schedule, n), den, x) - reference).abs().max()
        )

    e_ratio = err(EulerChain, 100) / err(EulerChain, 200)
    d_ratio = err(DDIMChain, 100) / err(DDIMChain, 200)
    h_ratio = err(HeunChain, 100) / err(HeunChain, 200)
    assert 1.5 <= e_ratio <= 2.6 and 1.5 <= d_ratio <= 2.6  # first order
    assert h_ratio >= 3.0  # second order


# ------------------------------------------------------------------ saving and loading


def test_save_pretrained_round_trip_gives_identical_samples(tmp_path, cond_model, x_init):
    cond_model.save(tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert loaded.num_classes == 3 and loaded.schedule.config["clip_sample"] is False
    chain = DDIMChain.from_schedule(cond_model.schedule, 5)
    labels = torch.tensor([0, 1])
    a = sample_loop(chain, cond_model.denoiser(), x_init, labels=labels, guidance=2.0)
    b = sample_loop(chain, loaded.denoiser(), x_init, labels=labels, guidance=2.0)
    assert torch.equal(a, b)
    # a bare UNet2DModel directory (no scheduler) loads with the default schedule
    cond_model.unet.save_pretrained(tmp_path / "bare")
    bare = load_model(tmp_path / "bare")
    assert torch.equal(
        sample_loop(chain, bare.denoiser(), x_init, labels=labels),
        sample_loop(chain, cond_model.denoiser(), x_init, labels=labels),
    )


# ------------------------------------------------------------------ bad input


def test_bad_input_is_one_line_errors(tmp_path, cond_model, x_init):
    den = cond_model.denoiser()
    chain = DDIMChain.from_schedule(cond_model.schedule, 4)
    ddpm = DDPMChain.from_schedule(cond_model.schedule, 4)
    cases = [
        (lambda: MarkovMap(chain, den, torch.zeros(2, 1, 16, 16)), "model takes"),
        (lambda: den(torch.zeros(1, 1, 4, 4), torch.zeros(1), None), "do not fit this UNet"),
        (lambda: MarkovMap(ddpm, den, x_init, torch.full((2, 4, 1, 8, 8), math.nan)), "non-finite"),
        (lambda: MarkovMap(ddpm, den, x_init), "drawn in advance"),
        (lambda: MarkovMap(chain, den, x_init * math.inf), "non-finite"),
        (lambda: DDIMChain.from_schedule(cond_model.schedule, 0), "steps must be"),
        (lambda: DDPMChain.from_schedule(cond_model.schedule, -3), "steps must be"),
        (lambda: DDIMChain.from_schedule(cond_model.schedule, 1001), "exceeds"),
        (lambda: MarkovMap(chain, tiny_model().denoiser(), x_init, guidance=2.0), "unconditional"),
        (
            lambda: MarkovMap(chain, tiny_model().denoiser(), x_init, labels=torch.tensor([0, 1])),
            "unconditional",
        ),
        (lambda: MarkovMap(chain, den, x_init, labels=torch.tensor([0, 7])), "labels must"),
        (lambda: load_model(tmp_path), "not a diffusers model"),
        (lambda: load_model(tmp_path / "missing"), "not a directory"),
        (
            lambda: NoiseSchedule(
                {**default_scheduler_config(), "prediction_type": "v_prediction"}
            ),
            "epsilon",
        ),
        (
            lambda: NoiseSchedule({**default_scheduler_config(), "_class_name": "PNDMScheduler"}),
            "not supported",
        ),
        (lambda: UNetConfig(sample_size=10, channels=(8, 16, 32), norm_groups=4), "divisible"),
    ]
    for make, words in cases:
        with pytest.raises((ValueError, TypeError)) as info:
            make()
        message = str(info.value)
        assert words in message and "\n" not in message, message
    # a scheduler that does not match the UNet
    cond_model.save(tmp_path / "m")
    bad = tmp_path / "m" / "scheduler" / "scheduler_config.json"
    bad.write_text(
        bad.read_text().replace('"num_train_timesteps": 1000', '"num_train_timesteps": 500')
    )
    with pytest.raises(ModelError, match="training timesteps"):
        load_model(tmp_path / "m")
    bad.write_text(bad.read_text().replace('"epsilon"', '"sample"'))
    with pytest.raises(ModelError, match="epsilon"):
        load_model(tmp_path / "m")
    assert issubclass(ScheduleError, ValueError)

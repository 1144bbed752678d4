"""Few-step samplers: grids, determinism, parity with diffusers' own loops, errors, CLI."""

from __future__ import annotations

import pytest
import torch

import fixedpoint.diffusion as fd
from fixedpoint.cli import main
from fixedpoint.diffusion import fewstep as fs


@pytest.fixture(scope="module")
def model():
    return fd.tiny_model(num_classes=3, seed=0)


@pytest.fixture(scope="module")
def noise(model):
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, *model.sample_shape, generator=g), torch.tensor([0, 2])


@pytest.mark.parametrize("grid", [fs.UniformGrid(), fs.PolynomialGrid(), fs.LogSNRGrid()])
def test_grids_run_strictly_down_from_the_top_to_timestep_zero(model, grid):
    sig = fs.Sigmas(model.schedule)
    for k in range(1, 21):
        t = grid.timesteps(sig, k)
        assert len(t) == k + 1 and int(t[0]) == 999 and int(t[-1]) == 0
        assert bool((t[1:] < t[:-1]).all())
        c = grid.continuous(sig, k)
        assert bool((c[1:] < c[:-1]).all())
        s = sig.at(t)
        assert bool((s[1:] < s[:-1]).all())


def test_polynomial_grid_is_uniform_in_sigma_to_the_one_over_rho(model):
    sig = fs.Sigmas(model.schedule)
    s = sig.at(fs.PolynomialGrid().continuous(sig, 6))
    steps = (s ** (1 / 7)).diff()
    assert torch.allclose(steps, steps[0].expand_as(steps), rtol=1e-6)


def test_sigma_and_timestep_maps_invert_each_other(model):
    sig = fs.Sigmas(model.schedule)
    t = torch.tensor([0.0, 3.5, 250.25, 998.0, 999.0], dtype=torch.float64)
    assert torch.allclose(sig.t_of(sig.at(t)), t, atol=1e-6)


def test_bad_grids_and_budgets_are_refused(model):
    sig = fs.Sigmas(model.schedule)
    with pytest.raises(fs.FewStepError, match="not strictly decreasing"):
        fs.CustomGrid((999.0, 500.0, 700.0, 0.0)).timesteps(sig, 3)
    with pytest.raises(fs.FewStepError, match="positive int"):
        fs.make_sampler("dpmpp-2m", model, 0)
    with pytest.raises(fs.FewStepError, match="positive int"):
        fs.UniformGrid().timesteps(sig, -1)
    with pytest.raises(fs.FewStepError, match="only its own uniform grid"):
        fs.make_sampler("ddim", model, 5, fs.LogSNRGrid())
    with pytest.raises(fs.FewStepError, match="unknown few-step sampler"):
        fs.make_sampler("nope", model, 5)


@pytest.mark.parametrize("name", list(fs.SAMPLERS))
def test_every_sampler_is_finite_deterministic_and_counts_its_budget(model, noise, name):
    x, labels = noise
    sampler = fs.make_sampler(name, model, 5)
    a = sampler.sample(model.denoiser(), x, labels)
    b = sampler.sample(model.denoiser(), x, labels)
    assert a.sample.shape == x.shape and bool(torch.isfinite(a.sample).all())
    assert torch.equal(a.sample, b.sample)
    assert a.network.calls == sampler.nfe == 5
    assert a.network.rows == 5 * len(x)
    guided = sampler.sample(model.denoiser(), x, labels, guidance=2.0)
    assert guided.network.calls == 5 and guided.network.rows == 10 * len(x)
    assert not torch.equal(guided.sample, a.sample)


def _diffusers_loop(scheduler, model, x, labels):
    """diffusers' own pipeline loop, written out here as the reference."""
    x = x * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            e = model.unet(scheduler.scale_model_input(x, t), t, class_labels=labels).sample
            x = scheduler.step(e, t, x).prev_sample
    return x


def test_ddim_is_diffusers_ddim_and_our_ddim_chain(model, noise):
    x, labels = noise
    out = fs.make_sampler("ddim", model, 6).sample(model.denoiser(), x, labels)
    cfg = {**model.schedule.config, "timestep_spacing": "trailing", "set_alpha_to_one": False}
    chain = fd.DDIMChain.from_schedule(fd.NoiseSchedule(cfg), 6)
    ref = fd.sample_loop(chain, model.denoiser(), x, labels=labels)
    torch.testing.assert_close(out.sample, ref, rtol=1e-5, atol=1e-5)


def test_dpmpp_on_a_given_grid_matches_diffusers_native_spacing(model, noise):
    from diffusers import DPMSolverMultistepScheduler

    x, labels = noise
    for order in (2, 3):
        ours = fs.make_sampler(f"dpmpp-{order}m", model, 6, fs.UniformGrid())
        s = DPMSolverMultistepScheduler.from_config(
            {k: v for k, v in model.schedule.config.items() if not k.startswith("_")},
            algorithm_type="dpmsolver++",
            solver_order=order,
            final_sigmas_type="sigma_min",
            timestep_spacing="trailing",
        )
        s.set_timesteps(6)
        ref = _diffusers_loop(s, model, x, labels)
        torch.testing.assert_close(ours.sample(model.denoiser(), x, labels).sample, ref)


def test_unipc_with_our_grid_matches_diffusers_native_spacing(model, noise):
    from diffusers import UniPCMultistepScheduler

    x, labels = noise
    ours = fs.make_sampler("unipc", model, 6, fs.UniformGrid())
    s = UniPCMultistepScheduler.from_config(
        {k: v for k, v in model.schedule.config.items() if not k.startswith("_")},
        final_sigmas_type="sigma_min",
        timestep_spacing="trailing",
    )
    s.set_timesteps(6)
    ref = _diffusers_loop(s, model, x, labels)
    torch.testing.assert_close(ours.sample(model.denoiser(), x, labels).sample, ref)


def test_euler_ddim_and_first_order_ipndm_agree(model, noise):
    # DDIM is Euler in EDM coordinates: three independent implementations of one method.
    # (K = 5 divides T: diffusers' DDIM steps to t - T // K, off the trailing grid otherwise.)
    x, labels = noise
    den = model.denoiser()
    euler = fs.make_sampler("euler", model, 5, fs.UniformGrid()).sample(den, x, labels)
    ddim = fs.make_sampler("ddim", model, 5).sample(den, x, labels)
    ipndm1 = fs.IPNDM(model.schedule, 5, fs.UniformGrid(), order=1).sample(den, x, labels)
    torch.testing.assert_close(euler.sample, ddim.sample, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ipndm1.sample, ddim.sample, rtol=1e-4, atol=1e-4)
    ipndm4 = fs.IPNDM(model.schedule, 5, fs.UniformGrid()).sample(den, x, labels)
    assert float((ipndm4.sample - ddim.sample).abs().max()) > 1e-2


def test_a_velocity_model_is_refused(model, noise):
    class Velocity:
        prediction = "velocity"
        sample_shape = model.sample_shape
        num_classes = None
        null_label = None

    with pytest.raises(fs.FewStepError, match="velocity"):
        fs.make_sampler("ipndm", model, 4).sample(Velocity(), noise[0])
    with pytest.raises(fs.FewStepError, match="velocity"):
        fs.make_sampler("ipndm", Velocity(), 4)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, model):
    root = tmp_path_factory.mktemp("fewstep")
    model.save(root / "m")
    return root / "m"


def _sample(model_dir, tmp_path, *extra):
    return main(
        [
            "diffusion",
            "sample",
            "--model",
            str(model_dir),
            "--num-samples",
            "2",
            "--out",
            str(tmp_path / "g.png"),
            "--threads",
            "1",
            *extra,
        ]
    )


def test_cli_samples_with_a_few_step_sampler(model_dir, tmp_path, capsys):
    assert (
        _sample(model_dir, tmp_path, "--sampler", "dpmpp-3m", "--steps", "4", "--grid", "logsnr")
        == 0
    )
    assert "4 dependent network calls" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--sampler", "unipc", "--steps", "0"], "--steps must be"),
        (
            ["--sampler", "unipc", "--steps", "3", "--grid-timesteps", "999,200,500,0"],
            "not strictly decreasing",
        ),
        (["--sampler", "pndm", "--steps", "4", "--grid", "polynomial"], "uniform grid"),
        (["--sampler", "amed", "--steps", "5"], "needs --predictor"),
    ],
)
def test_cli_bad_few_step_input_exits_2_with_one_line(model_dir, tmp_path, capsys, extra, message):
    assert _sample(model_dir, tmp_path, *extra) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_cli_refuses_a_velocity_model_directory(model, tmp_path, capsys):
    model.save(tmp_path / "v")
    path = tmp_path / "v" / "scheduler" / "scheduler_config.json"
    import json

    cfg = json.loads(path.read_text())
    cfg["prediction_type"] = "v_prediction"
    path.write_text(json.dumps(cfg))
    assert _sample(tmp_path / "v", tmp_path, "--sampler", "ipndm", "--steps", "3") == 2
    assert "epsilon" in capsys.readouterr().err


def test_the_cli_offers_every_training_preset():
    from fixedpoint.cli import diffusion as cli
    from fixedpoint.diffusion.train import PRESETS

    assert set(cli.PRESETS) == set(PRESETS)

"""AMED: neutral predictor == base solver, budgets, distillation, checkpoints, CLI."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fixedpoint.diffusion as fd
from fixedpoint.cli import main
from fixedpoint.diffusion import amed
from fixedpoint.diffusion import fewstep as fs


@pytest.fixture(scope="module")
def model():
    return fd.tiny_model(num_classes=3, seed=0)


@pytest.fixture(scope="module")
def noise(model):
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, *model.sample_shape, generator=g), torch.tensor([0, 1, 2])


def _predictor(model):
    return amed.AMEDPredictor(amed.bottleneck_features(model.unet))


def _refined(model, grid, steps):
    """The grid with the geometric midpoint of every interval inserted."""
    sig = fs.Sigmas(model.schedule)
    t = grid.timesteps(sig, steps)
    s = sig.at(t)
    mid = sig.t_of((s[:-1] * s[1:]).sqrt())
    values = [v for i in range(steps) for v in (float(t[i]), float(mid[i]))] + [0.0]
    return fs.CustomGrid(tuple(values))


@pytest.mark.parametrize("grid", [fs.PolynomialGrid(), fs.LogSNRGrid(), fs.UniformGrid()])
@pytest.mark.parametrize("afs", [True, False])
def test_neutral_amed_steps_are_their_base_solver_steps(model, noise, grid, afs):
    x, labels = noise
    den = model.denoiser()
    solver = amed.AMEDSolver(model.schedule, 3, _predictor(model), grid, afs)
    base = fs.Midpoint(model.schedule, 3, grid, afs)
    a, b = solver.sample(den, x, labels), base.sample(den, x, labels)
    torch.testing.assert_close(a.sample, b.sample, rtol=1e-6, atol=1e-5)
    assert a.network.calls == b.network.calls == solver.nfe == 6 - afs
    plugin = amed.AMEDPlugin(model.schedule, 3, _predictor(model), grid, afs)
    ipndm = fs.IPNDM(model.schedule, 6, _refined(model, grid, 3), afs=afs, integer=False)
    p, q = plugin.sample(den, x, labels), ipndm.sample(den, x, labels)
    torch.testing.assert_close(p.sample, q.sample, rtol=1e-6, atol=1e-5)
    assert p.network.calls == q.network.calls == plugin.nfe


def _diffusers_dpmpp(model, x, labels, sigmas, order, afs):
    """diffusers' DPM-Solver++ (data prediction, midpoint 2M / 3M, lower_order_final) driven
    through the given (fractional) noise levels: the reference for the neutral plugin."""
    from diffusers import DPMSolverMultistepScheduler

    sig = fs.Sigmas(model.schedule)
    cfg = {k: v for k, v in model.schedule.config.items() if not k.startswith("_")}
    sched = DPMSolverMultistepScheduler.from_config(
        {
            **cfg,
            "algorithm_type": "dpmsolver++",
            "solver_order": order,
            "final_sigmas_type": "sigma_min",
            "lower_order_final": True,
        }
    )
    n = len(sigmas) - 1
    sched.set_timesteps(n)
    # The levels themselves replace diffusers' (its step reads only these two arrays).
    sched.sigmas = sigmas.to(x.dtype)
    sched.timesteps = sig.t_of(sigmas[:-1]).float()
    sched.set_begin_index(0)
    eps = fs.GuidedEps(model.denoiser(), labels, None, len(x))
    with torch.no_grad():
        for k in range(n):
            t = sched.timesteps[k]
            e = x if afs and k == 0 else eps(x, t.reshape(1))  # AFS: eps ~ x at sigma_max
            x = sched.step(e, t, x).prev_sample
    return x


def _geometric_refinement(model, grid, steps):
    sig = fs.Sigmas(model.schedule)
    s = sig.at(grid.timesteps(sig, steps))
    mid = (s[:-1] * s[1:]).sqrt()
    return torch.stack([s[:-1], mid], 1).flatten().tolist() + [float(s[-1])]


@pytest.mark.parametrize("grid", [fs.PolynomialGrid(), fs.LogSNRGrid(), fs.UniformGrid()])
@pytest.mark.parametrize("afs", [True, False])
@pytest.mark.parametrize("order", [2, 3])
def test_neutral_dpmpp_plugin_is_diffusers_dpmpp_on_the_refined_grid(
    model, noise, grid, afs, order
):
    x, labels = noise
    plugin = amed.AMEDPluginDPMpp(model.schedule, 3, _predictor(model), grid, afs, order=order)
    out = plugin.sample(model.denoiser(), x, labels)
    sigmas = torch.tensor(_geometric_refinement(model, grid, 3), dtype=torch.float64)
    torch.testing.assert_close(plugin.grid_sigma, sigmas[::2])
    ref = _diffusers_dpmpp(model, x, labels, sigmas, order, afs)
    # diffusers steps in float32 whatever the input, and this random UNet's samples reach
    # hundreds: agreement is judged relative to the samples' scale, and a wrong order
    # (the other of 2M / 3M) must miss by far more.
    scale = float(ref.abs().max())
    assert float((out.sample - ref).abs().max()) <= 1e-5 * scale
    other = _diffusers_dpmpp(model, x, labels, sigmas, 5 - order, afs)
    assert float((out.sample - other).abs().max()) > 1e-3 * scale
    assert out.network.calls == plugin.nfe == 6 - afs
    assert bool(torch.isfinite(out.sample).all())


class _FixedR(torch.nn.Module):
    """A stand-in predictor: a given r per interval (looked up by t_cur), c = 1."""

    def __init__(self, features, r_by_t):
        super().__init__()
        self.config = {"features": features}
        self.r_by_t = r_by_t

    def forward(self, feats, t_cur, t_next):
        # float64, so that s_mid lands on the training level to float64 precision (a
        # float32 r puts the UNet at t = 498.99999 instead of 499).
        r = torch.tensor(self.r_by_t[int(t_cur)], dtype=torch.float64)
        return r.expand(len(feats)), torch.ones(len(feats))


def test_a_plugin_with_integer_midpoints_is_the_projects_dpmpp_2m(model, noise):
    # r chosen so that every s_mid is a training noise level: the plugin is then the
    # project's own DPM-Solver++(2M) (diffusers through make_sampler) on the integer grid.
    x, labels = noise
    sig = fs.Sigmas(model.schedule)
    t = fs.UniformGrid().timesteps(sig, 3)
    mids = [int(v) for v in ((t[:-1] + t[1:]) // 2)]
    s = sig.at(t)
    r_by_t = {
        int(t[i]): float((sig.train[mids[i]] / s[i]).log() / (s[i + 1] / s[i]).log())
        for i in range(3)
    }
    pred = _FixedR(amed.bottleneck_features(model.unet), r_by_t)
    plugin = amed.AMEDPluginDPMpp(model.schedule, 3, pred, fs.UniformGrid(), afs=False)
    values = tuple(float(v) for i in range(3) for v in (t[i], mids[i])) + (0.0,)
    base = fs.make_sampler("dpmpp-2m", model, 6, fs.CustomGrid(values))
    den = model.denoiser()
    a, b = plugin.sample(den, x, labels), base.sample(den, x, labels)
    # Not bit-equal arithmetic: diffusers keeps its schedule in float32 while the plugin's
    # sigmas are float64; even with the UNet and the samples in float64 the two differ by
    # 1e-7 relative, and this random tiny UNet amplifies that (float32: 3.5e-5 at one
    # element of 192 on one machine, under 1e-5 on another).  So: close at 1e-4, and
    # far closer to DPM-Solver++(2M) than to another solver on the same grid.
    torch.testing.assert_close(a.sample, b.sample, rtol=1e-4, atol=1e-4)
    other = fs.make_sampler("unipc", model, 6, fs.CustomGrid(values)).sample(den, x, labels)
    gap = float((a.sample - b.sample).abs().max())
    assert gap < 1e-2 * float((other.sample - b.sample).abs().max())
    assert a.network.calls == b.network.calls == 6


def test_the_dpmpp_plugin_is_deterministic_and_its_scale_acts_on_the_model_term(model, noise):
    x, labels = noise
    den = model.denoiser()
    pred = _predictor(model)
    with torch.no_grad():
        pred.head.bias.copy_(torch.tensor([0.7, 40.0]))  # r != 1/2, c at the band's top
    plugin = amed.AMEDPluginDPMpp(model.schedule, 3, pred)
    a, b = plugin.sample(den, x, labels), plugin.sample(den, x, labels)
    assert torch.equal(a.sample, b.sample) and bool(torch.isfinite(a.sample).all())
    neutral = amed.AMEDPluginDPMpp(model.schedule, 3, _predictor(model)).sample(den, x, labels)
    assert float((a.sample - neutral.sample).abs().max()) > 1e-3
    # One update by hand: c multiplies (y_t - (s_t / s_0) y), the model term, and no more.
    y = torch.randn(2, 4)
    hist = [
        (torch.randn(2, 4), torch.full((2,), 3.0, dtype=torch.float64)),
        (torch.randn(2, 4), torch.full((2,), 2.0, dtype=torch.float64)),
    ]
    s_t = torch.full((2,), 1.0, dtype=torch.float64)
    plain = amed.dpmpp_update(y, hist, s_t, 2)
    scaled = amed.dpmpp_update(y, hist, s_t, 2, torch.tensor([1.01, 0.99]))
    torch.testing.assert_close(scaled - y / 2, (plain - y / 2) * torch.tensor([[1.01], [0.99]]))
    # Order 1 with the denoised D held fixed is exact: y_t - D = (s_t / s_0) (y - D).
    d = hist[-1][0]
    torch.testing.assert_close(amed.dpmpp_update(y, hist, s_t, 1), d + (y - d) / 2)


@given(
    top=st.floats(-2.0, 4.0),
    gaps=st.lists(st.floats(0.05, 2.0), min_size=3, max_size=3),  # log-sigma steps
    order=st.integers(1, 3),
    c=st.floats(0.99, 1.01),
    seed=st.integers(0, 2**16),
)
def test_dpmpp_update_is_exact_for_a_constant_denoised_sample(top, gaps, order, c, seed):
    # With D the same at every history point the ODE dy/dsigma = (y - D) / sigma is solved
    # exactly by y_t = D + (s_t / s_0)(y - D) at any order (the differences vanish), and c
    # scales exactly the model term y_t - (s_t / s_0) y = (1 - s_t / s_0) D.
    logs = [top - sum(gaps[:k]) for k in range(4)]
    s = [float(torch.tensor(v, dtype=torch.float64).exp()) for v in logs]
    g = torch.Generator().manual_seed(seed)
    y, d = torch.randn(2, 5, generator=g, dtype=torch.float64)
    y, d = y.expand(2, 5), d.expand(2, 5)
    hist = [(d, torch.full((2,), v, dtype=torch.float64)) for v in s[:3]]
    s_t = torch.full((2,), s[3], dtype=torch.float64)
    ratio = s[3] / s[2]
    out = amed.dpmpp_update(y, hist, s_t, order, torch.tensor([c, 1.0]))
    torch.testing.assert_close(out[1], d[1] + ratio * (y[1] - d[1]))
    torch.testing.assert_close(out[0] - ratio * y[0], c * (1 - ratio) * d[0])


def test_bad_plugin_orders_are_refused_in_one_line(model):
    for cls, bad in ((amed.AMEDPluginDPMpp, 4), (amed.AMEDPluginDPMpp, 0), (amed.AMEDPlugin, 5)):
        with pytest.raises(amed.AMEDError, match="order must be") as info:
            cls(model.schedule, 3, _predictor(model), order=bad)
        assert len(str(info.value).splitlines()) == 1


def test_a_non_neutral_predictor_changes_the_step_within_its_band(model, noise):
    x, labels = noise
    pred = _predictor(model)
    with torch.no_grad():
        pred.head.bias.copy_(torch.tensor([1.5, 40.0]))
    r, c = pred(torch.zeros(2, pred.config["features"]), torch.tensor([999]), torch.tensor([500]))
    assert torch.allclose(r, torch.sigmoid(torch.tensor(1.5)).expand(2))
    assert bool((c <= 1.01).all()) and bool((c > 1.0099).all())
    moved = amed.AMEDSolver(model.schedule, 3, pred).sample(model.denoiser(), x, labels)
    base = fs.Midpoint(model.schedule, 3, afs=True).sample(model.denoiser(), x, labels)
    assert float((moved.sample - base.sample).abs().max()) > 1e-3


def test_budgets_map_to_intervals_and_the_analytical_first_step():
    assert amed.amed_for_budget(5) == (3, True)
    assert amed.amed_for_budget(6) == (3, False)
    assert amed.amed_for_budget(3) == (2, True)
    with pytest.raises(amed.AMEDError, match="at least 2"):
        amed.amed_for_budget(1)
    with pytest.raises(amed.AMEDError, match="at least 2"):
        amed.AMEDTrainConfig(nfe=0).validate()


@pytest.fixture(scope="module")
def trained(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("amed") / "p.pt"
    cfg = amed.AMEDTrainConfig(kind="amed", nfe=3, samples=16, epochs=4, batch_size=8, lr=5e-3)
    sampler, report = amed.train_amed(model, cfg, path, progress=False)
    return path, sampler, report, cfg


def test_distillation_reduces_the_loss_and_reloads_identically(model, noise, trained):
    path, sampler, report, cfg = trained
    assert report["losses"][-1] < report["losses"][0]
    again = amed.load_amed(path, model)
    x, labels = noise
    a = sampler.sample(model.denoiser(), x, labels).sample
    assert torch.equal(a, again.sample(model.denoiser(), x, labels).sample)
    # A finished checkpoint of the same settings is reused, not retrained.
    _, report2 = amed.train_amed(model, cfg, path, progress=False)
    assert report2 == report


def test_the_trained_student_is_closer_to_its_teacher_than_the_neutral_one(model, trained):
    _, sampler, _, cfg = trained
    g = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn(cfg.samples, *model.sample_shape, generator=g)
    labels = torch.arange(cfg.samples) % 3
    ref = (
        amed.teacher_states(model, cfg, x, labels)[:, -1] / (1 + sampler.grid_sigma[-1] ** 2).sqrt()
    )
    neutral = amed.AMEDSolver(model.schedule, 2, _predictor(model), afs=True)

    def err(s):
        return float((s.sample(model.denoiser(), x, labels).sample - ref).pow(2).mean())

    assert err(sampler) < err(neutral)


def test_a_predictor_for_another_model_is_refused(trained):
    path = trained[0]
    other = fd.tiny_model(num_classes=3, seed=5)
    with pytest.raises(amed.AMEDError, match="trained for another model"):
        amed.load_amed(path, other)


def test_cli_amed_sampling_and_mismatch_exit_codes(model, trained, tmp_path, capsys):
    path = trained[0]
    model.save(tmp_path / "m")
    other = fd.tiny_model(num_classes=3, seed=5)
    other.save(tmp_path / "o")
    base = [
        "diffusion",
        "sample",
        "--num-samples",
        "2",
        "--out",
        str(tmp_path / "g.png"),
        "--threads",
        "1",
        "--sampler",
        "amed",
        "--predictor",
        str(path),
    ]
    assert main([*base, "--model", str(tmp_path / "m"), "--steps", "3"]) == 0
    assert "3 dependent network calls" in capsys.readouterr().out
    assert main([*base, "--model", str(tmp_path / "o"), "--steps", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "trained for another model" in err and len(err.splitlines()) == 1
    assert main([*base, "--model", str(tmp_path / "m"), "--steps", "5"]) == 2
    assert "not amed with --steps 5" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["amed-plugin", "amed-plugin-dpmpp"])
def test_cli_amed_train_writes_a_checkpoint(model, tmp_path, capsys, kind):
    model.save(tmp_path / "m")
    out = tmp_path / "p.pt"
    code = main(
        [
            "diffusion",
            "amed-train",
            "--model",
            str(tmp_path / "m"),
            "--kind",
            kind,
            "--steps",
            "3",
            "--samples",
            "8",
            "--epochs",
            "1",
            "--batch-size",
            "8",
            "--out",
            str(out),
            "--quiet",
            "--threads",
            "1",
        ]
    )
    assert code == 0 and out.is_file()
    assert type(amed.load_amed(out, model)) is amed.KINDS[kind]
    assert (
        main(
            [
                "diffusion",
                "amed-train",
                "--model",
                str(tmp_path / "m"),
                "--steps",
                "0",
                "--out",
                str(out),
            ]
        )
        == 2
    )


@pytest.fixture(scope="module")
def trained_dpmpp(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("amed-dpmpp") / "p.pt"
    cfg = amed.AMEDTrainConfig(
        kind="amed-plugin-dpmpp", nfe=3, samples=16, epochs=4, batch_size=8, lr=5e-3
    )
    sampler, report = amed.train_amed(model, cfg, path, progress=False)
    return path, sampler, report, cfg


def test_the_dpmpp_plugin_distils_saves_and_refuses_another_model(model, noise, trained_dpmpp):
    path, sampler, report, cfg = trained_dpmpp
    assert isinstance(sampler, amed.AMEDPluginDPMpp) and sampler.nfe == 3
    assert report["losses"][-1] < report["losses"][0]
    again = amed.load_amed(path, model)
    assert isinstance(again, amed.AMEDPluginDPMpp) and again.order == sampler.order == 2
    x, labels = noise
    a = sampler.sample(model.denoiser(), x, labels).sample
    assert torch.equal(a, again.sample(model.denoiser(), x, labels).sample)
    assert bool(torch.isfinite(a).all())
    with pytest.raises(amed.AMEDError, match="trained for another model"):
        amed.load_amed(path, fd.tiny_model(num_classes=3, seed=5))


def test_cli_dpmpp_plugin_sampling_and_bad_input(model, trained_dpmpp, tmp_path, capsys):
    path = trained_dpmpp[0]
    model.save(tmp_path / "m")
    base = [
        "diffusion",
        "sample",
        "--model",
        str(tmp_path / "m"),
        "--num-samples",
        "2",
        "--out",
        str(tmp_path / "g.png"),
        "--threads",
        "1",
        "--predictor",
        str(path),
    ]
    assert main([*base, "--sampler", "amed-plugin-dpmpp", "--steps", "3"]) == 0
    assert "3 dependent network calls" in capsys.readouterr().out
    # The checkpoint holds a DPM-Solver++ plugin: asking for the iPNDM one is refused.
    assert main([*base, "--sampler", "amed-plugin", "--steps", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "amed-plugin-dpmpp predictor" in err and len(err.splitlines()) == 1
    assert main([*base, "--sampler", "amed-plugin-dpmpp", "--steps", "4"]) == 2
    assert "not amed-plugin-dpmpp with --steps 4" in capsys.readouterr().err


def test_cli_offers_every_amed_kind():
    from fixedpoint.cli import diffusion as cli

    assert cli.AMED_KINDS == tuple(amed.KINDS)
    assert set(cli.LEARNED) == {*amed.KINDS, "boss"}

"""AMED: neutral predictor == base solver, budgets, distillation, checkpoints, CLI."""

from __future__ import annotations

import pytest
import torch

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


def test_cli_amed_train_writes_a_checkpoint(model, tmp_path, capsys):
    model.save(tmp_path / "m")
    out = tmp_path / "p.pt"
    code = main(
        [
            "diffusion",
            "amed-train",
            "--model",
            str(tmp_path / "m"),
            "--kind",
            "amed-plugin",
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
    assert isinstance(amed.load_amed(out, model), amed.AMEDPlugin)
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

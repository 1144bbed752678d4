"""``fixedpoint diffusion``: sample and generate on a saved UNet; errors exit 2."""

from __future__ import annotations

import json

import pytest
import torch

from fixedpoint.cli import main
from fixedpoint.diffusion import DDIMChain, load_model, sample_loop, tiny_model


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    cond = tiny_model(num_classes=3, seed=0)
    cond.meta["dataset"] = "digits"
    cond.save(root / "cond")
    tiny_model(num_classes=None, seed=1).save(root / "uncond")
    return root


def test_sample_writes_a_grid_and_reports_costs(model_dirs, tmp_path, capsys):
    out = tmp_path / "grid.png"
    code = main(
        [
            "diffusion",
            "sample",
            "--model",
            str(model_dirs / "cond"),
            "--steps",
            "8",
            "--num-samples",
            "3",
            "--method",
            "window",
            "--window",
            "3",
            "--atol",
            "0",
            "--guidance",
            "2",
            "--compare",
            "--out",
            str(out),
            "--threads",
            "1",
        ]
    )
    assert code == 0 and out.exists()
    text = capsys.readouterr().out
    assert "dependent network calls" in text and "max deviation" in text


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_sample_on_the_clean_split_reaches_the_sequential_sampler(
    model_dirs, tmp_path, capsys, sampler
):
    args = ["diffusion", "sample", "--model", str(model_dirs / "uncond"), "--sampler", sampler]
    args += ["--steps", "6", "--num-samples", "2", "--method", "jacobi", "--split", "clean"]
    args += ["--atol", "0", "--compare", "--out", str(tmp_path / "g.png"), "--threads", "1"]
    assert main(args) == 0
    text = capsys.readouterr().out
    deviation = float(text.split("max deviation")[1].split()[0])
    # The random tiny UNet's samples are of order 100: float32 rounding of the two
    # summation orders is relative to that scale.
    model = load_model(model_dirs / "uncond")
    chain = DDIMChain.from_schedule(model.schedule, 6)
    scale = float(sample_loop(chain, model.denoiser(), torch.randn(2, 1, 8, 8)).abs().max())
    assert deviation <= 1e-6 * max(1.0, scale), (text, scale)


@pytest.mark.slow
def test_generate_is_resumable_and_independent_of_sharding(model_dirs, tmp_path, capsys):
    base = [
        "diffusion",
        "generate",
        "--model",
        str(model_dirs / "uncond"),
        "--sampler",
        "ddpm",
        "--steps",
        "6",
        "--method",
        "paradigms",
        "--window",
        "4",
        "--num-samples",
        "5",
        "--quiet",
        "--threads",
        "1",
    ]
    assert main([*base, "--shard-size", "2", "--out-dir", str(tmp_path / "a")]) == 0
    first = torch.load(tmp_path / "a" / "samples.pt", weights_only=False)
    (tmp_path / "a" / "shards" / "shard-1.pt").unlink()  # a lost shard is redone
    assert main([*base, "--shard-size", "2", "--out-dir", str(tmp_path / "a")]) == 0
    again = torch.load(tmp_path / "a" / "samples.pt", weights_only=False)
    assert torch.equal(first["images"], again["images"])
    assert main([*base, "--shard-size", "5", "--out-dir", str(tmp_path / "b")]) == 0
    other = torch.load(tmp_path / "b" / "samples.pt", weights_only=False)
    assert torch.allclose(first["images"], other["images"], atol=1e-5, rtol=1e-5)
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["samples"] == 5 and report["shards"] == 3
    # the same directory with other settings is refused
    capsys.readouterr()
    code = main(
        [
            *base[:-5],
            "--num-samples",
            "5",
            "--quiet",
            "--shard-size",
            "2",
            "--steps",
            "7",
            "--out-dir",
            str(tmp_path / "a"),
        ]
    )
    assert code == 2 and "other settings" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--window", "0"], "--window must be >= 1"),
        (["--steps", "0"], "--steps must be"),
        (["--steps", "5000"], "exceeds"),
        (["--guidance", "2"], "unconditional"),
        (["--atol", "nan"], "--atol"),
        (["--sampler", "euler", "--split", "clean"], "applies to ddim and ddpm"),
        (["--split", "x"], "--split"),
    ],
)
def test_bad_input_exits_2_with_one_line(model_dirs, tmp_path, capsys, extra, words):
    code = main(
        [
            "diffusion",
            "sample",
            "--model",
            str(model_dirs / "uncond"),
            "--out",
            str(tmp_path / "x.png"),
            *extra,
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and words in err and len(err.splitlines()) == 1, err


def test_not_a_model_directory(tmp_path, capsys):
    code = main(["diffusion", "sample", "--model", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "not a diffusers model" in err


def test_the_command_line_offers_exactly_the_solvers_generate_builds():
    from fixedpoint.cli import diffusion as cli
    from fixedpoint.diffusion import generate

    assert cli.METHODS == generate.METHODS


def test_window_anderson_solves_on_the_window(model_dirs, tmp_path, capsys):
    # ParaTAA on the sliding window from the command line (its parity with the sequential
    # sampler is tested on exact-score chains in test_diffusion_solvers.py; this tiny
    # random UNet amplifies rounding differences of every method alike): each call
    # evaluates at most the window, plus the one step before it the Picard form re-reads.
    code = main(
        [
            "diffusion",
            "sample",
            "--model",
            str(model_dirs / "cond"),
            "--sampler",
            "ddpm",
            "--steps",
            "12",
            "--num-samples",
            "2",
            "--method",
            "window-anderson",
            "--window",
            "5",
            "--atol",
            "0",
            "--out",
            str(tmp_path / "g.png"),
            "--threads",
            "1",
        ]
    )
    assert code == 0
    line = next(s for s in capsys.readouterr().out.splitlines() if "by window-anderson" in s)
    calls = int(line.split(" dependent network calls")[0].split()[-1])
    rows = int(line.split(" network rows per sample")[0].split()[-1])
    assert calls <= 12 and rows <= calls * (5 + 1)


def test_train_names_the_loss_of_a_flow_model(tmp_path, capsys):
    code = main(
        ["diffusion", "train", "--preset", "flow-digits", "--steps", "2", "--out-dir",
         str(tmp_path / "flow"), "--quiet"]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "test loss (velocity MSE)" in out

"""The command-line interface, in process (``main(argv)``) and as ``python -m fixedpoint``."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from fixedpoint import cli
from fixedpoint.cli import main
from fixedpoint.tarflow.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
TINY = ["--width", "64", "--blocks", "2", "--layers", "1", "--threads", "1", "--quiet"]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> object:
    # Tiny models: one thread is as fast, and immune to a busy second core.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "tiny.pt"
    assert main(["train", "--preset", "digits", "--steps", "3", "--checkpoint", str(path),
                 *TINY]) == 0
    return path


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code: int, err: str, pattern: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert pattern in lines[0], lines[0]


def test_train_prints_nll_and_checkpoint(
    checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = load_checkpoint(checkpoint)
    assert ckpt.step == 3 and ckpt.config["width"] == 64 and ckpt.config["layers"] == 1
    # Rerunning the same command finds the finished run and reports it again.
    code, out, _ = run(["train", "--preset", "digits", "--steps", "3", "--checkpoint",
                        str(checkpoint), *TINY], capsys)
    assert code == 0
    assert f"test NLL: {ckpt.extra['test_bpd']:.4f} bits/dim" in out
    assert f"checkpoint: {checkpoint}" in out
    assert "resumed from 3" in out


def test_sample_sequential_writes_png_and_table(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    png = tmp_path / "grid.png"
    code, out, _ = run(["sample", "--checkpoint", str(checkpoint), "--batch", "4",
                        "--out", str(png), "--labels", "3"], capsys)
    assert code == 0
    import matplotlib.image

    image = matplotlib.image.imread(png)
    assert image.ndim == 3 and image.shape[0] >= 16 and image.shape[1] >= 16
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.lstrip().startswith("block"))
    assert "dep.steps" in lines[header] and "token evals" in lines[header]
    rows = [line.split() for line in lines[header + 2 : header + 4]]
    assert [r[0] for r in rows] == ["0", "1"]
    assert all("Sequential" in " ".join(r) and r[-1] == "SUCCESS" for r in rows)
    # Sequential: T - 1 = 15 dependent steps per block (x_0 = z_0 needs no network call).
    total = next(line for line in lines if line.startswith("total")).split()
    assert total[2] == "30"
    assert f"wrote 4 samples to {png}" in out


@pytest.mark.parametrize("strategy", ["jacobi", "gs-jacobi", "triangular-anderson",
                                      "anderson", "[1-4-8-5]", "[0/1-2/4-3/6-10]"])
def test_sample_strategies(
    strategy: str, checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(["sample", "--checkpoint", str(checkpoint), "--batch", "2",
                          "--strategy", strategy, "--out", str(tmp_path / "s.png"),
                          "--guidance", "1.0"], capsys)
    assert code == 0, err
    assert (tmp_path / "s.png").stat().st_size > 0
    if strategy == "[1-4-8-5]":
        assert "GSJacobi(modules=4, max_iter=8)" in out and "Jacobi(max_iter=5)" in out


def test_sample_bfloat16_and_unconditional_labels(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(["sample", "--checkpoint", str(checkpoint), "--batch", "2",
                          "--dtype", "bfloat16", "--labels", "none", "--denoise",
                          "--out", str(tmp_path / "b.png")], capsys)
    assert code == 0, err
    assert "bfloat16" in out


def test_metrics_table(checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["metrics", "--checkpoint", str(checkpoint), "--batch", "32"], capsys)
    assert code == 0, err
    lines = [line for line in out.splitlines() if line.startswith("|")]
    assert "CRM %" in lines[0] and len(lines) == 2 + 2  # header, rule, one row per block
    percents = [float(line.split("|")[3]) for line in lines[2:]]
    assert sum(percents) == pytest.approx(100.0, abs=0.05)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--strategy", "[1-2-3]"], "bad --strategy '[1-2-3]'"),
        (["--strategy", "newton"], "bad --strategy 'newton'"),
        (["--strategy", "[5-2-3-4]"], "block index 5 out of range"),
        (["--strategy", "gs-jacobi", "--modules", "99"], "--modules must be in 1..16"),
        (["--labels", "12"], "--labels 12 outside 0..9"),
        (["--labels", "a,b"], "comma-separated integers"),
        (["--batch", "0"], "--batch must be >= 1"),
        (["--device", "cuda:0"], "CUDA is not available"),
    ],
)
def test_sample_user_errors(
    argv: list[str], message: str, checkpoint: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, _, err = run(["sample", "--checkpoint", str(checkpoint), "--out",
                        str(tmp_path / "x.png"), *argv], capsys)
    assert_user_error(code, err, message)
    assert not (tmp_path / "x.png").exists()


def test_missing_and_corrupt_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(["sample", "--checkpoint", str(tmp_path / "none.pt")], capsys)
    assert_user_error(code, err, f"no checkpoint at {tmp_path / 'none.pt'}")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 999, dtype=np.uint8).tobytes())
    code, _, err = run(["metrics", "--checkpoint", str(bad)], capsys)
    assert_user_error(code, err, "not a readable checkpoint")
    # train refuses to resume from (and overwrite) a corrupt checkpoint.
    code, _, err = run(["train", "--steps", "1", "--checkpoint", str(bad), *TINY], capsys)
    assert_user_error(code, err, "not a readable checkpoint")


def test_default_checkpoint_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # no .cache/runs here
    code, _, err = run(["sample", "--dataset", "digits"], capsys)
    assert_user_error(code, err, "train one with `fixedpoint train --dataset digits`")


def test_train_user_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = ["--out-dir", str(tmp_path / "run")]
    code, _, err = run(["train", "--preset", "mnist-p4", "--data-dir", str(tmp_path / "no"),
                        *out, *TINY], capsys)
    assert_user_error(code, err, "MNIST directory does not exist")
    code, _, err = run(["train", "--dtype", "bfloat16", *out], capsys)
    assert_user_error(code, err, "training runs in float32")
    code, _, err = run(["train", "--preset", "digits", "--dataset", "mnist", *out], capsys)
    assert_user_error(code, err, "preset digits trains on digits, not mnist")
    code, _, err = run(["train", "--preset", "cifar", *out], capsys)
    assert_user_error(code, err, "unknown preset 'cifar'")
    code, _, err = run(["train", "--width", "100", *out], capsys)
    assert_user_error(code, err, "not divisible by head_dim")
    code, _, err = run(["train", "--steps", "0", *out, *TINY], capsys)
    assert_user_error(code, err, "steps must be >= 1")


def test_custom_sizes_get_their_own_run_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    captured = {}

    def fake_train(model_cfg, train_cfg, progress=True):  # type: ignore[no-untyped-def]
        captured["cfg"] = train_cfg
        raise KeyboardInterrupt("stopped")

    monkeypatch.setattr("fixedpoint.tarflow.train.train", fake_train)
    assert main(["train", "--quiet"]) == 130
    assert captured["cfg"].out_dir == ".cache/runs/digits"
    assert main(["train", "--quiet", "--width", "128"]) == 130
    assert captured["cfg"].out_dir.startswith(".cache/runs/digits-")
    assert main(["train", "--quiet", "--threads", "1"]) == 130
    assert captured["cfg"].out_dir == ".cache/runs/digits"


def test_demo_forwards_arguments(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seen = {}
    fake = types.ModuleType("fixedpoint.demo")
    fake.main = lambda argv: seen.update(argv=argv)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fixedpoint.demo", fake)
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name: object())
    assert main(["demo", "--length", "8", "--seed", "3"]) == 0
    assert seen["argv"] == ["--length", "8", "--seed", "3"]

    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name: None)
    assert main(["demo"]) == 1
    assert "not available" in capsys.readouterr().err


def test_help_lists_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for command in ("train", "sample", "metrics", "demo"):
        assert command in out


def test_python_dash_m(tmp_path: Path) -> None:
    # One subprocess (each pays the torch import): the real entry point, exit status 2
    # and a one-line message without a traceback.
    missing = tmp_path / "missing.pt"
    proc = subprocess.run([sys.executable, "-m", "fixedpoint", "sample", "--checkpoint",
                           str(missing)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr == f"fixedpoint sample: error: no checkpoint at {missing}\n"
    assert proc.stdout == ""


def test_reproduce_refuses_unknown_study_and_lists_names(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import importlib

    reproduce = importlib.import_module("studies.reproduce")
    names = [name for name, _, _ in reproduce.STUDIES]
    with pytest.raises(SystemExit):
        reproduce.main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "run only these studies: " + ", ".join(names) in help_text
    # Refused while parsing: nothing runs and paper.md is not rewritten.
    with pytest.raises(SystemExit) as info:
        reproduce.main(["--only", "bogus"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'bogus'" in err and all(repr(n) in err for n in names)

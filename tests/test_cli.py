"""The command-line interface, in process (``main(argv)``) and as ``python -m fixedpoint``."""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import fixedpoint.cli
from fixedpoint.cli import main
from fixedpoint.cli.common import checked_float, checked_int
from fixedpoint.tarflow import TarFlow, TarFlowConfig
from fixedpoint.tarflow.checkpoint import load_checkpoint, save_checkpoint

REPO = Path(__file__).resolve().parents[1]
TINY = ["--width", "64", "--blocks", "2", "--layers", "1", "--threads", "1", "--quiet"]


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


def assert_one_line_error(code: int, err: str, pattern: str, status: int = 2) -> None:
    assert code == status
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and "usage:" not in err
    assert lines[0].startswith("fixedpoint"), lines[0]
    assert pattern in lines[0], lines[0]


# ------------------------------------------------------------- the package contract


@pytest.fixture
def probe_group(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> object:
    """A command group ``probe`` in a module the package has never seen: it is found
    without editing any CLI file. Its handler records what it saw and does what
    ``--do`` says."""
    (tmp_path / "zz_probe.py").write_text(textwrap.dedent("""
        import torch
        from fixedpoint.cli.common import (
            CommandFailed, UserError, add_threads_option, positive_int)

        SEEN = []

        def handler(args):
            SEEN.append(torch.get_num_threads())
            if args.do == "user-error":
                raise UserError("that input is wrong")
            if args.do == "fail":
                raise CommandFailed("the solver diverged in block 1")
            if args.do == "interrupt":
                raise KeyboardInterrupt
            return args.n

        def register(subparsers):
            p = subparsers.add_parser("probe", help="a probe group")
            p.add_argument("--do", default="ok")
            p.add_argument("--n", type=positive_int, default=7)
            add_threads_option(p)
            p.set_defaults(func=handler, on_interrupt="rerun to resume")
    """))
    monkeypatch.setattr(fixedpoint.cli, "__path__", [*fixedpoint.cli.__path__, str(tmp_path)])
    monkeypatch.delitem(sys.modules, "fixedpoint.cli.zz_probe", raising=False)
    yield
    sys.modules.pop("fixedpoint.cli.zz_probe", None)


def test_group_modules_are_discovered(
    probe_group: object, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["probe"]) == 7
    assert main(["probe", "--n", "3"]) == 3
    assert main(["--help"]) == 0
    listing = capsys.readouterr().out
    for command in ("probe", "train", "sample", "generate", "metrics", "convert", "demo"):
        assert f"    {command} " in listing, command
    names = [m.__name__.rsplit(".", 1)[1] for m in fixedpoint.cli.group_modules()]
    assert {"tarflow", "demo", "zz_probe"} <= set(names) and "common" not in names


def test_errors_of_a_group_are_one_line_with_their_exit_status(
    probe_group: object, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(["probe", "--do", "user-error"], capsys)
    assert_one_line_error(code, err, "fixedpoint: error: that input is wrong")
    code, _, err = run(["probe", "--do", "fail"], capsys)
    assert_one_line_error(code, err, "fixedpoint: error: the solver diverged in block 1",
                          status=1)
    code, _, err = run(["probe", "--n", "0"], capsys)
    assert_one_line_error(code, err, "fixedpoint probe: error: --n must be >= 1, got 0")
    code, _, err = run(["probe", "--do", "interrupt"], capsys)
    assert (code, err) == (130, "fixedpoint: interrupted; rerun to resume\n")


def test_threads_apply_to_the_command_and_are_restored(
    probe_group: object, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.set_num_threads(1)
    assert main(["probe", "--threads", "2"]) == 7
    assert torch.get_num_threads() == 1
    assert main(["probe", "--threads", "2", "--do", "interrupt"]) == 130
    assert torch.get_num_threads() == 1
    assert main(["probe", "--threads", "2", "--do", "user-error"]) == 2
    assert torch.get_num_threads() == 1
    assert main(["probe"]) == 7  # no --threads: left as it is
    capsys.readouterr()
    assert sys.modules["fixedpoint.cli.zz_probe"].SEEN == [2, 2, 2, 1]


@pytest.mark.parametrize(
    ("kind", "text", "message"),
    [
        (checked_float(), "nan", "must be a finite number, got 'nan'"),
        (checked_float(), "-inf", "must be a finite number, got '-inf'"),
        (checked_float(), "1e999", "must be a finite number, got '1e999'"),
        (checked_float(0.0, open_low=True), "0", "must be > 0, got 0"),
        (checked_float(0.0, 100.0), "100.5", "must be in [0, 100], got 100.5"),
        (checked_float(), "x", "must be a number, got 'x'"),
        (checked_int(1), "0", "must be >= 1, got 0"),
        (checked_int(1, 5), "6", "must be in [1, 5], got 6"),
        (checked_int(), "1.5", "must be an integer, got '1.5'"),
    ],
)
def test_checked_types_refuse(kind, text: str, message: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=message.replace("[", r"\[")):
        kind(text)


def test_checked_types_accept_the_bounds() -> None:
    assert checked_float(0.0, 100.0)("100") == 100.0 and checked_float(0.0)("0") == 0.0
    assert checked_float()("-1e300") == -1e300
    assert checked_int(1, 5)("5") == 5 and checked_int(1)(" 3 ") == 3


# ------------------------------------------------------------------ TarFlow commands


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
    capped = [line.split()[0] for line in out.splitlines()
              if line[:5].strip().isdigit() and line.rstrip().endswith("MAX_ITER")]
    if capped:  # named in one note on stderr
        assert f"note: block(s) {', '.join(capped)} stopped at the iteration cap" in err
    else:
        assert "iteration cap" not in err


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
        (["--batch", "0"], "--batch must be >= 1, got 0"),
        (["--device", "cuda:0"], "CUDA is not available"),
        # Options that do not apply are refused rather than silently ignored.
        (["--strategy", "jacobi", "--modules", "3"],
         "--modules applies to --strategy gs-jacobi only, not 'jacobi'"),
        (["--modules", "3"], "--modules applies to --strategy gs-jacobi only"),
        (["--strategy", "[1-4-8-5]", "--modules", "3"], "a spec sets its own module counts"),
        (["--atol", "1e-3"], "--atol / --rtol do not apply to --strategy sequential"),
        # Non-finite or absurd numbers are refused while parsing.
        (["--guidance", "nan"], "--guidance must be a finite number, got 'nan'"),
        (["--guidance", "inf"], "--guidance must be a finite number, got 'inf'"),
        (["--guidance", "-1"], "--guidance must be in [0, 100], got -1"),
        (["--guidance", "1e9"], "--guidance must be in [0, 100], got 1e+09"),
        (["--strategy", "jacobi", "--atol", "nan"], "--atol must be a finite number"),
        (["--strategy", "jacobi", "--atol", "-0.001"], "--atol must be >= 0, got -0.001"),
        (["--strategy", "jacobi", "--rtol", "2"], "--rtol must be in [0, 0.5], got 2"),
        (["--nrow", "0"], "--nrow must be >= 1, got 0"),
        (["--seed", "-1"], "--seed must be in [0, 9223372036854775807], got -1"),
        (["--threads", "0"], "--threads must be >= 1, got 0"),
    ],
)
def test_sample_user_errors(
    argv: list[str], message: str, checkpoint: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, _, err = run(["sample", "--checkpoint", str(checkpoint), "--out",
                        str(tmp_path / "x.png"), *argv], capsys)
    assert_one_line_error(code, err, message)
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--lr", "nan"], "--lr must be a finite number"),
        (["--lr", "0"], "--lr must be > 0, got 0"),
        (["--noise-std", "inf"], "--noise-std must be a finite number"),
        (["--noise-std", "-0.1"], "--noise-std must be >= 0"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--epochs", "nan"], "--epochs must be a finite number"),
        (["--steps", "0"], "--steps must be >= 1, got 0"),
        (["--width", "-64"], "--width must be >= 1"),
    ],
)
def test_train_refuses_bad_numbers(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(["train", "--out-dir", str(tmp_path / "run"), "--quiet", *argv],
                       capsys)
    assert_one_line_error(code, err, message)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--num-samples", "0"], "--num-samples must be >= 1"),
        (["--shard-size", "-2"], "--shard-size must be >= 1"),
        (["--guidance", "nan"], "--guidance must be a finite number"),
    ],
)
def test_generate_refuses_bad_numbers(
    argv: list[str], message: str, checkpoint: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, _, err = run(["generate", "--checkpoint", str(checkpoint), "--out-dir",
                        str(tmp_path / "gen"), "--quiet", *argv], capsys)
    assert_one_line_error(code, err, message)
    assert not (tmp_path / "gen").exists()


def test_generate_into_another_runs_folder_names_the_setting(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["generate", "--checkpoint", str(checkpoint), "--out-dir", str(tmp_path),
            "--num-samples", "2", "--shard-size", "2", "--quiet"]
    code, _, err = run(args, capsys)
    assert code == 0, err
    code, _, err = run([*args, "--guidance", "2"], capsys)
    assert_one_line_error(code, err, "guidance")
    assert "2.0 now" in err


def test_missing_and_corrupt_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(["sample", "--checkpoint", str(tmp_path / "none.pt")], capsys)
    assert_one_line_error(code, err, f"no checkpoint at {tmp_path / 'none.pt'}")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 999, dtype=np.uint8).tobytes())
    # (The wording of the reason belongs to fixedpoint.tarflow.checkpoint.)
    code, _, err = run(["metrics", "--checkpoint", str(bad)], capsys)
    assert_one_line_error(code, err, f"fixedpoint: error: {bad}: not a ")
    # train refuses to resume from (and overwrite) a corrupt checkpoint.
    code, _, err = run(["train", "--steps", "1", "--checkpoint", str(bad), *TINY], capsys)
    assert_one_line_error(code, err, f"fixedpoint: error: {bad}: not a ")


def test_default_checkpoint_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # no .cache/runs here
    code, _, err = run(["sample", "--dataset", "digits"], capsys)
    assert_one_line_error(code, err, "train one with `fixedpoint train --dataset digits`")


def test_train_user_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = ["--out-dir", str(tmp_path / "run")]
    code, _, err = run(["train", "--preset", "mnist-p4", "--data-dir", str(tmp_path / "no"),
                        *out, *TINY], capsys)
    assert_one_line_error(code, err, "MNIST directory does not exist")
    code, _, err = run(["train", "--dtype", "bfloat16", *out], capsys)
    assert_one_line_error(code, err, "training runs in float32")
    code, _, err = run(["train", "--preset", "digits", "--dataset", "mnist", *out], capsys)
    assert_one_line_error(code, err, "preset digits trains on digits, not mnist")
    code, _, err = run(["train", "--preset", "cifar", *out], capsys)
    assert_one_line_error(code, err, "unknown preset 'cifar'")
    code, _, err = run(["train", "--width", "100", *out], capsys)
    assert_one_line_error(code, err, "not divisible by head_dim")


def test_custom_sizes_get_their_own_run_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    captured = {}

    def fake_train(model_cfg, train_cfg, progress=True):  # type: ignore[no-untyped-def]
        captured["cfg"] = train_cfg
        raise KeyboardInterrupt

    monkeypatch.setattr("fixedpoint.tarflow.train.train", fake_train)
    assert main(["train", "--quiet"]) == 130
    assert captured["cfg"].out_dir == ".cache/runs/digits"
    assert main(["train", "--quiet", "--width", "128"]) == 130
    assert captured["cfg"].out_dir.startswith(".cache/runs/digits-")
    assert main(["train", "--quiet", "--threads", "1"]) == 130
    assert captured["cfg"].out_dir == ".cache/runs/digits"


def test_ctrl_c_says_interrupted_and_whether_rerunning_resumes(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def interrupted(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt

    monkeypatch.setattr("fixedpoint.tarflow.generate.generate", interrupted)
    monkeypatch.setattr("fixedpoint.tarflow.train.train", interrupted)
    monkeypatch.setattr("fixedpoint.tarflow.reverse", interrupted)
    code, _, err = run(["generate", "--checkpoint", str(checkpoint), "--out-dir",
                        str(tmp_path), "--quiet"], capsys)
    assert code == 130
    assert err == ("fixedpoint: interrupted; rerunning the same command resumes where it "
                   "stopped (finished shards are kept)\n")
    code, _, err = run(["train", "--out-dir", str(tmp_path / "t"), "--quiet"], capsys)
    assert code == 130
    assert err == ("fixedpoint: interrupted; rerunning the same command resumes where it "
                   "stopped (from the last checkpoint)\n")
    # sample keeps nothing: no resume promise.
    code, _, err = run(["sample", "--checkpoint", str(checkpoint), "--out",
                        str(tmp_path / "s.png")], capsys)
    assert (code, err) == (130, "fixedpoint: interrupted\n")


def _blow_up(checkpoint: Path, out: Path, block: int) -> Path:
    """A copy of the checkpoint whose block ``block`` has exp(a) = inf at every position."""
    model = load_checkpoint(checkpoint).build_model()
    with torch.no_grad():
        model.blocks[block].proj_out.bias.fill_(1e4)
    save_checkpoint(out, model)
    return out


@pytest.mark.parametrize("strategy", ["sequential", "jacobi"])
def test_failed_solve_exits_1_with_one_line_and_no_png(
    strategy: str, checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = _blow_up(checkpoint, tmp_path / "broken.pt", block=1)
    png = tmp_path / "s.png"
    code, out, err = run(["sample", "--checkpoint", str(broken), "--batch", "2",
                          "--strategy", strategy, "--out", str(png)], capsys)
    assert_one_line_error(code, err, "block 1", status=1)
    assert "sampling failed" in err.lower() or "non-finite" in err.lower()
    assert not png.exists()
    assert "wrote" not in out


def _published(tmp_path: Path, channels: int) -> Path:
    torch.manual_seed(0)
    config = TarFlowConfig(image_size=8, channels=channels, patch_size=2, width=64,
                           blocks=2, layers=1, head_dim=32, num_classes=0)
    path = tmp_path / f"published-{channels}.pth"
    torch.save(TarFlow(config).state_dict(), path)  # the published layout
    return path


@pytest.mark.parametrize("channels", [1, 3])
def test_convert_infers_the_channel_count(
    channels: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "converted.pt"
    code, stdout, err = run(["convert", str(_published(tmp_path, channels)), "--out",
                             str(out), "--head-dim", "32", "--noise-std", "0.1"], capsys)
    assert code == 0, err
    assert f"image 8x8x{channels}" in stdout
    assert load_checkpoint(out).model_config.channels == channels
    # A wrong explicit --channels is still refused with the model's reason.
    code, _, err = run(["convert", str(_published(tmp_path, channels)), "--out", str(out),
                        "--head-dim", "32", "--noise-std", "0.1", "--channels",
                        str(4 - channels)], capsys)
    assert_one_line_error(code, err, "is not channels * patch^2")


def test_convert_refuses_nan_weights_and_strips_a_module_prefix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = torch.load(_published(tmp_path, 1), weights_only=True)
    wrapped = tmp_path / "ddp.pth"
    torch.save({f"module.{k}": v for k, v in state.items()}, wrapped)
    out = tmp_path / "converted.pt"
    code, _, err = run(["convert", str(wrapped), "--out", str(out), "--head-dim", "32",
                        "--noise-std", "0.1"], capsys)
    assert code == 0, err
    state["blocks.1.proj_in.weight"][0, 0] = float("nan")
    poisoned = tmp_path / "nan.pth"
    torch.save(state, poisoned)
    code, _, err = run(["convert", str(poisoned), "--out", str(tmp_path / "n.pt"),
                        "--head-dim", "32", "--noise-std", "0.1"], capsys)
    assert_one_line_error(code, err, "non-finite weights in blocks.1.proj_in.weight")
    assert not (tmp_path / "n.pt").exists()


def test_python_dash_m(tmp_path: Path) -> None:
    # One subprocess (each pays the torch import): the real entry point, exit status 2
    # and a one-line message without a traceback.
    missing = tmp_path / "missing.pt"
    proc = subprocess.run([sys.executable, "-m", "fixedpoint", "sample", "--checkpoint",
                           str(missing)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr == f"fixedpoint: error: no checkpoint at {missing}\n"
    assert proc.stdout == ""


@pytest.mark.slow
def test_building_the_parser_loads_no_application() -> None:
    # A fresh interpreter: in this one the tests have imported everything already.
    code = ("import sys; from fixedpoint.cli import build_parser; build_parser(); "
            "print(' '.join(sorted(sys.modules)))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    loaded = proc.stdout.split()
    assert "fixedpoint.cli.tarflow" in loaded and "fixedpoint.cli.demo" in loaded
    heavy = [m for m in loaded if m.split(".")[0] in ("diffusers", "matplotlib", "scipy")
             or m.startswith(("fixedpoint.tarflow", "fixedpoint.finc", "fixedpoint.diffusion",
                              "fixedpoint.quality", "fixedpoint.data", "fixedpoint.testing"))]
    assert not heavy, heavy


@pytest.mark.slow
def test_closed_pipe_ends_quietly() -> None:
    # `fixedpoint demo | head -1`: the reader leaves after the first line; the next write
    # (unbuffered, so it happens inside main) must end the command without a traceback.
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "fixedpoint", "demo", "--length", "2",
                             "--batch", "1", "--repeats", "1", "--threads", "1"], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline().startswith("device cpu")
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=300) == 141, err  # 128 + SIGPIPE, as a shell pipeline reports
    assert err == ""


# -------------------------------------------------------------------------- studies


def test_reproduce_refuses_unknown_study_and_lists_names(
    capsys: pytest.CaptureFixture[str],
) -> None:
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


# ------------------------------------------------------------------------ packaging


def test_pyproject_names_only_files_that_exist() -> None:
    import re

    text = (REPO / "pyproject.toml").read_text()
    named = set(re.findall(r"[\w./-]+/[\w.-]+\.(?:py|sh|txt|md)\b", text))
    assert named, "expected the comment to point at the files that use the torch APIs"
    missing = sorted(p for p in named if not (REPO / p).exists()
                     and not (REPO / "fixedpoint" / p).exists())
    assert not missing, missing


def test_torch_bound_admits_the_apis_the_code_calls() -> None:
    import re

    bound = re.search(r'^\s*"torch>=(\d+)\.(\d+)",', (REPO / "pyproject.toml").read_text(),
                      re.MULTILINE)
    assert bound is not None
    # torch.get_autocast_dtype / is_autocast_enabled(device_type) arrived in 2.4.
    assert (int(bound[1]), int(bound[2])) >= (2, 4)
    installed = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
    assert installed >= (int(bound[1]), int(bound[2]))
    assert torch.get_autocast_dtype("cpu") in (torch.bfloat16, torch.float16)
    assert torch.is_autocast_enabled("cpu") is False


# -------------------------------------------------------------- default strategies


@pytest.fixture(scope="module")
def nontrivial_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A digits-shaped model with random non-zero out-projections: blocks that need
    several iterations (a freshly trained 3-step model is nearly the identity)."""
    torch.manual_seed(0)
    model = TarFlow(TarFlowConfig(image_size=8, channels=1, patch_size=2, width=64,
                                  blocks=3, layers=1, head_dim=32, num_classes=10)).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.proj_out.weight.normal_(0, 0.05)
            block.proj_out.bias.normal_(0, 0.05)
    path = tmp_path_factory.mktemp("nontrivial") / "model.pt"
    save_checkpoint(path, model)
    return path


def total_steps(out: str) -> int:
    return int(next(line for line in out.splitlines() if line.startswith("total")).split()[2])


@pytest.mark.slow
def test_default_tolerances_beat_sequential(
    nontrivial_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    steps = {}
    for strategy in ("sequential", "jacobi", "anderson"):
        code, out, err = run(["sample", "--checkpoint", str(nontrivial_checkpoint), "--batch",
                              "8", "--strategy", strategy, "--out", str(tmp_path / "s.png")],
                             capsys)
        assert code == 0, err
        steps[strategy] = total_steps(out)
    assert steps["sequential"] == 3 * 15
    assert steps["jacobi"] < steps["sequential"], steps
    assert steps["anderson"] <= steps["sequential"], steps

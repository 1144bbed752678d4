"""``fixedpoint finc``: train, sample, generate; user errors exit 2 with one line."""

from __future__ import annotations

import pytest
import torch

from fixedpoint.cli import main
from fixedpoint.finc import FInCFlow, FInCFlowConfig
from fixedpoint.finc.checkpoint import save_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = FInCFlow(FInCFlowConfig(image_size=8, levels=2, steps=1, hidden=8))
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt", model.eval())


def test_train_prints_the_test_bits_per_dim(tmp_path, capsys):
    code = main(["finc", "train", "--preset", "digits", "--steps", "3", "--quiet",
                 "--threads", "1", "--out-dir", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "bits/dim" in out and (tmp_path / "checkpoint.pt").exists()


@pytest.mark.parametrize("method", ["levels", "sequential", "jacobi", "dense", "sparse"])
def test_sample_writes_a_grid_and_reports_costs(checkpoint, tmp_path, capsys, method):
    out = tmp_path / "grid.png"
    code = main(["finc", "sample", "--checkpoint", str(checkpoint), "--method", method,
                 "--num-samples", "4", "--out", str(out), "--quiet"])
    assert code == 0 and out.exists()
    text = capsys.readouterr().out
    assert method in text
    if method in ("levels", "sequential", "jacobi"):
        assert "dep.steps" in text


def test_generate_writes_shards_and_resumes(checkpoint, tmp_path, capsys):
    args = ["finc", "generate", "--checkpoint", str(checkpoint), "--num-samples", "5",
            "--shard-size", "2", "--out-dir", str(tmp_path), "--quiet"]
    assert main(args) == 0
    first = torch.load(tmp_path / "samples.pt", weights_only=True)
    assert first.shape == (5, 1, 8, 8)
    assert main(args) == 0
    assert torch.equal(torch.load(tmp_path / "samples.pt", weights_only=True), first)
    assert main([*args[:-1], "--seed", "3", "--quiet"]) == 2  # another run, same folder
    assert "another run" in capsys.readouterr().err


def test_user_errors_exit_2_with_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["finc", "sample", "--checkpoint", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fixedpoint: error:") and len(err.splitlines()) == 1
    assert main(["finc", "sample", "--checkpoint", str(bad), "--method", "nope"]) == 2
    assert main(["finc", "train", "--steps", "0"]) == 2


def test_a_solver_that_stops_at_its_cap_exits_1(checkpoint, tmp_path, capsys, monkeypatch):
    import fixedpoint as fp
    from fixedpoint.cli import finc

    monkeypatch.setattr(finc, "_method", lambda name: fp.Jacobi(max_iter=1, atol=0.0,
                                                                rtol=0.0))
    code = main(["finc", "sample", "--checkpoint", str(checkpoint), "--method", "jacobi",
                 "--num-samples", "2", "--out", str(tmp_path / "x.png"), "--quiet"])
    assert code == 1
    assert "failed" in capsys.readouterr().err

"""studies.device_check: its CPU path end to end (tiny settings), and its refusals.

The CUDA path is the same code with a synchronising clock; it is not run here (no GPU).
"""

from __future__ import annotations

import json

import pytest
import torch

import fixedpoint as fp
from studies import device_check as dc


@pytest.mark.slow  # ~12 CPU seconds: the whole check, two tiny models
def test_tiny_cpu_run_checks_everything_and_writes_its_report(tmp_path, capsys):
    code = dc.main(["--device", "cpu", "--tiny", "--threads", "1", "--out", str(tmp_path)])
    assert code == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["ok"] is True and report["device"] == "cpu"
    assert "provenance" in report
    # 1. every method on every system in both dtypes
    parity = report["solver_parity"]
    assert {(r["system"], r["dtype"], r["method"]) for r in parity} == {
        (s, d, m) for s in dc.SYSTEMS for d in ("float64", "float32") for m in dc.METHODS}
    assert all(r["ok"] and r["max_rel_error"] <= r["rtol"] for r in parity)
    assert set(report["models"]) == {"tiny-cond", "tiny-uncond"}
    for name, entry in report["models"].items():
        T = entry["config"]["image_size"] ** 2 // entry["config"]["patch_size"] ** 2
        K = entry["config"]["blocks"]
        # 2. parity of the methods and the fast decoder, and device vs CPU
        assert len(entry["parity"]) == len(dc.TARFLOW_METHODS) + 2
        assert all(r["ok"] for r in entry["parity"])
        # 3. float32 and bfloat16 samples; bfloat16 really rounds
        f32, bf16 = entry["precision"]
        assert f32["dtype"] == "float32" and f32["vs_cpu_float32"]["max_abs"] == 0.0  # CPU
        assert bf16["dtype"] == "bfloat16" and bf16["vs_cpu_float32"]["max_abs"] > 0
        # 4. latency for every batch size and sampler, with honest step counts
        rows = entry["latency"]
        samplers = ["sequential (fast decoder)", "sequential (reverse)", "paper rule",
                    "automatic (latency)"]
        assert [(r["batch"], r["sampler"]) for r in rows] == [
            (b, s) for b in dc.TINY.batch_sizes for s in samplers]
        for r in rows:
            assert r["seconds"] > 0
            if r["sampler"].startswith("sequential"):
                assert r["dependent_steps"] == K * (T - 1)
            else:  # within the budget, in fewer dependent steps than sequential
                assert r["deviation_from_sequential"] <= report["budget"]
                assert r["dependent_steps"] < K * (T - 1)
        assert entry["automatic"]["objective"] == "latency", name
    md = (tmp_path / "report.md").read_text()
    assert "| batch | sampler | ms |" in md and "tiny-uncond" in md
    assert md in capsys.readouterr().out


def test_cuda_without_a_gpu_is_refused_in_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert dc.main(["--device", "cuda", "--tiny", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == "device_check: error: --device cuda: CUDA is not available on this machine\n"
    assert not (tmp_path / "report.json").exists()
    assert dc.main(["--device", "tpu", "--tiny", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_a_failing_method_fails_the_check(monkeypatch):
    monkeypatch.setattr(dc, "METHODS", {"jacobi-capped": fp.Jacobi(max_iter=1)})
    rows = dc.solver_parity(torch.device("cpu"), dc.TINY)
    assert rows and not any(r["ok"] for r in rows)
    assert all("\n" not in r["error"] and "MAX_ITER" in r["error"] for r in rows)
    assert dc.all_ok({"solver_parity": rows, "models": {}}) is False


def test_bad_arguments_exit_2(tmp_path):
    for argv in (["--tiny", "--batch-sizes", "0"], ["--tiny", "--checkpoint", "x.pt"],
                 ["--checkpoint", str(tmp_path / "missing.pt")]):
        with pytest.raises(SystemExit) as info:
            dc.main(["--device", "cpu", "--out", str(tmp_path), *argv])
        assert info.value.code == 2


def test_the_compiled_decoder_row_is_wired_through(monkeypatch):
    """--compile-decoder's row, with torch.compile replaced by the identity (compiling
    takes minutes on this CPU): the device's options reach it and the row is timed,
    counted and compared with sequential like the others."""
    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **options: seen.append(options) or fn)
    name, model = dc.tiny_models()[0]
    compiled = dc.SequentialDecoder(model, compile_options=dc.COMPILE["cpu"])
    settings = dc.Settings(**{**dc.TINY.__dict__, "batch_sizes": (2,)})
    rows = dc.latency(model, torch.device("cpu"), {}, settings, compiled)
    assert seen == [dc.COMPILE["cpu"]]
    assert [r["sampler"] for r in rows] == ["sequential (fast decoder)", dc.COMPILED,
                                            "sequential (reverse)"]
    row = rows[1]
    c = model.config
    assert row["seconds"] > 0 and row["dependent_steps"] == c.blocks * (c.seq_len - 1)
    assert row["deviation_from_sequential"] <= 1e-5

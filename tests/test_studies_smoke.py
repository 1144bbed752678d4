"""Smoke test of the reproduction pipeline: every study script, fast mode, digits only."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_fast_reproduction_runs_every_study(tmp_path):
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "studies.reproduce", "--mode", "fast", "--models", "digits",
           "--out", str(out)]
    env = {**os.environ, "MPLBACKEND": "Agg"}
    subprocess.run(cmd, cwd=ROOT, check=True, timeout=1200, env=env)
    for stem in ("convergence", "crm_igm", "initial_guess", "speedup", "batch_scaling",
                 "scaleout", "precision"):
        payload = json.loads((out / f"{stem}-digits.json").read_text())
        assert payload["provenance"]["git_revision"]
        assert payload["provenance"]["hardware"]["cpu_count"] >= 1
    for stem in ("convergence", "trace", "samples", "initial_guess", "batch_scaling"):
        assert (out / f"{stem}-digits.png").stat().st_size > 1000
    speed = json.loads((out / "speedup-digits.json").read_text())
    rows = {r["strategy"]: r for r in speed["rows"]}
    assert rows["sequential"]["deviation"]["max_abs"] == 0.0
    # Jacobi with tolerance 1e-4 per block must stay within the studies' error budget.
    assert rows["jacobi"]["deviation"]["max_abs"] <= speed["budget"]
    # Honest costs: x_0 = z_0 needs no call, so sequential takes T - 1 steps per block.
    assert rows["sequential"]["dependent_steps"] == speed["blocks"] * (speed["seq_len"] - 1)
    conv = json.loads((out / "convergence-digits.json").read_text())
    # The default tolerance is never slower than sequential (finite termination caps each
    # block at T iterations, and one of them reads no input) and ends within the budget of
    # the sequential solution.  (Per block it is not compared with exact termination: the
    # blocks are chained, so the two runs invert slightly different systems after block
    # K-1, and iteration counts of different systems obey no inequality.)
    assert all(d <= conv["seq_len"] for d in conv["default_iterations"])
    assert conv["default_dependent_steps"] <= rows["sequential"]["dependent_steps"]
    assert conv["default_max_deviation"] <= speed["budget"]
    scale = json.loads((out / "scaleout-digits.json").read_text())
    rows = {r["way"]: r for r in scale["strategies"]["sequential"]}
    # Sharding across single-thread processes must not change a single bit of the samples.
    sharded = rows["2 processes x 1 thread (torchrun, gloo)"]
    assert sharded["identical_to_reference"]
    assert sharded["fcd"] == rows["1 process x 1 thread"]["fcd"]
    # Two intra-op threads may reorder float reductions (torch promises no bit-identity
    # across thread counts): rounding-level differences only.
    assert rows["1 process x 2 threads"]["max_abs_diff"] <= 1e-5
    prec = {r["variant"]: r for r in
            json.loads((out / "precision-digits.json").read_text())["rows"]}
    raised, kept = (prec[f"bfloat16 jacobi, tolerance {w}"] for w in ("raised", "kept"))
    assert kept["tol_used"] == 1e-4
    # Raised to bfloat16's floor at the scale of the iterate (at least the floor at scale 1).
    floor = json.loads((out / "precision-digits.json").read_text())["noise_floor_bfloat16"]
    assert raised["tol_used"] >= floor > 1e-4
    assert raised["precision_warnings"] == kept["precision_warnings"] == 1
    # The point of raising: a tolerance bf16 can meet stops the iteration earlier.
    assert raised["dependent_steps"] < kept["dependent_steps"]
    paper = (out / "paper.md").read_text()
    # The prose states the fast run's own settings, not the full run's.
    assert f"on {speed['eval_batch']} samples" in paper and "on 256 samples" not in paper
    assert "## Model `digits` (T = 16)" in paper and "## Performance targets" in paper
    run = json.loads((out / "run.json").read_text())
    assert run["threads"] == 1 and not run["provenance"]["git_revision"].startswith("unknown")

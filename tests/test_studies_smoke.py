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
    assert rows["sequential"]["deviation"]["max"] == 0.0
    # Jacobi with tolerance 1e-4 per block must stay within the studies' error budget.
    assert rows["jacobi"]["deviation"]["max"] <= speed["budget"]
    scale = json.loads((out / "scaleout-digits.json").read_text())
    rows = scale["strategies"]["sequential"]
    # Sharding across processes must not change a single bit of the samples.
    assert [r["identical_to_reference"] for r in rows] == [True, True, True]
    assert len({r["fcd"] for r in rows}) == 1
    prec = {r["variant"]: r for r in
            json.loads((out / "precision-digits.json").read_text())["rows"]}
    raised, kept = (prec[f"bfloat16 jacobi, tolerance {w}"] for w in ("raised", "kept"))
    assert (raised["tol_used"], kept["tol_used"]) == (2**-5, 1e-4)
    assert raised["precision_warnings"] == kept["precision_warnings"] == 1
    # The point of raising: a tolerance bf16 can meet stops the iteration earlier.
    assert raised["dependent_steps"] < kept["dependent_steps"]
    assert (out / "paper.md").read_text().count("|") > 10

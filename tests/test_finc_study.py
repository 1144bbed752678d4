"""The FInC study's pieces: measured rows, slopes, and the section template filled
entirely from a payload (every placeholder has a value)."""

from __future__ import annotations

import math

import pytest
import torch

from fixedpoint.finc import FInCFlow, FInCFlowConfig

finc_scaling = pytest.importorskip("studies.finc_scaling")


def test_slope_of_a_power_law():
    assert finc_scaling._slope([(n, 3 * n**2) for n in (4, 8, 16)]) == pytest.approx(2.0)
    assert finc_scaling._slope([(8, 1.0)]) is None


@pytest.mark.slow
def test_the_section_renders_from_a_measured_payload(tmp_path, monkeypatch):
    monkeypatch.setattr(finc_scaling, "BATCHES", (1, 2))
    monkeypatch.setattr(finc_scaling, "KERNELS", (2, 3, 5))
    torch.manual_seed(0)
    flow = FInCFlow(FInCFlowConfig(image_size=8, levels=2, steps=1, hidden=4)).eval()
    rows = []
    for k in (2, 3, 5):
        unit = FInCFlow(FInCFlowConfig(image_size=8, steps=1, hidden=4,
                                       kernel_size=k)).finc_units()[-1]
        for n in (4, 6):
            for batch in (1, 2):
                rows += finc_scaling._unit_rows(unit, k, n, batch, repeats=1)
    for r in rows:
        if "seconds" in r:
            assert r["error_vs_float64"] < 1e-4 and r["reconstruction_error"] < 1e-4
    level = [r for r in rows if r["method"] == "level schedule, pixels (core)"]
    assert all(r["dependent_steps"] == 2 * r["n"] - 1 for r in level)
    assert all(r["positions_evaluated"] == r["positions"] for r in level)
    flows = {"digits": {"model": {"test_bpd": 2.0, "train_time_s": 6.0, "parameters": 10},
                        **finc_scaling._flow_rows(flow, torch.rand(4, 1, 8, 8) * 2 - 1, 1)}}
    payload = {"regime": "test", "unit": {
        "rows": rows, "models": {},
        "time_slopes": finc_scaling._slopes(rows, "seconds", 4),
        "step_slopes": finc_scaling._slopes(rows, "dependent_steps", 4)},
        "flows": flows, "published": finc_scaling.PUBLISHED}
    steps = finc_scaling._slopes(rows, "dependent_steps", 4)["k=3, batch=1"]
    assert steps["sequential, pixels (core)"] == pytest.approx(2.0)
    assert steps["level schedule, pixels (core)"] == pytest.approx(
        math.log(11 / 7) / math.log(6 / 4))
    out = tmp_path / "finc.md"
    finc_scaling.render_section(payload, out)
    text = out.read_text()
    assert "{" not in text.replace("{{", "")  # no placeholder left unfilled
    assert "| digits | level schedule, pixels (core) |" in text

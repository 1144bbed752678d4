"""The training-curve study's machinery on a tiny digits model (not its numbers)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from fixedpoint.data import load_dataset
from fixedpoint.quality import FeatureClassifier, QualityMeter
from studies import tarflow_training_curve as curve
from studies.common import FAST
from studies.write_paper import Section, render_section


@pytest.fixture
def tiny(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(curve, "CACHE", tmp_path / "cache")
    data = load_dataset("digits")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        meter = QualityMeter(FeatureClassifier(image_size=8), data)  # untrained: mechanics
    variant = curve.Variant("tiny", "digits", epochs=2, snapshot_every=1,
                            model={"width": 16, "head_dim": 16, "blocks": 2, "layers": 1})
    mode = dataclasses.replace(FAST, out_dir=tmp_path / "out")
    return variant, mode, meter


@pytest.mark.slow  # ~6 s idle, ~20 s on the loaded 2-core machine
def test_snapshots_are_evaluated_and_the_last_point_is_the_finished_model(tiny) -> None:
    variant, mode, meter = tiny
    threads = torch.get_num_threads()
    out = curve.run_variant(variant, mode, n=10, final_n=10, meter=meter)
    assert torch.get_num_threads() == threads
    spe = out["steps_per_epoch"]
    points = out["points"]
    assert [p["step"] for p in points] == [spe, 2 * spe]
    assert [p["epochs"] for p in points] == [1.0, 2.0]
    # The last point is the finished checkpoint (its NLL is the one training reported),
    # not the periodic checkpoint that precedes it.
    assert points[-1]["test_bpd"] == pytest.approx(out["final_test_bpd"])
    assert points[0]["test_bpd"] != pytest.approx(points[1]["test_bpd"])
    assert 0 < points[0]["train_cpu_s"] < points[1]["train_cpu_s"]
    for p in points:
        assert set(p["summary"]) == {f"g={g:g}" for g in curve.GUIDANCES}
        assert len(p["rows"]) == len(curve.GUIDANCES) * len(curve.SEEDS)
        for entry in p["summary"].values():
            assert 0 <= entry["raw"] <= 1 and 0 <= entry["denoised"] <= 1
    final = out["final"]
    assert final["samples"] == 10 and final["best_guidance"] in curve.GUIDANCES
    assert "g=1" in final["summary"]
    assert (mode.out_dir / "tarflow_training_curve-tiny.json").exists()
    # The paper section renders from the study's values alone.
    section = Section.read(Path(curve.__file__).parent / "sections" / "tarflow_training.md")
    assert section.has_header
    text = render_section(section, out["section_values"])
    assert f"{out['section_values']['tc_acc_g1']:.1%}" in text
    assert (mode.out_dir / "tarflow_training_curve-tiny.png").exists()
    # A second invocation reuses the finished run: no new points, no retraining.
    again = curve.run_variant(variant, mode, n=10, final_n=10, meter=meter)
    assert again["points"] == points and again["final"] == final


def test_summary_reports_the_spread_between_seeds() -> None:
    rows = [{"guidance": 1.0, "anneal": False, "seed": s, "accuracy_raw": a,
             "accuracy_denoised": a + 0.1} for s, a in ((0, 0.5), (1, 0.7))]
    got = curve.summarise(rows)["g=1"]
    assert got["raw"] == pytest.approx(0.6) and got["raw_seed_spread"] == pytest.approx(0.2)
    assert got["denoised"] == pytest.approx(0.7)


def test_the_power_law_fit_recovers_an_exact_curve() -> None:
    # 1 - acc = 0.8 * minutes^-0.5: reaches 0.9 accuracy at (0.8 / 0.1)^2 = 64 minutes.
    points = [{"train_cpu_s": 60 * m, "summary": {"g=1": {"denoised": 1 - 0.8 * m ** -0.5}}}
              for m in (2.0, 4.0, 8.0, 16.0)]
    fit = curve.fit_error_power_law(points, "g=1")
    assert fit["points"] == 4
    assert fit["alpha"] == pytest.approx(0.5) and fit["c"] == pytest.approx(0.8)
    assert fit["minutes_to_target"] == pytest.approx(64.0)
    # A curve that does not improve never gets there.
    flat = [{"train_cpu_s": 60 * m, "summary": {"g=1": {"denoised": 0.3}}} for m in (1, 2)]
    assert curve.fit_error_power_law(flat, "g=1")["minutes_to_target"] == float("inf")


def test_the_linear_fit_recovers_a_line() -> None:
    # acc = 0.1 + 0.02 * minutes: 0.9 at 40 minutes; the point at chance is left out.
    points = [{"train_cpu_s": 60 * m, "summary": {"g=1": {"denoised": 0.1 + 0.02 * m}}}
              for m in (0.0, 5.0, 10.0, 20.0)]
    fit = curve.fit_linear(points, "g=1", above=0.15)
    assert fit["points"] == 3 and fit["slope_per_minute"] == pytest.approx(0.02)
    assert fit["minutes_to_target"] == pytest.approx(40.0)

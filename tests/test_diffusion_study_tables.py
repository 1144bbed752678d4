"""The diffusion studies' table logic on hand-made rows (no sampling)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import torch

from studies.diffusion_paradigms import keep_other_samplers, section_values, split_sentence
from studies.fewstep_frontier import best_configuration


def _row(method, dependent, deviation, split="noise"):
    return {
        "method": method,
        "split": split,
        "atol": 1e-3,
        "iterations": dependent,
        "dependent_evals": dependent,
        "evals_per_sample": 10 * dependent,
        "deviation": deviation,
        "seconds_b1": 1.0,
        "seconds_big": 2.0,
        "speedup_dependent": 100 / dependent,
        "speedup_b1": 1.0,
        "speedup_big": 1.0,
        "meets_budget": deviation <= 1e-3,
    }


def _entry(sampler, rows):
    return {"sampler": sampler, "steps": 100, "window": 20, "rows": rows, "fcd": {}}


def _payload(samplers):
    return {
        "model": "toy",
        "budget": 1e-3,
        "conditional": True,
        "test_loss": 0.5,
        "parameters": 3,
        "network_call_seconds": {"1": 0.01, "4": 0.02},
        "samplers": samplers,
        "settings": {"seeds": 2, "big_batch": 4, "guidance": 2.0},
        "regime": "CPU",
        "anchors": {"a": "b"},
    }


def test_section_values_say_not_measured_for_a_sampler_not_run():
    ddim = _entry(
        "ddim",
        [
            _row("sequential", 100, 0.0),
            _row("Picard", 20, 5e-4),
            _row("Picard, clean split", 10, 8e-4, "clean"),
            _row("TAA", 5, 2e-3),  # fastest, but over the budget: never "best"
        ],
    )
    values = section_values(_payload([ddim]))
    assert "DDIM Picard, clean split with 10.0x fewer" in values["par_toy_best"]
    assert "DDPM: not measured" in values["par_toy_best"]
    assert "DDPM-1000: not measured on this model" in values["par_toy_targets"]
    assert "10.0x fewer dependent evaluations within the budget" in values["par_toy_targets"]
    assert "(not met)" in values["par_toy_targets"]
    assert split_sentence(_payload([ddim])) == (
        "DDIM-100 Picard: 20.0 dependent evaluations on the noise split (max deviation "
        "5.0e-04), 10.0 on the clean split (8.0e-04)"
    )


def test_a_sampler_run_alone_keeps_the_other_samplers_of_the_same_model(tmp_path):
    model = SimpleNamespace(
        unet=SimpleNamespace(parameters=lambda: [torch.zeros(3)]), meta={"test_loss": 0.5}
    )
    path = tmp_path / "p.json"
    old_ddim, old_ddpm = _entry("ddim", [_row("x", 10, 0.0)]), _entry("ddpm", [_row("y", 9, 0)])
    path.write_text(json.dumps(_payload([old_ddim, old_ddpm])))
    new_ddim = _entry("ddim", [_row("z", 8, 0.0)])
    merged = keep_other_samplers(path, model, [new_ddim])
    assert [e["sampler"] for e in merged] == ["ddim", "ddpm"]
    assert merged[0] is new_ddim and merged[1] == old_ddpm
    # Another model's file contributes nothing.
    other = SimpleNamespace(unet=model.unet, meta={"test_loss": 0.25})
    assert keep_other_samplers(path, other, [new_ddim]) == [new_ddim]
    assert keep_other_samplers(tmp_path / "missing.json", model, [new_ddim]) == [new_ddim]


def test_the_five_nfe_target_compares_each_family_at_its_best():
    rows = [
        {"family": "DDIM", "fcd": 17.0, "deviation": 0.5},
        {"family": "DPM-Solver++(2M)", "fcd": 10.6, "deviation": 0.17},
        {"family": "DPM-Solver++(3M)", "fcd": 14.0, "deviation": 0.13},
        {"family": "AMED-Plugin (uniform)", "fcd": 9.9, "deviation": 0.25},
        {"family": "AMED-Plugin (uniform), neutral r, c", "fcd": 1.0, "deviation": 0.01},
    ]
    text = best_configuration(rows, noise=2.0)
    # The neutral (untrained) predictor is not AMED; the trained one wins by FCD within
    # the metric's noise and loses by deviation.
    assert text.startswith("by fcd, AMED-Plugin (uniform) 9.9 against DPM-Solver++(2M) 10.6")
    assert "beats both (by 0.7, within the FCD's own noise 2)" in text
    assert "by deviation, AMED-Plugin (uniform) 0.25 against DPM-Solver++(3M) 0.13" in text
    assert text.endswith("does not beat both")
    assert best_configuration(rows[:2], noise=2.0) == "not measured"


def test_the_mnist_note_follows_the_results_on_disk(tmp_path, monkeypatch):
    from studies import fewstep_frontier

    mode = SimpleNamespace(out_dir=tmp_path)
    monkeypatch.setattr(fewstep_frontier, "model_names", lambda mode: ("digits",))
    assert "No trained MNIST model" in fewstep_frontier.mnist_note(mode)
    monkeypatch.setattr(fewstep_frontier, "model_names", lambda mode: ("digits", "mnist"))
    assert "no run has measured it" in fewstep_frontier.mnist_note(mode)
    (tmp_path / "fewstep_frontier-mnist.json").write_text("{}")
    assert "fewstep_frontier-mnist.json" in fewstep_frontier.mnist_note(mode)


def _fcd5_row(family, a, b):
    sets = [{"seed": 1, "fcd": a, "accuracy": 0.9}, {"seed": 2, "fcd": b, "accuracy": 0.8}]
    return {"family": family, "sets": sets, "fcd_mean": (a + b) / 2, "fcd_spread": abs(a - b)}


def test_the_many_sample_fcd_target_needs_amed_ahead_on_both_noise_sets():
    from studies.fewstep_fcd5 import section_values, verdict

    rows = [
        _fcd5_row("DDIM", 20.0, 21.0),
        _fcd5_row("DPM-Solver++(2M)", 12.0, 15.0),
        _fcd5_row("DPM-Solver++(3M)", 13.0, 13.5),
        _fcd5_row("AMED-Plugin on DPM-Solver++(2M) (uniform)", 12.5, 12.0),
        _fcd5_row("AMED-Plugin on DPM-Solver++(2M) (uniform), neutral r, c", 1.0, 1.0),
    ]
    v = verdict(rows)
    # The neutral predictor is not AMED; the best DPM-Solver++ by mean is the 3M one, which
    # the plugin beats on both sets; DDIM too.
    assert v == {
        "amed": "AMED-Plugin on DPM-Solver++(2M) (uniform)",
        "against": {"DPM-Solver++(3M)": True, "DDIM": True},
        "holds": True,
    }
    # Ahead on the mean but behind on one set: the target does not hold.
    rows[2] = _fcd5_row("DPM-Solver++(3M)", 12.0, 13.5)
    v = verdict(rows)
    assert v["against"] == {"DPM-Solver++(3M)": False, "DDIM": True} and not v["holds"]
    text = section_values(
        {"model": "toy", "rows": rows, "verdict": v, "samples": 8, "regime": "CPU"}
    )["fs5_toy_verdict"]
    assert text.endswith("but not than DPM-Solver++(3M) on both: the target does not hold by FCD")

"""Training curve of the MNIST TarFlow models: class accuracy and bits/dim vs training time.

One training run per variant (a preset plus overrides: epochs, learning rate, width,
depth, noise level).  Every ``snapshot_every`` epochs the checkpoint is copied aside and
evaluated at once: test NLL in bits/dim, and the fraction of class-conditional samples
(sequential sampling, balanced labels) that the studies' classifier
(:class:`fixedpoint.quality.QualityMeter`) assigns to their conditioning label, at a few
guidance strengths, with and without the final denoising step, on two noise seeds (the
metric's own noise).  Training minutes are the CPU seconds of the training steps of this
process with one torch thread (on a shared machine the wall-clock would charge the
neighbours' load); the wall-clock is stored beside them.

Snapshots of one long cosine run are not annealed (the learning rate is still high at
the intermediate ones), so the intermediate points understate what a run of that length
would reach; the last point of each run is a fully annealed model.

    python -m studies.tarflow_training_curve --mode fast
    python -m studies.tarflow_training_curve --mode full --variants p4-long
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fixedpoint.data import Dataset, load_dataset
from fixedpoint.quality import QualityMeter
from fixedpoint.tarflow import reverse
from fixedpoint.tarflow.checkpoint import load_checkpoint, load_model
from fixedpoint.tarflow.sampling import denoise_step
from fixedpoint.tarflow.train import PRESETS, evaluate_bpd, train

from .common import CACHE, MODES, Mode, atomic_write_bytes, key, read_json, write_json

GUIDANCES = (0.0, 1.0, 2.0, 4.0)
SEEDS = (0, 1)


@dataclass(frozen=True)
class Variant:
    """One training run: a preset with overrides of its model and training settings."""

    name: str
    preset: str
    epochs: float
    snapshot_every: float
    model: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)

    def configs(self) -> tuple[Any, Any]:
        p = PRESETS[self.preset]
        model = dataclasses.replace(p.model, **self.model)
        cfg = dataclasses.replace(p.train, epochs=self.epochs, **self.train)
        out = CACHE / "curve" / f"{self.name}-{key(model.to_dict(), cfg.identity())}"
        return model, dataclasses.replace(cfg, out_dir=str(out))


VARIANTS = {
    # The preset as it is, 1.5 times longer than the previous full mode (8 epochs).
    "p4-long": Variant("p4-long", "mnist-p4", epochs=12, snapshot_every=2),
    # Smoke run of the machinery on the embedded data set.
    "fast-digits": Variant("fast-digits", "digits", epochs=2, snapshot_every=1),
}
MODE_VARIANTS = {"fast": ("fast-digits",), "full": ("p4-long",)}
# Samples per (guidance, seed) at each snapshot, and for the final model's rows.
SAMPLES = {"fast": 20, "full": 200}
FINAL_SAMPLES = {"fast": 20, "full": 2000}


def _balanced(n: int, seed: int, model) -> tuple[torch.Tensor, torch.Tensor]:
    c = model.config
    g = torch.Generator().manual_seed(1000 + seed)
    return (torch.randn(n, c.seq_len, c.token_dim, generator=g),
            torch.arange(n) % c.num_classes)


def evaluate(path: Path, data: Dataset, meter: QualityMeter, n: int,
             guidances: tuple[float, ...] = GUIDANCES,
             seeds: tuple[int, ...] = SEEDS, anneal: bool = False) -> dict[str, Any]:
    """Accuracy (raw and denoised) per guidance and seed, and test bits/dim."""
    model = load_model(path).eval()
    start = time.perf_counter()
    bpd = evaluate_bpd(model, data.test_x, data.test_y, model.config.noise_std, seed=2)
    rows = []
    for g in guidances:
        for seed in seeds:
            z, y = _balanced(n, seed, model)
            with torch.no_grad():
                s = reverse(model, z, y, guidance=g, anneal_guidance=anneal, throw=False)
            raw = s.images
            den = denoise_step(model, raw, y)
            finite = torch.isfinite(den.flatten(1)).all(1)
            rows.append({
                "guidance": g, "anneal": anneal, "seed": seed, "samples": n,
                "nonfinite": int((~finite).sum()),
                "accuracy_raw": meter.accuracy(raw[finite], y[finite]) if finite.any()
                else math.nan,
                "accuracy_denoised": meter.accuracy(den[finite], y[finite]) if finite.any()
                else math.nan,
            })
    return {"test_bpd": bpd, "rows": rows, "eval_seconds": time.perf_counter() - start}


def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean over seeds and the seed-to-seed difference, per guidance and variant."""
    out: dict[str, dict[str, float]] = {}
    for g in sorted({r["guidance"] for r in rows}):
        for anneal in sorted({r["anneal"] for r in rows}):
            sel = [r for r in rows if r["guidance"] == g and r["anneal"] == anneal]
            if not sel:
                continue
            entry: dict[str, float] = {}
            for kind in ("raw", "denoised"):
                vals = [r[f"accuracy_{kind}"] for r in sel]
                entry[kind] = sum(vals) / len(vals)
                entry[f"{kind}_seed_spread"] = max(vals) - min(vals)
            out[f"g={g:g}{' anneal' if anneal else ''}"] = entry
    return out


class _Snapshots:
    """Training callback: copy the checkpoint aside every ``every`` steps, evaluate it."""

    def __init__(self, variant: Variant, cfg, data: Dataset, meter: QualityMeter, n: int,
                 spe: int, results: Path):
        self.every = max(1, round(variant.snapshot_every * spe))
        self.cfg, self.data, self.meter, self.n, self.spe = cfg, data, meter, n, spe
        self.results = results
        # The last step's checkpoint is written after the callback (with the test NLL):
        # that point is taken from the finished run instead.
        self.total = cfg.total_steps(len(data.train_x))
        self.state = read_json(results) if results.exists() else {"points": [], "cpu_s": 0.0}
        self.last = time.process_time()

    def save(self) -> None:
        atomic_write_bytes(self.results, json.dumps(self.state, indent=1).encode())

    def __call__(self, step: int, loss: float) -> None:
        now = time.process_time()
        self.state["cpu_s"] += now - self.last
        if step % self.every == 0 and step < self.total \
                and not any(p["step"] == step for p in self.state["points"]):
            self.point(step)
        self.last = time.process_time()

    def point(self, step: int, path: Path | None = None) -> None:
        src = path or Path(self.cfg.checkpoint_path)
        snap = src.parent / "snapshots" / f"step-{step:06d}.pt"
        snap.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, snap)
        wall = float(load_checkpoint(snap).extra.get("train_time", math.nan))
        ev = evaluate(snap, self.data, self.meter, self.n)
        self.state["points"].append({
            "step": step, "epochs": step / self.spe, "train_cpu_s": self.state["cpu_s"],
            "train_wall_s": wall, "checkpoint": str(snap), **ev,
            "summary": summarise(ev["rows"]),
        })
        self.save()
        print(f"step {step} ({step / self.spe:.2f} epochs, {self.state['cpu_s'] / 60:.1f} "
              f"CPU min): bpd {ev['test_bpd']:.3f} "
              + " ".join(f"{k}: {v['raw']:.2f}/{v['denoised']:.2f}"
                         for k, v in summarise(ev["rows"]).items()), flush=True)


def final_rows(path: Path, data: Dataset, meter: QualityMeter, n: int,
               points: list[dict[str, Any]]) -> dict[str, Any]:
    """The final model on ``n`` samples per seed: at the studies' guidance (1) and at the
    guidance that scored best on the last snapshot, constant and annealed."""
    last = points[-1]["summary"]
    best = max(GUIDANCES, key=lambda g: last[f"g={g:g}"]["denoised"])
    gs = tuple(sorted({1.0, best}))
    ev = evaluate(path, data, meter, n, guidances=gs)
    if best > 0:
        ev["rows"] += evaluate(path, data, meter, n, guidances=(best,), anneal=True)["rows"]
    return {"samples": n, "best_guidance": best, **ev, "summary": summarise(ev["rows"])}


def run_variant(variant: Variant, mode: Mode, n: int, final_n: int,
                meter: QualityMeter | None = None) -> dict[str, Any]:
    model_cfg, cfg = variant.configs()
    data = load_dataset(cfg.dataset)
    if meter is None:
        meter = QualityMeter.for_dataset(data, cache_dir=CACHE / "classifiers")
    spe = cfg.steps_per_epoch(len(data.train_x))
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    snaps = _Snapshots(variant, cfg, data, meter, n, spe, out_dir / "curve.json")
    # Checkpoints at every snapshot step (so each copy is the model of that step); the
    # thread count is fixed at 1 for a reproducible, load-independent CPU time.
    cfg = dataclasses.replace(cfg, checkpoint_every=snaps.every, threads=1)
    outcome = train(model_cfg, cfg, progress=True, data=data, callback=snaps)
    if not any(p["step"] == outcome.steps for p in snaps.state["points"]):
        snaps.point(outcome.steps, outcome.checkpoint)
    points = snaps.state["points"]
    if "final" not in snaps.state or snaps.state["final"]["samples"] != final_n:
        snaps.state["final"] = final_rows(outcome.checkpoint, data, meter, final_n, points)
        snaps.save()
    result = {
        "variant": dataclasses.asdict(variant), "model_config": model_cfg.to_dict(),
        "train_config": cfg.to_dict(), "samples_per_row": n, "seeds": list(SEEDS),
        "guidances": list(GUIDANCES), "threads": 1, "steps_per_epoch": spe,
        "parameters": outcome.parameters, "final_test_bpd": outcome.test_bpd,
        "classifier_test_accuracy": meter.test_accuracy, "points": points,
        "final": snaps.state["final"],
    }
    write_json(mode.out_dir / f"tarflow_training_curve-{variant.name}.json", result)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=MODES, default="fast")
    parser.add_argument("--variants", nargs="*", choices=sorted(VARIANTS))
    parser.add_argument("--samples", type=int, help="samples per (guidance, seed), snapshots")
    parser.add_argument("--final-samples", type=int,
                        help="samples per (guidance, seed) for the final model's rows")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    mode = MODES[args.mode]
    for name in args.variants or MODE_VARIANTS[mode.name]:
        run_variant(VARIANTS[name], mode, args.samples or SAMPLES[mode.name],
                    args.final_samples or FINAL_SAMPLES[mode.name])


if __name__ == "__main__":
    main()

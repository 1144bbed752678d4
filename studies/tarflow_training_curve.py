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

from .common import (
    CACHE,
    MODES,
    Mode,
    atomic_write_bytes,
    key,
    read_json,
    save_figure,
    write_json,
)
from .lib import GUIDANCE

TARGET = 0.9  # the target: samples assigned to their label 90% of the time

GUIDANCES = (0.0, 1.0, 2.0, 4.0)
# The finished model's guidance sweep: constant, and annealed (linear in the position).
SWEEP = (0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0)
SWEEP_ANNEALED = (4.0, 8.0)
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
    # The preset as the full mode trains it (8 epochs): the same weights as the studies'.
    "p4-8ep": Variant("p4-8ep", "mnist-p4", epochs=8, snapshot_every=2),
    # The preset's own length, 1.5 times longer.
    "p4-long": Variant("p4-long", "mnist-p4", epochs=12, snapshot_every=2),
    # Smoke run of the machinery on the embedded data set.
    "fast-digits": Variant("fast-digits", "digits", epochs=2, snapshot_every=1),
}
MODE_VARIANTS = {"fast": ("fast-digits",), "full": ("p4-8ep",)}
# Samples per (guidance, seed) at each snapshot, and for the final model's rows.
SAMPLES = {"fast": 20, "full": 100}
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
               sweep_n: int) -> dict[str, Any]:
    """The finished model: a guidance sweep (constant and annealed) on ``sweep_n`` samples
    per seed, then ``n`` samples per seed at the studies' guidance and at the best of the
    sweep (by denoised accuracy)."""
    sweep = evaluate(path, data, meter, sweep_n, guidances=SWEEP)
    sweep["rows"] += evaluate(path, data, meter, sweep_n, guidances=SWEEP_ANNEALED,
                              anneal=True)["rows"]
    sweep["summary"] = summarise(sweep["rows"])
    best_key, best_entry = max(sweep["summary"].items(), key=lambda kv: kv[1]["denoised"])
    best = float(best_key.removeprefix("g=").removesuffix(" anneal"))
    anneal = best_key.endswith("anneal")
    ev = evaluate(path, data, meter, n, guidances=(GUIDANCE,))
    if (best, anneal) != (GUIDANCE, False):
        ev["rows"] += evaluate(path, data, meter, n, guidances=(best,), anneal=anneal)["rows"]
    return {"samples": n, "sweep_samples": sweep_n, "best_guidance": best,
            "best_annealed": anneal, "best_key": best_key, "sweep": sweep, **ev,
            "summary": summarise(ev["rows"])}


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
        snaps.state["final"] = final_rows(outcome.checkpoint, data, meter, final_n, n)
        snaps.save()
    result = {
        "variant": dataclasses.asdict(variant), "model_config": model_cfg.to_dict(),
        "train_config": cfg.to_dict(), "samples_per_row": n, "seeds": list(SEEDS),
        "guidances": list(GUIDANCES), "threads": 1, "steps_per_epoch": spe,
        "parameters": outcome.parameters, "final_test_bpd": outcome.test_bpd,
        "classifier_test_accuracy": meter.test_accuracy, "points": points,
        "final": snaps.state["final"],
    }
    # Chance is 1 / classes: points within 5 points of it are the plateau before the
    # label is used, which a power law from the start of training does not describe.
    above = 1 / model_cfg.num_classes + 0.05
    result["fit_above_accuracy"] = above
    result["fits"] = {g: fit_error_power_law(points, g, above=above)
                      for g in (f"g={x:g}" for x in GUIDANCES)}
    result["linear_fits"] = {g: fit_linear(points, g, above=above)
                             for g in (f"g={x:g}" for x in GUIDANCES)}
    result["section_values"] = section_values(result)
    write_json(mode.out_dir / f"tarflow_training_curve-{variant.name}.json", result)
    plot(result, mode.out_dir / f"tarflow_training_curve-{variant.name}.png")
    return result


def fit_error_power_law(points: list[dict[str, Any]], guidance: str,
                        kind: str = "denoised", above: float = 0.0) -> dict[str, float]:
    """Least squares of ``log(1 - accuracy) = log c - alpha log(minutes)`` over the points
    whose accuracy exceeds ``above`` (leave out the plateau at chance, where the label is
    not used yet), and the training minutes at which it reaches :data:`TARGET` (an
    extrapolation)."""
    xs, ys = [], []
    for p in points:
        acc = p["summary"][guidance][kind]
        if p["train_cpu_s"] > 0 and above < acc < 1:
            xs.append(math.log(p["train_cpu_s"] / 60))
            ys.append(math.log(1 - acc))
    if len(xs) < 2 or max(xs) == min(xs):
        return {"points": len(xs), "alpha": math.nan, "c": math.nan,
                "minutes_to_target": math.nan}
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs)
    alpha, log_c = -slope, my - slope * mx
    minutes = math.exp((log_c - math.log(1 - TARGET)) / alpha) if alpha > 0 else math.inf
    return {"points": len(xs), "alpha": alpha, "c": math.exp(log_c),
            "minutes_to_target": minutes}


def fit_linear(points: list[dict[str, Any]], guidance: str, kind: str = "denoised",
               above: float = 0.0) -> dict[str, float]:
    """Least squares of ``accuracy = a + b minutes`` over the points above ``above``, and
    the minutes at which it reaches :data:`TARGET`: the optimistic bracket (a straight
    line never saturates), beside the power law's pessimistic one."""
    pts = [(p["train_cpu_s"] / 60, p["summary"][guidance][kind]) for p in points
           if p["summary"][guidance][kind] > above]
    if len(pts) < 2 or len({x for x, _ in pts}) < 2:
        return {"points": len(pts), "slope_per_minute": math.nan, "minutes_to_target": math.nan}
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    b = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)
    a = my - b * mx
    return {"points": len(pts), "intercept": a, "slope_per_minute": b,
            "minutes_to_target": (TARGET - a) / b if b > 0 else math.inf}


def curve_table(result: dict[str, Any]) -> str:
    from fixedpoint.benchmark import markdown_table

    gs = [f"g={g:g}" for g in result["guidances"]]
    head = ["epochs", "train CPU min", "test bits/dim"]
    head += [f"acc. {g} (raw / denoised)" for g in gs]
    rows = []
    for p in result["points"]:
        cells = [f"{p['epochs']:.1f}", f"{p['train_cpu_s'] / 60:.1f}", f"{p['test_bpd']:.3f}"]
        cells += [f"{p['summary'][g]['raw']:.3f} / {p['summary'][g]['denoised']:.3f}"
                  for g in gs]
        rows.append(cells)
    return markdown_table(head, rows)


def final_table(final: dict[str, Any]) -> str:
    from fixedpoint.benchmark import markdown_table

    rows = [[k, f"{v['raw']:.3f}", f"{v['raw_seed_spread']:.3f}", f"{v['denoised']:.3f}",
             f"{v['denoised_seed_spread']:.3f}"] for k, v in final["summary"].items()]
    return markdown_table(["guidance", "accuracy raw", "seed spread", "accuracy denoised",
                           "seed spread"], rows)


def section_values(result: dict[str, Any]) -> dict[str, Any]:
    """Placeholders of ``studies/sections/tarflow_training.md``."""
    last, final = result["points"][-1], result["final"]
    best = final["best_key"]
    # The fit is over the curve's guidances (constant): the best of those at the last point.
    curve_best = max((f"g={g:g}" for g in result["guidances"]),
                     key=lambda k: last["summary"][k]["denoised"])
    studies = f"g={GUIDANCE:g}"
    fit_best, fit_1 = result["fits"][curve_best], result["fits"][studies]
    return {
        "tc_preset": result["variant"]["preset"],
        "tc_epochs": result["variant"]["epochs"],
        "tc_train_images": result["steps_per_epoch"] * result["train_config"]["batch_size"],
        "tc_minutes": last["train_cpu_s"] / 60,
        "tc_wall_minutes": last["train_wall_s"] / 60,
        "tc_points": len(result["points"]),
        "tc_samples": result["samples_per_row"],
        "tc_final_samples": final["samples"],
        "tc_seeds": len(result["seeds"]),
        "tc_bpd": last["test_bpd"],
        "tc_acc_g1": final["summary"][studies]["denoised"],
        "tc_acc_g1_spread": final["summary"][studies]["denoised_seed_spread"],
        "tc_best_guidance": final["best_guidance"],
        "tc_best_how": "annealed" if final["best_annealed"] else "constant",
        "tc_curve_best": curve_best.removeprefix("g="),
        "tc_sweep_samples": final["sweep_samples"],
        "tc_sweep_table": final_table(final["sweep"]),
        "tc_acc_best": final["summary"][best]["denoised"],
        "tc_acc_best_spread": final["summary"][best]["denoised_seed_spread"],
        "tc_target": TARGET,
        "tc_studies_guidance": GUIDANCE,
        "tc_fit_above": result["fit_above_accuracy"],
        "tc_fit_points_g1": fit_1["points"], "tc_fit_points_best": fit_best["points"],
        "tc_alpha_best": fit_best["alpha"], "tc_minutes_best": fit_best["minutes_to_target"],
        "tc_alpha_g1": fit_1["alpha"], "tc_minutes_g1": fit_1["minutes_to_target"],
        "tc_linear_slope_g1": 100 * result["linear_fits"][studies]["slope_per_minute"],
        "tc_linear_minutes_g1": result["linear_fits"][studies]["minutes_to_target"],
        "tc_linear_minutes_best": result["linear_fits"][curve_best]["minutes_to_target"],
        "tc_minutes_per_epoch": last["train_cpu_s"] / 60 / last["epochs"],
        "tc_max_point_spread": max(v["denoised_seed_spread"] for p in result["points"]
                                   for v in p["summary"].values()),
        "tc_curve_table": curve_table(result),
        "tc_final_table": final_table(final),
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = result["points"]
    minutes = [p["train_cpu_s"] / 60 for p in pts]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.8))
    for g in result["guidances"]:
        k = f"g={g:g}"
        line, = ax.plot(minutes, [p["summary"][k]["denoised"] for p in pts], "o-",
                        label=f"guidance {g:g}, denoised")
        ax.plot(minutes, [p["summary"][k]["raw"] for p in pts], "x--", color=line.get_color(),
                alpha=0.6)
    ax.axhline(TARGET, color="k", lw=0.8, ls=":")
    ax.set(xlabel="training CPU minutes (1 thread)", ylabel="class accuracy of samples",
           ylim=(0, 1))
    ax.legend(fontsize=7)
    bx.plot(minutes, [p["test_bpd"] for p in pts], "o-")
    bx.set(xlabel="training CPU minutes (1 thread)", ylabel="test NLL (bits/dim)")
    fig.suptitle(f"{result['variant']['name']}: {result['variant']['preset']} "
                 "(crosses: without the denoising step)")
    save_figure(fig, path)
    plt.close(fig)


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

"""BOSS grids on a flow-matching and a diffusion model: reference cost, grids, deviation.

For each model (``flow-digits``, the rectified flow; ``digits``, the DDPM noise model via
its probability-flow ODE in the common time of :mod:`fixedpoint.diffusion.boss`; the
MNIST pair in full mode once trained):

* the fine reference (``K_max`` uniform Euler steps, ``samples`` noise samples), solved
  sequentially and by the core's parallel methods on its Picard form: dependent network
  calls, network rows, wall-clock (CPU, one thread, shared machine) and the deviation
  from the sequential reference;
* BOSS grids for ``K = 3 .. 10`` and their DP cost;
* on held-out noise, the deviation from a high-accuracy solution (Euler with
  ``ref_steps`` uniform steps; its own error is estimated from half as many) of Euler on
  the BOSS grid, on the uniform grid and (noise model) on DDIM's grid, all ``K`` steps,
  ``K`` dependent evaluations;
* with ``--straighten``: the network fine-tuned on the BOSS grid at ``straighten_k``
  steps, its deviation and FCD against the un-tuned grid's.

Writes ``boss_grids.json``.  Models are trained on first use (resumable).

    python -m studies.boss_grids --mode fast|full [--straighten]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import torch

import fixedpoint as fp
import fixedpoint.diffusion as fd
from fixedpoint.diffusion.train import PRESETS, train

from .common import CACHE, MODES, ROOT, atomic_write_bytes, read_json, write_json
from .diffusion_common import out_path

SETTINGS = {
    "fast": dict(
        train_steps=300, k_max=40, samples=16, eval_samples=16, ref_steps=200,
        ks=(3, 4, 5, 6), straighten_k=4, straighten_steps=40, straighten_samples=32,
        fcd_samples=64, parallel_samples={"digits": 16, "mnist": 4},
    ),
    "full": dict(
        train_steps=None, k_max=100, samples=100, eval_samples=100, ref_steps=1000,
        ks=tuple(range(3, 11)), straighten_k=5, straighten_steps=300, straighten_samples=256,
        fcd_samples=1000,
        # The parallel solves of the reference are timed on the first samples only: a
        # 28x28 row costs ~8x an 8x8 one, and Jacobi on all 100 MNIST samples would take
        # most of an hour per method on one core.
        parallel_samples={"digits": 100, "mnist": 10},
    ),
}


def trained(preset: str, mode: str, train_steps: int | None) -> fd.ProbabilityFlow:
    cfg = PRESETS[preset]
    if train_steps is not None:
        cfg = dataclasses.replace(
            cfg, steps=train_steps, warmup=20, out_dir=f".cache/diffusion/fast-{preset}"
        )
    out = train(cfg)
    return fd.load_flow(out.model_dir)


def draw(flow: fd.ProbabilityFlow, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn((n, *flow.denoiser.sample_shape), generator=gen)
    labels = None if flow.model.num_classes is None else torch.arange(n) % flow.model.num_classes
    return z, labels


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    """Root mean square pixel deviation."""
    diff = a.double().reshape(len(a), -1) - b.double().reshape(len(b), -1)
    return float(diff.pow(2).mean()) ** 0.5


def reference_rows(
    flow, z, labels, k_max, reuse: list | None, parallel_samples: int
) -> tuple[fd.Reference, list[dict]]:
    """The sequential reference and the cost of solving it in parallel on its first
    ``parallel_samples`` samples (``reuse``: the parallel rows measured by an earlier run of
    the same model and settings)."""
    start = time.perf_counter()
    seq = fd.reference_trajectories(flow, z, steps=k_max, labels=labels)
    rows = [{"method": "sequential", "calls": seq.calls, "rows": seq.rows,
             "iterations": seq.iterations, "seconds": time.perf_counter() - start,
             "samples": len(z), "max_abs_vs_sequential": 0.0}]
    if reuse is not None:
        return seq, rows + [{**r, "from_earlier_run": True} for r in reuse[1:]]
    methods = {
        "jacobi atol 1e-4": fp.Jacobi(atol=1e-4, rtol=0.0),
        "triangular-anderson atol 1e-4": fp.TriangularAnderson(atol=1e-4, rtol=0.0),
        "window 20 atol 1e-4": fp.SlidingWindow(20, atol=1e-4, rtol=0.0),
    }
    n = min(parallel_samples, len(z))
    sub_labels = None if labels is None else labels[:n]
    for name, method in methods.items():
        print(f"  reference by {name} ({n} samples) ...", flush=True)
        start = time.perf_counter()
        par = fd.reference_trajectories(flow, z[:n], steps=k_max, method=method,
                                        labels=sub_labels)
        rows.append({"method": name, "calls": par.calls, "rows": par.rows,
                     "iterations": par.iterations, "seconds": time.perf_counter() - start,
                     "status": par.status.name, "samples": n,
                     "max_abs_vs_sequential": float((par.states - seq.states[:n]).abs().max())})
    return seq, rows


def run_model(preset: str, mode: str, s: dict, straighten: bool, earlier: dict | None) -> dict:
    flow = trained(preset, mode, s["train_steps"])
    torch.manual_seed(0)
    z, labels = draw(flow, s["samples"], seed=0)
    parallel = s["parallel_samples"][flow.model.meta.get("dataset", "digits")]
    reuse = None
    if earlier is not None and all(
        earlier.get(k) == v
        for k, v in (("test_loss", flow.model.meta.get("test_loss")), ("k_max", s["k_max"]),
                     ("samples", s["samples"]))
    ) and all(r.get("samples", s["samples"]) == parallel for r in earlier["reference"][1:]):
        reuse = earlier["reference"]
    ref, ref_rows = reference_rows(flow, z, labels, s["k_max"], reuse, parallel)
    grids = fd.boss_grids(flow, s["ks"], reference=ref)

    # held-out noise and the high-accuracy solution
    print("  high-accuracy solution and grids ...", flush=True)
    ze, le = draw(flow, s["eval_samples"], seed=1)
    fine = fd.flow_sample(flow, flow.uniform_times(s["ref_steps"]), ze, labels=le)
    half = fd.flow_sample(flow, flow.uniform_times(s["ref_steps"] // 2), ze, labels=le)
    rows = []
    for k, grid in grids.items():
        row = {"K": k, "boss_times": grid.times.tolist(), "dp_cost": grid.cost,
               "boss": rms(fd.flow_sample(flow, grid.times, ze, labels=le), fine),
               "uniform": rms(fd.flow_sample(flow, flow.uniform_times(k), ze, labels=le), fine)}
        if isinstance(flow, fd.NoiseFlow):
            row["ddim"] = rms(fd.flow_sample(flow, flow.ddim_times(k), ze, labels=le), fine)
        rows.append(row)
    out = {
        "model": preset,
        "prediction": flow.prediction,
        "test_loss": flow.model.meta.get("test_loss"),
        "t_start": flow.t_start,
        "k_max": s["k_max"],
        "samples": s["samples"],
        "reference": ref_rows,
        "high_accuracy": {"steps": s["ref_steps"], "rms_vs_half_steps": rms(fine, half)},
        "rows": rows,
    }
    if straighten:
        print("  straightening ...", flush=True)
        out["straighten"] = straighten_rows(flow, grids, s, ze, le, fine)
    return out


def straighten_rows(flow, grids, s, ze, le, fine) -> dict:
    from fixedpoint.data import load_dataset
    from fixedpoint.quality import QualityMeter

    k = s["straighten_k"]
    grid = grids[k] if k in grids else fd.boss_grid(flow, k, k_max=s["k_max"])
    start = time.perf_counter()
    # seed 100: its training noise (seed 101) is disjoint from the held-out noise (seed 1)
    # and the FCD noise (seeds 2, 3).
    tuned = fd.straighten(
        flow, grid, samples=s["straighten_samples"], steps=s["straighten_steps"], seed=100,
        labels=torch.arange(s["straighten_samples"]) % flow.model.num_classes
        if flow.model.num_classes is not None else None,
    )
    seconds = time.perf_counter() - start
    data = load_dataset(flow.model.meta.get("dataset", "digits"))
    meter = QualityMeter.for_dataset(data, cache_dir=CACHE / "classifiers")
    zq, lq = draw(flow, s["fcd_samples"], seed=2)
    zq2, lq2 = draw(flow, s["fcd_samples"], seed=3)

    def quality(f, times, zz, ll):
        images = fd.flow_sample(f, times, zz, labels=ll)
        acc = meter.accuracy(images, ll) if ll is not None else None
        return {"fcd": meter.frechet(images), "accuracy": acc}

    return {
        "K": k,
        "steps": s["straighten_steps"],
        "samples": s["straighten_samples"],
        "seconds": seconds,
        "rms_before": rms(fd.flow_sample(flow, grid.times, ze, labels=le), fine),
        "rms_after": rms(fd.flow_sample(tuned, grid.times, ze, labels=le), fine),
        "fcd_samples": s["fcd_samples"],
        "fcd_reference_100": quality(flow, flow.uniform_times(100), zq, lq),
        "fcd_reference_100_other_seed": quality(flow, flow.uniform_times(100), zq2, lq2),
        "fcd_boss": quality(flow, grid.times, zq, lq),
        "fcd_boss_straightened": quality(tuned, grid.times, zq, lq),
        "fcd_uniform": quality(flow, flow.uniform_times(k), zq, lq),
    }


def section_values(results: dict, settings: dict) -> dict:
    """Placeholders ``boss_*`` of the paper section, from every model in the file."""
    from .diffusion_common import md_table

    ref_rows, grid_rows, st_rows = [], [], []
    for name, m in results.items():
        for r in m["reference"]:
            n = r.get("samples", m["samples"])  # earlier files: every row on all samples
            ref_rows.append([name, r["method"], n, r["calls"], round(r["rows"] / n),
                             f"{r['max_abs_vs_sequential']:.1e}", r["seconds"]])
        for r in m["rows"]:
            grid_rows.append([name, r["K"], r["dp_cost"], r["boss"], r["uniform"],
                              r.get("ddim", "-")])
        q = m.get("straighten")
        if q:
            st_rows.append([name, q["K"], q["rms_before"], q["rms_after"],
                            q["fcd_uniform"]["fcd"], q["fcd_boss"]["fcd"],
                            q["fcd_boss_straightened"]["fcd"], q["fcd_reference_100"]["fcd"],
                            q["fcd_reference_100_other_seed"]["fcd"]])
    return {
        "boss_models": ", ".join(results),
        "boss_k_max": settings["k_max"],
        "boss_samples": settings["samples"],
        "boss_eval_samples": settings["eval_samples"],
        "boss_ref_steps": settings["ref_steps"],
        "boss_fcd_samples": settings["fcd_samples"],
        "boss_reference_table": md_table(
            ["model", "reference solved by", "samples", "dependent calls", "network rows / sample",
             "max deviation from sequential", "s (CPU, 1 thread)"], ref_rows),
        "boss_grid_table": md_table(
            ["model", "K", "DP cost", "RMS BOSS-K", "RMS uniform-K", "RMS DDIM-K"], grid_rows),
        "boss_straighten_table": md_table(
            ["model", "K", "RMS before", "RMS after straightening", "FCD uniform-K",
             "FCD BOSS-K", "FCD BOSS-K straightened", "FCD 100-step", "FCD 100-step, other seed"],
            st_rows),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=MODES, default="fast")
    parser.add_argument("--models", nargs="+", default=None,
                        help="presets (default: flow-digits digits, + the MNIST pair if trained)")
    parser.add_argument("--straighten", action="store_true")
    parser.add_argument("--render-only", action="store_true",
                        help="only recompute the paper section's values from the results")
    parser.add_argument("--reuse-parallel", action="store_true",
                        help="take the parallel reference rows from the JSON of an earlier run "
                        "of the same model and settings (marked from_earlier_run)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    shared = ROOT.parent / "shared" / "data" / "mnist"
    if shared.is_dir():
        os.environ.setdefault("FIXEDPOINT_MNIST_DIR", str(shared))
    s = SETTINGS[args.mode]
    models = args.models
    if models is None:
        models = ["flow-digits", "digits"]
        if args.mode == "full":
            models += [m for m in ("flow-mnist", "mnist")
                       if (Path(PRESETS[m].out_dir) / "model").is_dir()]
    path = out_path(MODES[args.mode], "boss_grids.json")
    # Models run separately (one heavy job at a time) accumulate in one file.
    results = read_json(path).get("models", {}) if path.is_file() else {}
    if args.render_only:
        payload = read_json(path)
        payload["section_values"] = section_values(payload["models"], payload["settings"])
        # The provenance stays that of the run that measured the numbers.
        atomic_write_bytes(path, (json.dumps(payload, indent=2) + "\n").encode())
        return payload["models"]
    for preset in models:
        print(f"[boss] {preset} ...", flush=True)
        earlier = results.get(preset) if args.reuse_parallel else None
        results[preset] = run_model(preset, args.mode, s, args.straighten, earlier)
        write_json(path, {"settings": s, "models": results,
                          "section_values": section_values(results, s)}, seed=0)
    return results


if __name__ == "__main__":
    main()

"""FInC Flow: inverting k x k convolutions by the core, the wavefront, and the libraries.

Two measurements, one command:

1. **One FInC unit, image size n and kernel size k.**  The unit of a flow trained here on
   digits (one flow per k in {2, 3, 5}; its last unit, 8 channels in four orientation
   groups of 2; a kernel is independent of the image size, so it applies at any n), on
   Gaussian inputs of size n x n for n = 8 .. 64, batch 1 and 100.  Solved by: the core's
   Sequential (pixel by pixel, and (pixel, channel) by (pixel, channel)), Jacobi and the
   level schedule (anti-diagonal wavefront) in both layouts; a plain Python loop over
   pixels; ``torch.linalg.solve_triangular`` on the dense ``(n^2 C)^2`` matrix (while it
   fits in 1 GiB); ``scipy.sparse.linalg.spsolve_triangular`` on the CSR matrix.  For
   each: wall-clock (median of repeats, float32, CPU), dependent steps, positions
   evaluated, the error against the float64 sparse solve and the reconstruction error
   ``|inverse(forward(x)) - x|``.  Log-log slopes of time and steps against n.
2. **Whole flows trained here** (digits, and MNIST when its files are present): time per
   100 samples and at batch 1 for every method, total dependent steps over the flow's
   FInC units, deviation from the sequential samples, reconstruction error on test
   images, test bits/dim; beside the published table (GPU): MNIST FInC 0.09 s per 100
   samples vs Emerging 0.62 and MintNet 17.29; test 1.05 bits/dim.

Outputs: ``finc_scaling.json`` and ``finc_scaling.png`` in the mode's output directory,
and the section ``studies/sections/finc.md`` rendered with the measured numbers into
``<output>/../finc.md`` (``paper/finc.md`` in full mode).

    python -m studies.finc_scaling --mode fast      # a minute or two
    python -m studies.finc_scaling --mode full      # writes paper/results/finc_scaling.*
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import fixedpoint as fp
from fixedpoint.atomic import atomic_write_bytes
from fixedpoint.data import DatasetError, load_dataset
from fixedpoint.finc import FInCFlow, Layout
from fixedpoint.finc.baselines import dense_bytes, solve_dense, solve_loop, solve_sparse
from fixedpoint.finc.checkpoint import load_checkpoint, load_model
from fixedpoint.finc.sampling import baseline_inverter, core_inverter, reconstruction_error
from fixedpoint.finc.train import PRESETS, evaluate_bpd, train
from fixedpoint.methods.levels import LevelSchedule

from .common import (
    CACHE,
    MODES,
    ROOT,
    Mode,
    cached,
    read_json,
    save_figure,
    timed,
    write_json,
)

SEED = 0
KERNELS = (2, 3, 5)
BATCHES = (1, 100)
SIZES = {"fast": (8, 16), "full": (8, 16, 32, 64)}
DIGITS_EPOCHS = {"fast": 2, "full": 60}
MNIST_EPOCHS = {"fast": 0.05, "full": None}  # None: the preset (25 epochs)
DENSE_LIMIT = 2**30
# Sampling temperature of the flows (Glow's usual 0.7).  At 1.0 the briefly trained MNIST
# flow overflows float32 inside an affine coupling's inverse for some latents (a division
# by a scale near 0), and the FInC solve then rightly refuses its non-finite input.
TEMPERATURE = 0.7
SECTION = ROOT / "studies" / "sections" / "finc.md"

PUBLISHED = {
    "mnist_bpd": {"FInC Flow": 1.05},
    "mnist_seconds_per_100": {"FInC Flow": 0.09, "Emerging": 0.62, "MintNet": 17.29},
    "cifar10": {"FInC Flow": [3.39, 0.41], "Emerging": [3.34, 17.19], "CInC": [3.35, 7.91],
                "MaCow": [3.16, 3.23]},
    "claim": "parallel inversion in O(n k^2) time (n: image height and width)",
    "regime": "GPU, seconds per 100 samples",
}


# ----------------------------------------------------------------------------- models


def _from_checkpoint(path: str, test_x: torch.Tensor) -> tuple[FInCFlow, dict[str, Any]]:
    """A model trained elsewhere (e.g. a run stopped at its time budget), evaluated here."""
    ckpt = load_checkpoint(path)
    model = ckpt.build_model()
    total = ckpt.extra.get("train_config", {})
    bpd = ckpt.extra.get("test_bpd")
    if bpd is None:
        bpd = evaluate_bpd(model, test_x, seed=int(total.get("seed", 0)) + 2)
    return model, {"preset": "checkpoint", "config": ckpt.config.to_dict(), "steps": ckpt.step,
                   "complete": bool(ckpt.extra.get("complete", False)),
                   "train_config": total, "test_bpd": float(bpd),
                   "train_time_s": float(ckpt.extra.get("train_time", float("nan"))),
                   "parameters": int(ckpt.extra.get("parameters", 0)), "checkpoint": path}


def _trained(name: str, mode: Mode, **model_changes: Any) -> tuple[FInCFlow, dict[str, Any]]:
    preset = PRESETS[name]
    model_cfg = dataclasses.replace(preset.model, **model_changes)
    epochs = (DIGITS_EPOCHS if name == "digits" else MNIST_EPOCHS)[mode.name]
    cfg = preset.train if epochs is None else dataclasses.replace(preset.train, epochs=epochs)
    tag = f"finc-{name}-k{model_cfg.kernel_size}-{mode.name}"
    out_dir = preset.train.out_dir if (epochs is None and not model_changes) else \
        str(CACHE / tag)
    cfg = dataclasses.replace(cfg, out_dir=out_dir, threads=1)
    outcome = train(model_cfg, cfg, progress=True)
    info = {"preset": name, "config": model_cfg.to_dict(), "steps": outcome.steps,
            "test_bpd": outcome.test_bpd, "train_time_s": outcome.train_time,
            "parameters": outcome.parameters, "checkpoint": str(outcome.checkpoint)}
    return load_model(outcome.checkpoint), info


# ----------------------------------------------------------------------------- timing


def _time(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Median wall-clock of ``repeats`` runs (one run if it takes over 2 s)."""
    times, out = [], None
    for i in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
        if i == 0 and times[0] > 2.0:
            break
    return statistics.median(times), out


def _core(layout: Layout, method: Any) -> dict[str, Any]:
    return {"layout": layout, "method": method}


METHODS: dict[str, Any] = {
    "sequential, pixels (core)": _core(Layout.PIXEL, fp.Sequential()),
    "sequential, (pixel, channel) (core)": _core(Layout.CHANNEL, fp.Sequential()),
    "jacobi (core)": _core(Layout.PIXEL, fp.Jacobi()),
    "level schedule, pixels (core)": _core(Layout.PIXEL, LevelSchedule()),
    "level schedule, (pixel, channel) (core)": _core(Layout.CHANNEL, LevelSchedule()),
    "plain loop over pixels": solve_loop,
    "torch.linalg.solve_triangular (dense)": solve_dense,
    "scipy spsolve_triangular (sparse)": solve_sparse,
}


# ------------------------------------------------------------------- 1. one FInC unit


def _unit_rows(unit: torch.nn.Module, k: int, n: int, batch: int, repeats: int
               ) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(SEED + n + 1000 * batch)
    channels = sum(c.channels for c in unit.convs)
    x = torch.randn(batch, channels, n, n, generator=g)
    with torch.no_grad():
        y = unit(x)[0]
    pixel_sys = unit.system(y, Layout.PIXEL)
    reference = solve_sparse(unit.system(y.double(), Layout.PIXEL))  # float64 truth
    rows = []
    for name, how in METHODS.items():
        row: dict[str, Any] = {"k": k, "n": n, "batch": batch, "method": name}
        if isinstance(how, dict):
            system = unit.system(y, how["layout"])
            x0 = system.from_image(system.y)
            seconds, result = _time(lambda s=system, m=how["method"], x0=x0:
                                    fp.solve(s, x0, m, throw=True), repeats)
            image = system.to_image(result.x)
            row.update(seconds=seconds, dependent_steps=result.dependent_steps,
                       positions_evaluated=result.token_evals // batch,
                       positions=system.length, layout=how["layout"].name)
        else:
            extra: dict[str, Any] = {}
            if how is solve_dense:
                if dense_bytes(pixel_sys) > DENSE_LIMIT:
                    row.update(skipped=f"dense matrix needs {dense_bytes(pixel_sys) / 2**30:.1f}"
                                       " GiB > 1 GiB")
                    rows.append(row)
                    continue
                start = time.perf_counter()
                matrix = pixel_sys.dense_matrix()
                extra = {"matrix": matrix}
                row["build_seconds"] = time.perf_counter() - start
            elif how is solve_sparse:
                start = time.perf_counter()
                extra = {"matrix": pixel_sys.sparse_matrix()}
                row["build_seconds"] = time.perf_counter() - start
            seconds, image = _time(lambda h=how, e=extra: h(pixel_sys, **e), repeats)
            steps = {solve_loop: n * n, solve_dense: n * n * channels,
                     solve_sparse: n * n * channels}[how]
            row.update(seconds=seconds, dependent_steps=steps, note="sequential inside")
        canon_x = _canonical(unit, x)
        row["error_vs_float64"] = float((image.double() - reference).abs().max())
        row["reconstruction_error"] = float((image - canon_x).abs().max())
        rows.append(row)
        print(f"  k={k} n={n:3d} B={batch:3d} {name:42s} {row['seconds'] * 1e3:9.1f} ms "
              f"steps {row['dependent_steps']}", flush=True)
    return rows


def _canonical(unit: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    parts = x.chunk(4, dim=1)
    return torch.cat([c.orientation.flip(p) for c, p in zip(unit.convs, parts)], dim=1)


def _slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of log(y) against log(x)."""
    pts = [(math.log(a), math.log(b)) for a, b in points if a > 0 and b > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    den = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / den if den else None


def _slopes(rows: list[dict[str, Any]], field: str, min_n: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k in KERNELS:
        for batch in BATCHES:
            for name in METHODS:
                pts = [(r["n"], r[field]) for r in rows if r["k"] == k and r["batch"] == batch
                       and r["method"] == name and field in r and r["n"] >= min_n]
                out.setdefault(f"k={k}, batch={batch}", {})[name] = _slope(pts)
    return out


# ----------------------------------------------------------------- 2. whole flows


def _flow_rows(model: FInCFlow, test_x: torch.Tensor, repeats: int) -> dict[str, Any]:
    out: dict[str, Any] = {"methods": []}
    g = torch.Generator().manual_seed(SEED)
    u_test = model.dequantize(test_x[:100], g)
    latents100 = model.sample_latents(max(BATCHES), torch.Generator().manual_seed(SEED + 1),
                                      temperature=TEMPERATURE)
    reference = None
    methods: dict[str, Any] = {
        **METHODS,
        "gs-jacobi, 4 modules (core)": _core(Layout.PIXEL, fp.GSJacobi(modules=4)),
        "anderson (core)": _core(Layout.PIXEL, fp.Anderson()),
        "triangular anderson (core)": _core(Layout.PIXEL, fp.TriangularAnderson()),
    }
    for name, how in methods.items():
        row: dict[str, Any] = {"method": name}
        for batch in BATCHES:
            latents = [z[:batch] for z in latents100]
            results: list[fp.Result] = []
            if isinstance(how, dict):
                layout = how["layout"]

                def inverter(results=results, m=how["method"]):
                    return core_inverter(m, results, throw=False)
            else:
                layout = Layout.PIXEL

                def inverter(h=how):
                    return baseline_inverter(h)

            def run(latents=latents, layout=layout, inverter=inverter, results=results):
                results.clear()
                with torch.no_grad():
                    return model.reverse(latents, inverter(), layout)

            seconds, u = _time(run, repeats)
            row[f"seconds_batch{batch}"] = seconds
            if batch == max(BATCHES):
                if reference is None:
                    reference = u
                row["deviation_from_sequential"] = float((u - reference).abs().max())
                row["dependent_steps"] = (sum(r.dependent_steps for r in results)
                                          if results else None)
                row["all_converged"] = (all(r.status is fp.Status.SUCCESS for r in results)
                                        if results else None)
                row["reconstruction_error"] = reconstruction_error(
                    model, u_test, inverter(), layout)
        out["methods"].append(row)
        print(f"  {name:42s} {row[f'seconds_batch{max(BATCHES)}']:8.3f} s / "
              f"{max(BATCHES)} samples, "
              f"{row['seconds_batch1'] * 1e3:8.1f} ms at batch 1", flush=True)
    out["finc_units"] = len(model.finc_units())
    return out


# -------------------------------------------------------------------------- figure


def _figure(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    for ax, batch in zip(axes[:2], BATCHES):
        for name in METHODS:
            pts = sorted((r["n"], r["seconds"]) for r in rows
                         if r["k"] == 3 and r["batch"] == batch and r["method"] == name
                         and "seconds" in r)
            if pts:
                ax.loglog(*zip(*pts), marker="o", label=name)
        ax.set_title(f"one FInC unit, k=3, batch {batch}: wall-clock")
        ax.set_xlabel("image size n")
        ax.set_ylabel("seconds (CPU, 1 thread)")
        ax.grid(True, which="both", alpha=0.3)
    ax = axes[2]
    for i, name in enumerate(("sequential, pixels (core)", "sequential, (pixel, channel) (core)",
                              "jacobi (core)", "level schedule, pixels (core)",
                              "level schedule, (pixel, channel) (core)")):
        for k, style in zip(KERNELS, ("-", "--", ":")):
            pts = sorted((r["n"], r["dependent_steps"]) for r in rows
                         if r["k"] == k and r["batch"] == 1 and r["method"] == name)
            if pts:
                ax.loglog(*zip(*pts), style, marker=".", color=f"C{i}",
                          label=f"{name}" if k == 3 else None)
    ax.set_title("dependent steps (k = 2 / 3 / 5: solid / dashed / dotted)")
    ax.set_xlabel("image size n")
    ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


# --------------------------------------------------------------------------- section


def _find(rows: list[dict[str, Any]], **where: Any) -> dict[str, Any]:
    for r in rows:
        if all(r.get(k) == v for k, v in where.items()):
            return r
    return {}


def section_values(payload: dict[str, Any]) -> dict[str, str]:
    """The flat ``{placeholder: text}`` dict the section template is filled with."""
    rows = payload["unit"]["rows"]
    n_max = max(r["n"] for r in rows)
    v: dict[str, str] = {"n_max": str(n_max), "n_list": ", ".join(
        str(n) for n in sorted({r["n"] for r in rows}))}

    def ms(row: dict[str, Any]) -> str:
        return "n/a" if "seconds" not in row else f"{row['seconds'] * 1e3:.1f}"

    short = {
        "seq_pix": "sequential, pixels (core)", "seq_ch": "sequential, (pixel, channel) (core)",
        "jac": "jacobi (core)", "lvl_pix": "level schedule, pixels (core)",
        "lvl_ch": "level schedule, (pixel, channel) (core)", "loop": "plain loop over pixels",
        "dense": "torch.linalg.solve_triangular (dense)",
        "sparse": "scipy spsolve_triangular (sparse)",
    }
    v["batch_small"], v["batch_big"] = str(min(BATCHES)), str(max(BATCHES))
    for batch, size in ((min(BATCHES), "small"), (max(BATCHES), "big")):
        for key, name in short.items():
            r = _find(rows, k=3, n=n_max, batch=batch, method=name)
            v[f"{key}_ms_{size}"] = ms(r)
            v[f"{key}_steps"] = str(_find(rows, k=3, n=n_max, batch=1, method=name).get(
                "dependent_steps", "n/a"))
            s = payload["unit"]["time_slopes"][f"k=3, batch={batch}"].get(name)
            v[f"{key}_slope_{size}"] = "n/a" if s is None else f"{s:.2f}"
        for key, name in short.items():
            s = payload["unit"]["step_slopes"]["k=3, batch=1"].get(name)
            v[f"{key}_step_slope"] = "n/a" if s is None else f"{s:.2f}"
    dense_max = max((r["n"] for r in rows if r["method"] == short["dense"] and "seconds" in r),
                    default=0)
    v["dense_n_max"] = str(dense_max)
    v["worst_error"] = f"{max(r['error_vs_float64'] for r in rows if 'seconds' in r):.1e}"
    v["worst_recon"] = f"{max(r['reconstruction_error'] for r in rows if 'seconds' in r):.1e}"
    for k in KERNELS:
        r = _find(rows, k=k, n=n_max, batch=max(BATCHES), method=short["lvl_pix"])
        v[f"lvl_ms_k{k}"] = ms(r)
        r = _find(rows, k=k, n=n_max, batch=max(BATCHES), method=short["seq_pix"])
        v[f"seq_ms_k{k}"] = ms(r)
    big = max(BATCHES)
    table = [f"| model | method | s / {big} samples | ms at batch 1 | dependent steps | "
             "every solve converged | max deviation from sequential | reconstruction error |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, flow in payload["flows"].items():
        for r in flow["methods"]:
            steps = "n/a" if r.get("dependent_steps") is None else str(r["dependent_steps"])
            status = {True: "yes", False: "no (cap)", None: "n/a"}[r.get("all_converged")]
            table.append(f"| {name} | {r['method']} | {r[f'seconds_batch{big}']:.3f} | "
                         f"{r['seconds_batch1'] * 1e3:.1f} | {steps} | {status} | "
                         f"{r['deviation_from_sequential']:.1e} | "
                         f"{r['reconstruction_error']:.1e} |")
    v["flow_table"] = "\n".join(table)
    for name, flow in payload["flows"].items():
        v[f"{name}_bpd"] = f"{flow['model']['test_bpd']:.3f}"
        v[f"{name}_train_min"] = f"{flow['model']['train_time_s'] / 60:.1f}"
        v[f"{name}_params"] = f"{flow['model']['parameters']:,}"
        v[f"{name}_units"] = str(flow["finc_units"])
        for key, name2 in (("lvl", short["lvl_pix"]), ("seq", short["seq_pix"]),
                           ("dense", short["dense"]), ("sparse", short["sparse"])):
            r = next((m for m in flow["methods"] if m["method"] == name2), {})
            v[f"{name}_{key}_s100"] = f"{r.get(f'seconds_batch{big}', float('nan')):.3f}"
    v.setdefault("mnist_bpd", "not measured (no MNIST files)")
    for key in ("lvl", "seq", "dense", "sparse"):
        v.setdefault(f"mnist_{key}_s100", "n/a")
    for key in ("train_min", "params", "units"):
        v.setdefault(f"mnist_{key}", "n/a")
    v["regime"] = payload["regime"]
    v["temperature"] = str(payload.get("temperature", 1.0))
    v["contraction"] = payload.get("contraction", {}).get("section_values", {}).get(
        "contraction", "not measured (run studies.finc_contraction)")
    return v


def render_section(payload: dict[str, Any], out: Path) -> None:
    """The section alone, filled (``studies.write_paper`` also places it in paper.md)."""
    text = re.sub(r"\A<!--.*?-->\s*\n", "", SECTION.read_text(), flags=re.S)
    atomic_write_bytes(out, text.format(**section_values(payload)).encode())


# ---------------------------------------------------------------------------- main


def _unit_measurements(mode: Mode, kernels: tuple[int, ...]) -> tuple[list, dict]:
    """Rows of part 1, each (k, n, batch) cached, so an interrupted run (or one split
    over processes with ``--kernels``) resumes without remeasuring."""
    unit_rows: list[dict[str, Any]] = []
    models: dict[str, Any] = {}
    for k in kernels:
        with timed(f"finc digits model k={k}"):
            model, info = _trained("digits", mode, kernel_size=k)
        models[f"digits-k{k}"] = info
        unit = model.finc_units()[-1]
        for n in SIZES[mode.name]:
            for batch in BATCHES:
                unit_rows += cached(
                    "finc-unit-rows", (info["checkpoint"], info["steps"], k, n, batch,
                                       mode.repeats),
                    lambda u=unit, k=k, n=n, b=batch: _unit_rows(u, k, n, b, mode.repeats))
    return unit_rows, models


def run(mode: Mode, mnist_checkpoint: str | None = None) -> dict[str, Any]:
    torch.set_num_threads(1)
    repeats = mode.repeats
    unit_rows, models = _unit_measurements(mode, KERNELS)
    flows: dict[str, Any] = {}
    digits = load_dataset("digits")
    with timed("finc digits flow sampling"):
        model, info = _trained("digits", mode)
        flows["digits"] = {"model": info, **_flow_rows(model, digits.test_x, repeats)}
    try:
        mnist = load_dataset("mnist")
    except DatasetError as exc:
        print(f"MNIST skipped: {exc}", flush=True)
        mnist = None
    if mnist is not None:
        with timed("finc mnist flow"):
            if mnist_checkpoint:
                model, info = _from_checkpoint(mnist_checkpoint, mnist.test_x)
            else:
                model, info = _trained("mnist", mode)
            flows["mnist"] = {"model": info, **_flow_rows(model, mnist.test_x, repeats)}
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    regime = (f"CPU ({torch.get_num_threads()} thread), float32 (scipy: float64), shared "
              f"2-core machine (load average at the end {load}); median of repeats")
    return {
        "regime": regime,
        "unit": {
            "rows": unit_rows,
            "models": models,
            "time_slopes": _slopes(unit_rows, "seconds", min_n=16 if mode.name == "full" else 8),
            "step_slopes": _slopes(unit_rows, "dependent_steps", min_n=8),
        },
        "flows": flows,
        "temperature": TEMPERATURE,
        "published": PUBLISHED,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=MODES, default="fast")
    parser.add_argument("--mnist-checkpoint", default=None,
                        help="use this trained MNIST flow instead of training the preset")
    parser.add_argument("--kernels", default=None,
                        help="only measure part 1 for these kernel sizes (e.g. 2,5) into the "
                             "cache and stop: lets part 1 run in several processes")
    parser.add_argument("--render", action="store_true",
                        help="only redraw the figure and the section from the stored JSON")
    args = parser.parse_args(argv)
    mode = MODES[args.mode]
    out_dir = Path(mode.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "finc_scaling.json"
    if args.kernels:
        torch.set_num_threads(1)
        _unit_measurements(mode, tuple(int(k) for k in args.kernels.split(",")))
        return
    if args.render:
        payload = read_json(path)
    else:
        with timed(f"finc_scaling {mode.name}"):
            payload = run(mode, args.mnist_checkpoint)
    # The flat values studies.write_paper fills the section with (studies.finc_contraction
    # adds its own); on --render they are refreshed, keeping the run's provenance.
    payload["section_values"] = section_values(payload)
    if args.render:
        atomic_write_bytes(path, (json.dumps(payload, indent=2) + "\n").encode())
    else:
        write_json(path, payload, seed=SEED)
    contraction = out_dir / "finc_contraction.json"
    if contraction.exists():  # written by studies.finc_contraction from this run's models
        payload["contraction"] = read_json(contraction)
    _figure(payload["unit"]["rows"], out_dir / "finc_scaling.png")
    render_section(payload, out_dir.parent / "finc.md")
    print(f"wrote {out_dir / 'finc_scaling.json'}, finc_scaling.png, "
          f"{out_dir.parent / 'finc.md'}")


if __name__ == "__main__":
    main()

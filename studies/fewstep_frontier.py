"""Study: the latency-quality frontier of few-step samplers and parallel-in-time solvers.

Two ways to cut a diffusion sampler's latency on one model, measured by one yardstick:
take fewer steps (diffusers' DDIM, PNDM, DPM-Solver++ 2M/3M, UniPC, Heun; iPNDM; AMED-Solver
and AMED-Plugin, on iPNDM and on DPM-Solver++(2M), distilled here; BOSS grids of Euler
steps) or solve many steps in parallel (sliding window and ParaTAA on DDIM-100; DDPM-1000
from ``diffusion_paradigms``; a BOSS grid solved by Picard iteration).  A class-conditional
model is sampled with classifier-free guidance ``diffusion_common.GUIDANCE`` everywhere
(every sampler, the reference solution, the AMED teacher, the BOSS reference), as
``diffusion_paradigms`` samples it, so the two studies judge the same sampler.  Quality is

* the RMS deviation of each sample from a high-accuracy solution of the same
  probability-flow ODE from the same noise (EDM Heun with ``ref_steps`` intervals on the
  polynomial grid, its own error estimated against half as many intervals), at the noise
  level where the sampler ends (``sigma_min = sigma(t = 0)``, or 0 for BOSS and diffusers'
  Heun: the reference is carried to 0 with one exact DDIM step), and
* FCD against the test images, with its own noise (the same converged sampler on two
  disjoint sets of starting noise),

against **dependent network evaluations** (latency on a device with room for the batch)
and **total evaluations per sample** (compute), and CPU wall-clock at batch 1.  Writes
``fewstep_frontier-<model>.json`` and ``.png`` (digits; MNIST in full mode once trained).

    python -m studies.fewstep_frontier --mode fast|full [--models digits,mnist] [--replot]
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

import fixedpoint as fp
import fixedpoint.diffusion as fd
from fixedpoint.diffusion import amed, fewstep

from .common import CACHE, ROOT, key, save_figure, write_json
from .diffusion_common import (
    GUIDANCE,
    md_table,
    meter_for,
    model_names,
    out_path,
    parse,
    trained_model,
)

# Published 5-NFE FID on CIFAR-10 (Zhou et al., AMED, CVPR 2024): the ordering to compare.
AMED_CIFAR = {
    "AMED-Plugin": 6.61,
    "AMED-Solver": 7.59,
    "iPNDM": 13.59,
    "DPM-Solver++(3M)": 24.97,
    "DDIM": 49.66,
}
BASELINES = {  # sampler name -> display name
    "ddim": "DDIM",
    "pndm": "PNDM (PLMS)",
    "dpmpp-2m": "DPM-Solver++(2M)",
    "dpmpp-3m": "DPM-Solver++(3M)",
    "unipc": "UniPC",
    "ipndm": "iPNDM",
    "heun": "Heun",
}
# AMED kind -> family name (the grid is appended); the base solver of each.
AMED_FAMILIES = {
    "amed": "AMED-Solver",
    "amed-plugin": "AMED-Plugin",
    "amed-plugin-dpmpp": "AMED-Plugin on DPM-Solver++(2M)",
}


def settings(mode) -> dict:
    if mode.name == "full":
        return dict(
            nfes=(3, 4, 5, 6, 8, 10, 12, 15, 20),
            samples=128,
            dev_samples=32,
            ref_steps=256,
            amed_nfes=(3, 5, 7),
            amed_samples=384,
            amed_epochs=8,
            amed_batch=16,
            boss_ks=(3, 4, 5, 6, 8, 10),
            boss_parallel_tols=(1e-1, 1e-2, 1e-3),
            ddim_steps=100,
            window=20,
            parallel_tols=(1e-1, 1e-2, 1e-3),
            parallel_samples=4,  # batch-1 solves timed (the deviation uses all dev_samples)
            wall_repeats=3,
        )
    return dict(
        nfes=(3, 5, 8),
        samples=32,
        dev_samples=8,
        ref_steps=32,
        amed_nfes=(5,),
        amed_samples=32,
        amed_epochs=1,
        amed_batch=16,
        boss_ks=(3, 5),
        boss_parallel_tols=(1e-2,),
        ddim_steps=20,
        window=8,
        parallel_tols=(1e-2,),
        parallel_samples=2,
        wall_repeats=1,
    )


# ------------------------------------------------------------------ helpers


def crop(images, model):
    size = model.meta.get("data_size", images.shape[-1])
    if size == images.shape[-1]:
        return images
    from fixedpoint.diffusion.train import crop_images

    return crop_images(images, size)


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over samples of the per-sample RMS difference (pixels in [-1, 1])."""
    return float((a - b).flatten(1).pow(2).mean(1).sqrt().mean())


def guidance_for(model) -> float | None:
    """The classifier-free guidance the studies sample a model with (None: unconditional)."""
    return GUIDANCE if model.num_classes else None


def eval_noise(model, n: int, seed: int = 12345):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *model.sample_shape, generator=g)
    labels = None if model.num_classes is None else torch.arange(n) % model.num_classes
    return x, labels


def reference(model, x, labels, steps: int) -> dict:
    """EDM Heun with ``steps`` and ``steps // 2`` intervals (continuous polynomial grid);
    the state at sigma_min and, one exact DDIM step later, at sigma = 0 (both guided as
    the samplers are)."""
    guidance = guidance_for(model)

    def solve(k: int) -> torch.Tensor:
        return (
            fewstep.HeunEDM(model.schedule, k, fewstep.PolynomialGrid(), integer=False)
            .sample(model.denoiser(), x, labels, guidance)
            .sample
        )

    fine, coarse = solve(steps), solve(steps // 2)
    abar0 = float(model.schedule.alphas_cumprod[0])
    with torch.no_grad():
        eps_fn = fewstep.GuidedEps(model.denoiser(), labels, guidance, len(x))
        eps = eps_fn(fine, torch.zeros(1, dtype=torch.long))
    zero = (fine - math.sqrt(1 - abar0) * eps) / math.sqrt(abar0)
    return {
        "min": fine,
        "zero": zero,
        # Heun is second order: the fine solve's error is about a third of the difference.
        "error_estimate": rms(fine, coarse) / 3,
        "difference_to_half": rms(fine, coarse),
        "evals": 2 * steps,
    }


class Points:
    """Collects one frontier point per (family, setting) with deviation, FCD, timing."""

    def __init__(self, model, meter, ref, x, labels, cfg):
        self.model, self.meter, self.ref, self.x, self.labels, self.cfg = (
            model,
            meter,
            ref,
            x,
            labels,
            cfg,
        )
        self.guidance = guidance_for(model)
        self.per_call = 1 if self.guidance is None else 2  # CFG: two rows per sample
        self.rows: list[dict] = []

    def ref_at(self, end_sigma: float, n: int) -> torch.Tensor:
        return (self.ref["zero"] if end_sigma == 0.0 else self.ref["min"])[:n]

    def quality(self, images: torch.Tensor, end_sigma: float, labels) -> dict:
        n = self.cfg["dev_samples"]
        out = {"deviation": rms(images[:n], self.ref_at(end_sigma, n))}
        if len(images) >= self.cfg["samples"]:
            scored = crop(images, self.model)
            out["fcd"] = self.meter.frechet(scored)
            if labels is not None:
                out["accuracy"] = self.meter.accuracy(scored, labels)
        return out

    def wall(self, run) -> float:
        """Seconds for one sample (batch 1), the fastest of ``wall_repeats`` runs."""
        best = math.inf
        for _ in range(self.cfg["wall_repeats"]):
            start = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - start)
        return best

    def add(self, **row) -> dict:
        self.rows.append(row)
        print(
            f"  {row['family']:<28} {row.get('setting', ''):<22} dep {row['dependent']:>6.1f} "
            f"dev {row.get('deviation', float('nan')):.4f} fcd {row.get('fcd', float('nan')):.3f}",
            flush=True,
        )
        return row

    def sampler(self, family: str, sampler, setting: str, grid: str | None) -> dict:
        den = self.model.denoiser()
        out = sampler.sample(den, self.x, self.labels, self.guidance)
        lab1 = None if self.labels is None else self.labels[:1]
        seconds = self.wall(lambda: sampler.sample(den, self.x[:1], lab1, self.guidance))
        return self.add(
            family=family,
            setting=setting,
            grid=grid,
            nfe=sampler.nfe,
            dependent=out.network.calls,
            total_per_sample=out.network.rows / len(self.x),
            end_sigma=out.end_sigma,
            seconds_b1=seconds,
            **self.quality(out.sample, out.end_sigma, self.labels),
        )


# ------------------------------------------------------------------ parts


def baselines(pts: Points, cfg: dict) -> None:
    """The issue's uniform-grid solvers, and iPNDM also on AMED's (polynomial) grid."""
    runs = [(name, family, "uniform") for name, family in BASELINES.items()]
    runs.append(("ipndm", "iPNDM, polynomial", "polynomial"))
    for name, family, grid in runs:
        for nfe in cfg["nfes"]:
            if name == "heun" and nfe % 2 == 0:
                continue  # Heun spends 2 n - 1 evaluations
            s = fewstep.make_sampler(name, pts.model, nfe, fewstep.GRIDS[grid]())
            pts.sampler(family, s, f"NFE {nfe}", grid)


def grid_ablation(pts: Points) -> list[dict]:
    """Every grid-taking sampler on every grid at NFE 5 (deviation and FCD)."""
    rows = []
    for name in ("dpmpp-2m", "dpmpp-3m", "unipc", "ipndm", "euler"):
        for grid in fewstep.GRIDS:
            s = fewstep.make_sampler(name, pts.model, 5, fewstep.GRIDS[grid]())
            out = s.sample(pts.model.denoiser(), pts.x, pts.labels, pts.guidance)
            rows.append(
                {
                    "sampler": name,
                    "grid": grid,
                    **pts.quality(out.sample, out.end_sigma, pts.labels),
                }
            )
    return rows


def trained_amed(model, cfg: dict, name: str, kind: str, nfe: int, grid_name: str,
                 fingerprint: str | None = None):
    """The study's AMED predictor of ``kind`` for ``nfe`` on grid ``grid_name``: loaded from
    the cache when one was distilled with the same settings, else distilled now.  Returns
    ``(sampler, training report)``."""
    fingerprint = fingerprint or amed.model_fingerprint(model)
    tc = amed.AMEDTrainConfig(
        kind=kind,
        nfe=nfe,
        grid=fewstep.GRIDS[grid_name](),
        samples=cfg["amed_samples"],
        epochs=cfg["amed_epochs"],
        batch_size=cfg["amed_batch"],
        guidance=guidance_for(model),  # the teacher is guided as the student samples
        seed=1,  # the distillation pool is not the evaluation noise (seed 12345)
    )
    path = CACHE / f"amed-{name}-{kind}-{nfe}-{key(fingerprint, tc.__dict__, str(tc.grid))}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    return amed.train_amed(model, tc, path, progress=False)


def neutral_amed(model, sampler, kind: str, grid):
    """The untrained (neutral) counterpart of AMED ``sampler``, i.e. its base solver on the
    same grid and steps: what learning adds is the difference between the two."""
    if kind == "amed":
        return fewstep.Midpoint(model.schedule, sampler.steps, grid, afs=sampler.afs)
    predictor = amed.AMEDPredictor(amed.bottleneck_features(model.unet))
    return amed.KINDS[kind](model.schedule, sampler.steps, predictor, grid, afs=sampler.afs)


def amed_points(pts: Points, cfg: dict, name: str) -> list[dict]:
    reports = []
    fingerprint = amed.model_fingerprint(pts.model)
    runs = [
        (nfe, kind, grid)
        for grid in ("uniform", "polynomial")
        for nfe in cfg["amed_nfes"]
        for kind in AMED_FAMILIES
    ]
    for nfe, kind, grid_name in runs:
        grid = fewstep.GRIDS[grid_name]()
        family = f"{AMED_FAMILIES[kind]} ({grid_name})"
        sampler, report = trained_amed(pts.model, cfg, name, kind, nfe, grid_name, fingerprint)
        reports.append({"kind": kind, "nfe": nfe, "grid": grid_name, **report})
        pts.sampler(family, sampler, f"NFE {nfe}", grid_name)
        base = neutral_amed(pts.model, sampler, kind, grid)
        pts.sampler(f"{family}, neutral r, c", base, f"NFE {nfe}", grid_name)
    return reports


def boss_points(pts: Points, cfg: dict) -> dict:
    flow = fd.probability_flow(pts.model)
    classes = pts.model.num_classes
    ref_labels = None if classes is None else torch.arange(100) % classes
    start = time.perf_counter()
    # The reference of fd.boss_grids (100 seeded noises, 100 Euler steps), made here with
    # the guidance every sampler of the study uses.
    noise = torch.randn(
        100, *flow.denoiser.sample_shape, generator=torch.Generator().manual_seed(0)
    )
    reference = fd.reference_trajectories(
        flow, noise, steps=100, labels=ref_labels, guidance=pts.guidance
    )
    grids = fd.boss_grids(flow, cfg["boss_ks"], reference=reference)
    info = {
        "reference_seconds": time.perf_counter() - start,
        "reference_dependent_calls": reference.calls,
        "reference_rows": reference.rows,
        "grids": {k: g.to_json() for k, g in grids.items()},
    }
    den = flow.denoiser
    for k, grid in grids.items():
        chain = grid.chain(flow)

        def run(x, labels, chain=chain):
            return fd.sample_loop(chain, den, chain.start(x), labels=labels, guidance=pts.guidance)

        images = run(pts.x, pts.labels)
        lab1 = None if pts.labels is None else pts.labels[:1]
        pts.add(
            family="BOSS grid (Euler)",
            setting=f"K {k}",
            grid="boss",
            nfe=k,
            dependent=k,
            total_per_sample=k * pts.per_call,
            end_sigma=0.0,
            seconds_b1=pts.wall(lambda run=run, lab1=lab1: run(pts.x[:1], lab1)),
            **pts.quality(images, 0.0, pts.labels),
        )
    # The largest BOSS grid solved in parallel (Picard iteration on its Picard form).
    k = max(grids)
    chain = grids[k].chain(flow)

    def picard(x, labels, atol):
        fmap = fd.PicardMap(chain, den, chain.start(x), labels=labels, guidance=pts.guidance)
        return fd.solve_chain(fmap, fp.Jacobi(atol=atol, rtol=0.0))

    for atol in cfg["boss_parallel_tols"]:
        pts.add(
            family=f"BOSS-{k} in parallel (Picard)",
            setting=f"atol {atol:g}",
            grid="boss",
            nfe=k,
            end_sigma=0.0,
            **parallel_costs(pts, cfg, lambda x, lab, a=atol: picard(x, lab, a), 0.0),
        )
    return info


def parallel_costs(pts: Points, cfg: dict, solve, end_sigma: float) -> dict:
    """Deviation of one batched solve of the deviation samples (as for every other point);
    dependent evaluations, rows and wall-clock from solves of ``parallel_samples`` samples
    one at a time (a batched solve waits for its slowest sample)."""
    n = cfg["dev_samples"]
    lab = None if pts.labels is None else pts.labels[:n]
    batched = solve(pts.x[:n], lab)
    calls, rows, secs = [], [], []
    for i in range(cfg["parallel_samples"]):
        lab1 = None if pts.labels is None else pts.labels[i : i + 1]
        t0 = time.perf_counter()
        out = solve(pts.x[i : i + 1], lab1)
        secs.append(time.perf_counter() - t0)
        calls.append(out.network.calls)
        rows.append(out.network.rows)
    m = len(calls)
    return dict(
        dependent=sum(calls) / m,
        total_per_sample=sum(rows) / m,
        seconds_b1=sorted(secs)[m // 2],
        deviation=rms(batched.sample, pts.ref_at(end_sigma, n)),
        batched_dependent=batched.network.calls,
    )


def parallel_points(pts: Points, cfg: dict) -> None:
    """DDIM-N (the trailing grid, ending at sigma_min like the others) sequential, and
    solved by the sliding window and by ParaTAA at several tolerances."""
    sched = fd.NoiseSchedule(
        {**pts.model.schedule.config, "timestep_spacing": "trailing", "set_alpha_to_one": False}
    )
    steps = cfg["ddim_steps"]
    chain = fd.DDIMChain.from_schedule(sched, steps)
    den = pts.model.denoiser()
    g = pts.guidance
    images = fd.sample_loop(chain, den, pts.x, labels=pts.labels, guidance=g)
    lab1 = None if pts.labels is None else pts.labels[:1]
    pts.add(
        family=f"DDIM-{steps} sequential",
        setting="",
        grid="uniform",
        nfe=steps,
        dependent=steps,
        total_per_sample=steps * pts.per_call,
        end_sigma=float(fewstep.Sigmas(sched).sigma_min),
        seconds_b1=pts.wall(lambda: fd.sample_loop(chain, den, pts.x[:1], labels=lab1, guidance=g)),
        **pts.quality(images, 1.0, pts.labels),
    )
    clean = fd.DDIMChain.from_schedule(sched, steps, fd.Split.CLEAN)

    def taa(a):
        return fp.TriangularAnderson(memory=2, ridge=1e-3, atol=a, rtol=0.0)

    methods = {  # family -> (method factory taking atol, chain: the split solved)
        f"DDIM-{steps}, sliding window W={cfg['window']}": (
            lambda a: fp.SlidingWindow(cfg["window"], atol=a, rtol=0.0),
            chain,
        ),
        f"DDIM-{steps}, ParaTAA (m=2)": (taa, chain),
        f"DDIM-{steps}, ParaTAA (m=2), clean split": (taa, clean),
    }
    for family, (make, solved) in methods.items():
        for atol in cfg["parallel_tols"]:

            def solve(x, labels, make=make, atol=atol, solved=solved):
                fmap = fd.PicardMap(solved, den, x, labels=labels, guidance=g)
                return fd.solve_chain(fmap, make(atol))

            pts.add(
                family=family,
                setting=f"atol {atol:g}",
                grid="uniform",
                nfe=steps,
                end_sigma=float(fewstep.Sigmas(sched).sigma_min),
                **parallel_costs(pts, cfg, solve, 1.0),
            )


def paradigms_points(pts: Points, name: str, mode) -> dict | None:
    """DDPM-1000 rows of ``diffusion_paradigms-<model>.json`` (FCD only: a stochastic
    sampler has no single ODE solution to deviate from)."""
    path = mode.out_dir / f"diffusion_paradigms-{name}.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    entry = next((e for e in data["samplers"] if e["sampler"] == "ddpm"), None)
    if entry is None:
        return None
    for r in entry["rows"]:
        fcd = entry["fcd"].get(r["method"])
        kind = "sequential" if r["method"] == "sequential" else "parallel"
        row = dict(
            family=f"DDPM-{entry['steps']} ({kind}, paradigms JSON)",
            setting=r["method"],
            grid="ddpm",
            nfe=entry["steps"],
            dependent=r["dependent_evals"],
            total_per_sample=r["evals_per_sample"],
            seconds_b1=r["seconds_b1"],
            source=str(path.relative_to(ROOT)),
        )
        if fcd is not None:
            row.update(
                fcd_other_samples=fcd["fcd"], fcd_samples=data["settings"]["fcd_samples"]["ddpm"]
            )
        pts.rows.append(row)
    return {"file": str(path.relative_to(ROOT)), "fcd_samples": data["settings"]["fcd_samples"]}


def fcd_noise(pts: Points) -> dict:
    """FCD of one converged sampler (DPM-Solver++(3M), NFE 20) on two disjoint noise sets."""
    s = fewstep.make_sampler("dpmpp-3m", pts.model, 20)
    values = []
    for seed in (12345, 54321):
        x, labels = eval_noise(pts.model, pts.cfg["samples"], seed)
        images = crop(s.sample(pts.model.denoiser(), x, labels, pts.guidance).sample, pts.model)
        values.append(pts.meter.frechet(images))
    return {
        "sampler": "DPM-Solver++(3M), NFE 20",
        "fcd_seed_a": values[0],
        "fcd_seed_b": values[1],
        "spread": abs(values[0] - values[1]),
    }


# ------------------------------------------------------------------ analysis


def frontier_winners(rows: list[dict], cost: str, quality: str) -> list[dict]:
    """For each budget (a value of ``cost`` some point has), the family with the best
    ``quality`` among the points within that budget."""
    usable = [r for r in rows if r.get(quality) is not None and r.get(cost) is not None]
    budgets = sorted({r[cost] for r in usable})
    out, best = [], None
    for b in budgets:
        within = [r for r in usable if r[cost] <= b]
        top = min(within, key=lambda r: r[quality])
        if best is None or top is not best:
            out.append(
                {
                    "budget": b,
                    "family": top["family"],
                    "setting": top.get("setting", ""),
                    quality: top[quality],
                }
            )
            best = top
    return out


def winners_text(winners: list[dict], unit: str, quality: str, fmt: str) -> str:
    parts = []
    for i, w in enumerate(winners):
        hi = winners[i + 1]["budget"] if i + 1 < len(winners) else None
        span = f"from {w['budget']:{fmt}} {unit}" + (f" (until {hi:{fmt}})" if hi else " on")
        parts.append(f"{span}: {w['family']} {w['setting']} ({quality} {w[quality]:.3g})")
    return "; ".join(parts)


# Our family for each published name: the grids AMED's authors used for their samplers
# (time-uniform for AMED-Solver, polynomial for AMED-Plugin and iPNDM), the issue's
# uniform grid for DPM-Solver++ and DDIM.
ORDERING = {
    "AMED-Plugin": "AMED-Plugin (polynomial)",
    "AMED-Solver": "AMED-Solver (uniform)",
    "iPNDM": "iPNDM, polynomial",
    "DPM-Solver++(3M)": "DPM-Solver++(3M)",
    "DDIM": "DDIM",
}
# The target (AMED beats DDIM and DPM-Solver++ at five evaluations), for every
# AMED family; the DPM-Solver++ plugin on the polynomial grid, as the iPNDM one.
TARGETS = {
    "AMED-Solver": ORDERING["AMED-Solver"],
    "AMED-Plugin": ORDERING["AMED-Plugin"],
    "AMED-Plugin on DPM-Solver++(2M)": "AMED-Plugin on DPM-Solver++(2M) (polynomial)",
}
COMPARED = {"DDIM": ORDERING["DDIM"], "DPM-Solver++(3M)": ORDERING["DPM-Solver++(3M)"]}


def best_configuration(rows5: list[dict], noise: float) -> str:
    """The target with every family on its best configuration at five evaluations (any
    grid; trained AMED predictors only), per metric, against the FCD's own noise."""
    kinds = {
        "AMED": lambda f: f.startswith("AMED") and "neutral" not in f,
        "DPM-Solver++": lambda f: f.startswith("DPM-Solver++"),
        "DDIM": lambda f: f == "DDIM" or f.startswith("DDIM,"),
    }
    parts = []
    for metric in ("fcd", "deviation"):
        best = {}
        for kind, match in kinds.items():
            have = [r for r in rows5 if match(r["family"]) and r.get(metric) is not None]
            if have:
                best[kind] = min(have, key=lambda r: r[metric])
        if len(best) < len(kinds):
            continue
        a = best["AMED"]
        others = [best["DPM-Solver++"], best["DDIM"]]
        margin = min(o[metric] for o in others) - a[metric]
        verdict = "beats both" if margin > 0 else "does not beat both"
        if metric == "fcd" and 0 < margin <= noise:
            verdict += f" (by {margin:.2g}, within the FCD's own noise {noise:.2g})"
        parts.append(
            f"by {metric}, {a['family']} {a[metric]:.3g} against {others[0]['family']} "
            f"{others[0][metric]:.3g} and {others[1]['family']} {others[1][metric]:.3g}: "
            f"{verdict}"
        )
    return "; ".join(parts) or "not measured"


def nfe5_table(rows: list[dict]) -> list[dict]:
    """Every sequential sampler run at five evaluations, best deviation first."""
    keep = [
        r
        for r in rows
        if r.get("nfe") == 5 and r.get("dependent") == 5 and "parallel" not in r["family"]
    ]
    return sorted(keep, key=lambda r: r["deviation"])


def ordering(rows5: list[dict], metric: str) -> dict:
    by = {r["family"]: r for r in rows5 if r.get(metric) is not None}
    ours = [name for name, fam in ORDERING.items() if fam in by]
    ours.sort(key=lambda name: by[ORDERING[name]][metric])
    published = sorted(AMED_CIFAR, key=AMED_CIFAR.get)
    return {
        "ours": ours,
        "published": published,
        "same": ours == published,
        "families": ORDERING,
        "values": {name: by[ORDERING[name]][metric] for name in ours},
    }


def section_values(p: dict) -> dict:
    m = p["model"]
    rows5 = p["nfe5"]
    table = md_table(
        [
            "sampler",
            "grid",
            "dependent evals",
            "evals / sample",
            "RMS deviation",
            "FCD",
            "accuracy",
            "ms, batch 1",
        ],
        [
            [
                r["family"],
                r["grid"],
                r["dependent"],
                r["total_per_sample"],
                r["deviation"],
                r.get("fcd", "-"),
                r.get("accuracy", "-"),
                1000 * r["seconds_b1"],
            ]
            for r in rows5
        ],
    )
    grid_table = md_table(
        ["sampler", "grid", "RMS deviation", "FCD"],
        [[r["sampler"], r["grid"], r["deviation"], r.get("fcd", "-")] for r in p["grid_ablation"]],
    )
    fcd_order, dev_order = p["ordering"]["fcd"], p["ordering"]["deviation"]
    by = {r["family"]: r for r in rows5}

    def beats(a: str, b: str, metric: str) -> str | None:
        fa, fb = TARGETS[a], COMPARED[b]
        if fa not in by or fb not in by:
            # A results file from before a family existed lacks it: say nothing of it.
            return None
        va, vb = by[fa].get(metric), by[fb].get(metric)
        if va is None or vb is None:
            return f"{a} vs {b}: {metric} not measured"
        verb = "beats" if va < vb else "does not beat"
        return f"{a} {verb} {b} on {metric} ({va:.3g} vs {vb:.3g})"

    found = [
        beats(a, b, metric) for metric in ("fcd", "deviation") for a in TARGETS for b in COMPARED
    ]
    targets = "; ".join(t for t in found if t is not None) or "not measured"
    noise = p["fcd_noise"]
    ref = p["reference"]
    amed_secs = [r["seconds"] for r in p.get("amed_training", [])]
    values = {
        f"fs_{m}_table": table,
        f"fs_{m}_grid_table": grid_table,
        f"fs_{m}_fcd_ordering": " < ".join(fcd_order["ours"]),
        f"fs_{m}_dev_ordering": " < ".join(dev_order["ours"]),
        f"fs_{m}_published_ordering": " < ".join(
            f"{k} {v}" for k, v in sorted(AMED_CIFAR.items(), key=lambda kv: kv[1])
        ),
        f"fs_{m}_fcd_same": "holds" if fcd_order["same"] else "does not hold",
        f"fs_{m}_dev_same": "holds" if dev_order["same"] else "does not hold",
        f"fs_{m}_targets": targets,
        f"fs_{m}_target_best": best_configuration(rows5, p["fcd_noise"]["spread"]),
        f"fs_{m}_win_dependent": winners_text(
            p["winners"]["dependent_deviation"], "dependent evaluations", "deviation", "g"
        ),
        f"fs_{m}_win_dependent_fcd": winners_text(
            p["winners"]["dependent_fcd"], "dependent evaluations", "fcd", "g"
        ),
        f"fs_{m}_win_total": winners_text(
            p["winners"]["total_deviation"], "evaluations per sample", "deviation", "g"
        ),
        f"fs_{m}_win_wall": winners_text(p["winners"]["wall_deviation"], "s", "deviation", ".3f"),
        f"fs_{m}_fcd_noise": f"{noise['fcd_seed_a']:.3g} vs {noise['fcd_seed_b']:.3g}",
        f"fs_{m}_fcd_spread": noise["spread"],
        f"fs_{m}_ref_evals": ref["evals"],
        f"fs_{m}_ref_error": ref["error_estimate"],
        f"fs_{m}_samples": p["settings"]["samples"],
        f"fs_{m}_dev_samples": p["settings"]["dev_samples"],
        f"fs_{m}_amed_samples": p["settings"]["amed_samples"],
        f"fs_{m}_amed_epochs": p["settings"]["amed_epochs"],
        f"fs_{m}_amed_batch": p["settings"]["amed_batch"],
        f"fs_{m}_amed_minutes": max(amed_secs) / 60 if amed_secs else 0.0,
        f"fs_{m}_amed_nfes": ", ".join(str(v) for v in p["settings"]["amed_nfes"]),
        f"fs_{m}_boss_seconds": p["boss"]["reference_seconds"],
        f"fs_{m}_parallel_samples": p["settings"]["parallel_samples"],
        f"fs_{m}_ddim_steps": p["settings"]["ddim_steps"],
        f"fs_{m}_regime": p["regime"],
    }
    return values


def figure(p: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 5.8))
    families: dict[str, list[dict]] = {}
    for r in p["points"]:
        families.setdefault(r["family"], []).append(r)
    markers = "os^vD<>xP*hX+1234"
    colours = plt.get_cmap("tab20").colors
    for i, (fam, rows) in enumerate(sorted(families.items())):
        style = dict(
            marker=markers[i % len(markers)], ms=5, lw=1.2, label=fam, color=colours[i % 20]
        )
        if "neutral" in fam or "polynomial" in fam and "AMED" not in fam:
            style.update(ls=":", alpha=0.7)
        for ax, xk, yk in (
            (axes[0], "dependent", "deviation"),
            (axes[1], "dependent", "fcd"),
            (axes[2], "total_per_sample", "deviation"),
        ):
            pts = sorted((r[xk], r[yk]) for r in rows if r.get(yk) is not None)
            if yk == "fcd":
                pts += sorted(
                    (r[xk], r["fcd_other_samples"])
                    for r in rows
                    if r.get("fcd_other_samples") is not None and r.get(yk) is None
                )
            if pts:
                ax.plot([a for a, _ in pts], [b for _, b in pts], **style)
    noise = p["fcd_noise"]
    axes[1].axhspan(
        min(noise["fcd_seed_a"], noise["fcd_seed_b"]),
        max(noise["fcd_seed_a"], noise["fcd_seed_b"]),
        color="0.85",
        label="FCD noise (DPM-Solver++(3M)-20, two seeds)",
    )
    for ax, (xl, yl) in zip(
        axes,
        (
            ("dependent network evaluations (latency)", "RMS deviation"),
            ("dependent network evaluations (latency)", "FCD"),
            ("network evaluations per sample (compute)", "RMS deviation"),
        ),
    ):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_title(f"{p['model']}: deviation from the reference ODE solution")
    axes[1].set_title("FCD against the test images")
    axes[2].set_title("deviation against total compute")
    seen: dict[str, object] = {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(lab, h)
    handles, labels = list(seen.values()), list(seen)
    fig.legend(
        handles,
        labels,
        fontsize=7,
        loc="lower center",
        ncol=5,
        frameon=False,
        bbox_to_anchor=(0.5, -0.02),
    )
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    save_figure(fig, path)
    plt.close(fig)


# ------------------------------------------------------------------ main


def run_model(name: str, mode, cfg: dict) -> dict:
    model = trained_model(name, mode)
    meter, _ = meter_for(name)
    x, labels = eval_noise(model, cfg["samples"])
    n = cfg["dev_samples"]
    t0 = time.perf_counter()
    ref = reference(model, x[:n], None if labels is None else labels[:n], cfg["ref_steps"])
    print(
        f"[{name}] reference: {time.perf_counter() - t0:.0f} s, error ~{ref['error_estimate']:.2e}",
        flush=True,
    )
    pts = Points(model, meter, ref, x, labels, cfg)
    baselines(pts, cfg)
    ablation = grid_ablation(pts)
    amed_reports = amed_points(pts, cfg, name)
    boss = boss_points(pts, cfg)
    parallel_points(pts, cfg)
    paradigms = paradigms_points(pts, name, mode)
    noise = fcd_noise(pts)
    rows = pts.rows
    own = [r for r in rows if r.get("deviation") is not None]
    rows5 = nfe5_table(rows)
    guidance = guidance_for(model)
    payload = {
        "model": name,
        "test_loss": model.meta.get("test_loss"),
        "settings": cfg,
        "guidance": guidance,
        "regime": "CPU, 1 torch thread, float32, batch 1 for wall-clock, machine shared with "
        "other jobs"
        + (
            f"; classifier-free guidance {guidance:g} for every sampler, the reference, the "
            "AMED teacher and the BOSS reference"
            if guidance is not None
            else ""
        ),
        "reference": {k: v for k, v in ref.items() if k not in ("min", "zero")}
        | {"solver": f"EDM Heun, {cfg['ref_steps']} intervals, continuous polynomial grid"},
        "points": rows,
        "grid_ablation": ablation,
        "amed_training": amed_reports,
        "boss": boss,
        "paradigms": paradigms,
        "fcd_noise": noise,
        "nfe5": rows5,
        "ordering": {"fcd": ordering(rows5, "fcd"), "deviation": ordering(rows5, "deviation")},
        "winners": {
            "dependent_deviation": frontier_winners(own, "dependent", "deviation"),
            "dependent_fcd": frontier_winners(rows, "dependent", "fcd"),
            "total_deviation": frontier_winners(own, "total_per_sample", "deviation"),
            "wall_deviation": frontier_winners(own, "seconds_b1", "deviation"),
        },
        "anchor": {"AMED CIFAR-10 FID at 5 NFE": AMED_CIFAR},
    }
    payload["section_values"] = section_values(payload)
    write_json(out_path(mode, f"fewstep_frontier-{name}.json"), payload, seed=12345)
    figure(payload, out_path(mode, f"fewstep_frontier-{name}.png"))
    return payload


def mnist_note(mode) -> str:
    """The paper's sentence on the MNIST frontier: measured, or why not."""
    if (mode.out_dir / "fewstep_frontier-mnist.json").is_file():
        return "The MNIST frontier is in `results/fewstep_frontier-mnist.json` and `.png`."
    if "mnist" in model_names(mode):
        return (
            "A trained MNIST model exists, but no run has measured it yet (`--models "
            "mnist` adds its frontier), so only the digits model is measured here."
        )
    return (
        "No trained MNIST model was available to this run, so only the digits model is "
        "measured here."
    )


def run(argv: list[str] | None = None) -> dict:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--models", default=None, help="comma-separated (default: all trained)")
    parser.add_argument(
        "--replot",
        action="store_true",
        help="only redraw the figures and recompute the section values from the JSON files",
    )
    own, rest = parser.parse_known_args(argv)
    mode = parse(__doc__, rest)
    if own.replot:  # figures and section values from the JSON files, no sampling
        for path in sorted(mode.out_dir.glob("fewstep_frontier-*.json")):
            payload = json.loads(path.read_text())
            payload["section_values"] = section_values(payload)
            if path.stem.endswith("-digits"):
                payload["section_values"]["fs_mnist_note"] = mnist_note(mode)
            write_json(path, payload, seed=12345)
            figure(payload, path.with_suffix(".png"))
        return {}
    cfg = settings(mode)
    names = model_names(mode) if own.models is None else tuple(own.models.split(","))
    results = {}
    for name in names:
        results[name] = run_model(name, mode, cfg)
    digits = mode.out_dir / "fewstep_frontier-digits.json"
    if "digits" not in results and digits.is_file():  # e.g. `--models mnist` alone
        results["digits"] = json.loads(digits.read_text())
    if "digits" in results:
        results["digits"]["section_values"]["fs_mnist_note"] = mnist_note(mode)
        write_json(digits, results["digits"], seed=12345)
    return results


if __name__ == "__main__":
    run()

"""The 5-NFE comparison by FCD on many samples: does AMED beat DDIM and DPM-Solver++?

``fewstep_frontier`` scores FCD on 128 samples, whose own spread (two noise sets of a
converged sampler: 2.1 on digits, 3.4 on MNIST) is as large as the gaps between the 5-NFE
samplers.  Here each sampler of the issue's 5-NFE target draws ``samples`` images from
each of two disjoint sets of starting noise, the same two sets for every sampler (a
paired comparison: differences between samplers are not differences between noises).
Reported per sampler: FCD and class accuracy on each set, their mean, and the spread
between the sets; the target is judged to hold when the best AMED configuration has a
lower FCD than DDIM and than the best DPM-Solver++ on *both* sets.  The AMED predictors
are the frontier's (same distillation settings and cache file; distilled now if
missing).  Class-conditional models are sampled with guidance ``GUIDANCE`` as in the
frontier.  Writes ``fewstep_fcd5-<model>.json``.

    python -m studies.fewstep_fcd5 --mode fast|full [--models digits mnist]
"""

from __future__ import annotations

import time

import torch

from fixedpoint.diffusion import fewstep

from . import fewstep_frontier as frontier
from .common import write_json
from .diffusion_common import md_table, meter_for, model_names, out_path, parse_args, trained_model

NFE = 5
# (family, how to build it): the diffusers baselines on the uniform grid (their best grid
# at NFE 5 in the frontier's grid ablation), and the AMED configurations the frontier found
# best at NFE 5 (the plugin on DPM-Solver++(2M), uniform grid; AMED-Solver on its authors'
# polynomial grid), with the plugin's untrained (neutral) predictor beside it.
BASELINES = (
    ("DDIM", "ddim"),
    ("DPM-Solver++(2M)", "dpmpp-2m"),
    ("DPM-Solver++(3M)", "dpmpp-3m"),
    ("UniPC", "unipc"),
)
AMED_RUNS = (
    ("AMED-Plugin on DPM-Solver++(2M) (uniform)", "amed-plugin-dpmpp", "uniform"),
    ("AMED-Solver (polynomial)", "amed", "polynomial"),
)
NOISE_SEEDS = (2001, 2002)  # disjoint from the frontier's evaluation (12345) and distillation (1)


def settings(mode) -> dict:
    frontier_cfg = frontier.settings(mode)
    amed_cfg = {k: frontier_cfg[k] for k in ("amed_samples", "amed_epochs", "amed_batch")}
    if mode.name == "full":
        return dict(samples=1024, chunk=256, **amed_cfg)
    return dict(samples=64, chunk=64, **amed_cfg)


def samplers(model, cfg: dict, name: str) -> dict:
    """family -> a sampler with ``.sample(denoiser, x, labels, guidance)``."""
    out = {
        family: fewstep.make_sampler(kind, model, NFE, fewstep.GRIDS["uniform"]())
        for family, kind in BASELINES
    }
    for family, kind, grid in AMED_RUNS:
        sampler, _ = frontier.trained_amed(model, cfg, name, kind, NFE, grid)
        out[family] = sampler
        if kind == "amed-plugin-dpmpp":
            neutral = frontier.neutral_amed(model, sampler, kind, fewstep.GRIDS[grid]())
            out[f"{family}, neutral r, c"] = neutral
    return out


def draw(model, sampler, cfg: dict, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``cfg['samples']`` images from noise set ``seed``, in chunks (bounded memory)."""
    x, labels = frontier.eval_noise(model, cfg["samples"], seed)
    guidance = frontier.guidance_for(model)
    images = []
    for i in range(0, len(x), cfg["chunk"]):
        lab = None if labels is None else labels[i : i + cfg["chunk"]]
        out = sampler.sample(model.denoiser(), x[i : i + cfg["chunk"]], lab, guidance)
        images.append(out.sample)
    return frontier.crop(torch.cat(images), model), labels


def measure(model, meter, cfg: dict, name: str) -> list[dict]:
    rows = []
    for family, sampler in samplers(model, cfg, name).items():
        start = time.perf_counter()
        per_set = []
        for seed in NOISE_SEEDS:
            images, labels = draw(model, sampler, cfg, seed)
            acc = None if labels is None else meter.accuracy(images, labels)
            per_set.append({"seed": seed, "fcd": meter.frechet(images), "accuracy": acc})
        fcds = [s["fcd"] for s in per_set]
        rows.append(
            {
                "family": family,
                "sets": per_set,
                "fcd_mean": sum(fcds) / len(fcds),
                "fcd_spread": max(fcds) - min(fcds),
                "seconds": time.perf_counter() - start,
            }
        )
        print(f"  {family:<46} FCD {fcds[0]:.2f} / {fcds[1]:.2f}", flush=True)
    return rows


def verdict(rows: list[dict]) -> dict:
    """The best AMED, DPM-Solver++ and DDIM rows by mean FCD (trained AMED only) and whether
    the AMED one is lower than both others on every noise set."""

    def best(match) -> dict:
        return min((r for r in rows if match(r["family"])), key=lambda r: r["fcd_mean"])

    a = best(lambda f: f.startswith("AMED") and "neutral" not in f)
    others = [best(lambda f: f.startswith("DPM-Solver++")), best(lambda f: f == "DDIM")]
    beats = {
        o["family"]: all(sa["fcd"] < so["fcd"] for sa, so in zip(a["sets"], o["sets"]))
        for o in others
    }
    return {"amed": a["family"], "against": beats, "holds": all(beats.values())}


def section_values(p: dict) -> dict:
    m = p["model"]
    table = md_table(
        ["sampler (NFE 5)", "FCD, set A", "FCD, set B", "mean", "spread", "accuracy (mean)"],
        [
            [
                r["family"],
                r["sets"][0]["fcd"],
                r["sets"][1]["fcd"],
                r["fcd_mean"],
                r["fcd_spread"],
                "-"
                if r["sets"][0]["accuracy"] is None
                else sum(s["accuracy"] for s in r["sets"]) / len(r["sets"]),
            ]
            for r in sorted(p["rows"], key=lambda r: r["fcd_mean"])
        ],
    )
    v = p["verdict"]
    won = [f for f, b in v["against"].items() if b]
    lost = [f for f, b in v["against"].items() if not b]
    text = f"{v['amed']} " + (
        "has a lower FCD than " + " and ".join(won) + " on both noise sets: the target holds"
        if v["holds"]
        else (
            ("has a lower FCD than " + " and ".join(won) + " on both noise sets but not than "
             if won else "does not have a lower FCD than ")
            + " and ".join(lost)
            + " on both: the target does not hold by FCD"
        )
    )
    return {
        f"fs5_{m}_table": table,
        f"fs5_{m}_samples": p["samples"],
        f"fs5_{m}_verdict": text,
        f"fs5_{m}_regime": p["regime"],
    }


def run(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(__doc__, argv)
    mode = args.mode
    cfg = settings(mode)
    torch.set_num_threads(1)
    payloads = []
    for name in args.models or model_names(mode):
        sets = len(NOISE_SEEDS)
        print(f"[fcd5] {name}: {cfg['samples']} samples x {sets} noise sets", flush=True)
        model = trained_model(name, mode)
        meter, _ = meter_for(name)
        rows = measure(model, meter, cfg, name)
        payload = {
            "model": name,
            "nfe": NFE,
            "samples": cfg["samples"],
            "noise_seeds": NOISE_SEEDS,
            "guidance": frontier.guidance_for(model),
            "rows": rows,
            "verdict": verdict(rows),
            "regime": "CPU, 1 torch thread, float32, machine shared with other jobs",
        }
        payload["section_values"] = section_values(payload)
        write_json(out_path(mode, f"fewstep_fcd5-{name}.json"), payload, seed=NOISE_SEEDS[0])
        payloads.append(payload)
    return payloads


if __name__ == "__main__":
    run()

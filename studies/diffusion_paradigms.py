"""Study 2: the ParaDiGMS table on the models trained here (DDIM-100, DDPM-1000).

For each trained model (digits; MNIST when its files are there) and each sampler, every
method solves the Picard form of the chain; the table reports per sample the network
evaluations (rows through the UNet), the dependent evaluations (parallel iterations
times the network calls each needs), the deviation from the sequential sampler from the
same noise, wall-clock at batch 1 and at a larger batch (CPU, one thread), and FCD
against the test images for the sequential sampler, a second sequential run with other
seeds (the metric's own noise) and the fastest method within the deviation budget.
Writes ``diffusion_paradigms-<model>.json``.

    python -m studies.diffusion_paradigms --mode fast|full [--models ...] [--samplers ...]
    python -m studies.diffusion_paradigms --mode full --revalue   # section values only
"""

from __future__ import annotations

import time

import torch

import fixedpoint as fp
from fixedpoint.diffusion import (
    DDIMChain,
    DDPMChain,
    PicardMap,
    Split,
    paradigms_tolerance,
    sample_loop,
    solve_chain,
)
from fixedpoint.diffusion.diagnostics import network_call_seconds

from .common import provenance, read_json, write_json
from .diffusion_common import (
    GUIDANCE,
    final_error,
    md_table,
    meter_for,
    model_names,
    out_path,
    parse_args,
    trained_model,
)

BUDGET = 1e-3  # max deviation of a sample from the sequential one (data in [-1, 1])
# The targets (for DDIM-100 and DDPM-1000 on MNIST): fewer dependent evaluations.
TARGET_DDIM, TARGET_DDPM = 15.0, 25.0
# 5e-4 between 1e-3 and 3e-4: on the MNIST DDPM-1000 chain the window-400 ParaTAA misses the
# budget at 1e-3 (1.1e-3) and meets it at 5e-4 with 4 fewer dependent calls than at 3e-4.
TOLERANCES = (1e-2, 3e-3, 1e-3, 5e-4, 3e-4, 1e-4)


def settings(mode, name: str = "digits") -> dict:
    # Sized for two CPU cores shared with other jobs: a handful of seeds at batch 1, FCD
    # on a few dozen samples (its noise is measured the same way, so it is comparable).
    # The MNIST UNet costs about 8x the digits one per row (28x28 against 8x8 pixels), so
    # its larger batch is 4: at 8 the DDPM-1000 rows alone took most of an hour.
    if mode.name == "full":
        return dict(
            # (chain, steps, ParaDiGMS's window, ParaTAA's window).  ParaTAA's DDPM-1000
            # window, measured on the MNIST chain (clean split, m = 3, atol 5e-4, seed 0):
            # W = 160 41 dependent calls, 250 33, 400 28 (total rows 12.3k, 13.7k, 16.0k).
            samplers=((DDIMChain, 100, 20, 40), (DDPMChain, 1000, 80, 400)),
            seeds=2,
            big_batch=4 if name == "mnist" else 8,
            fcd_samples={"ddim": 128, "ddpm": 32},
            fcd_batch=32,
            full_window_limit=200,
            guidance=GUIDANCE,
        )
    return dict(
        samplers=((DDIMChain, 20, 8, 16), (DDPMChain, 100, 16, 32)),
        seeds=2,
        big_batch=4,
        fcd_samples={"ddim": 32, "ddpm": 16},
        fcd_batch=16,
        full_window_limit=200,
        guidance=GUIDANCE,
    )


def draw(model, chain, batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    shape = model.sample_shape
    x = torch.randn(batch, *shape, generator=g)
    noise = torch.randn(batch, len(chain), *shape, generator=g) if chain.stochastic else None
    labels = torch.arange(seed * batch, seed * batch + batch) % model.num_classes
    return x, noise, labels


def candidates(chain, window: int, taa_window: int, limit: int) -> dict:
    """name -> (tolerances, method factory taking atol, split of the Picard form).

    Tolerances ``None``: the method has its own rule.  Every method runs on the noise
    split (ParaDiGMS's form, the default); the sliding window and the ParaTAA variants
    also on the clean split (``fd.Split``), to measure what the split is worth here.
    """
    n = len(chain)
    tau = paradigms_tolerance(chain, 0.1)
    noise, clean = Split.NOISE, Split.CLEAN
    taa_window = min(n, taa_window)

    def window_taa(a):
        # ParaTAA on its own sliding window, wider than ParaDiGMS's (settings()); m = 3
        # (on the digits DDPM-1000 chain W = 160, m = 3 needed about 30% fewer dependent
        # calls than W = 80, m = 2; on MNIST m = 4 gained nothing over m = 3).
        return fp.TriangularAnderson(
            memory=3, ridge=1e-3, atol=a, rtol=0.0, window_width=taa_window
        )

    def full_taa(a):
        return fp.TriangularAnderson(memory=2, ridge=1e-3, atol=a, rtol=0.0)

    def sliding(a):
        return fp.SlidingWindow(window, atol=a, rtol=0.0)

    out = {
        f"ParaDiGMS rule (W={window}, tau=0.1)": (
            None,
            lambda a: fp.SlidingWindow(window, atol=tau, rtol=0.0, rms=True),
            noise,
        ),
        f"sliding window W={window}": (TOLERANCES, sliding, noise),
        f"block Picard ({max(2, n // window)} blocks)": (
            TOLERANCES,
            lambda a: fp.GSJacobi(modules=max(2, n // window), atol=a, rtol=0.0),
            noise,
        ),
        f"ParaTAA on a window W={taa_window} (m=3)": (TOLERANCES, window_taa, noise),
        f"ParaTAA on a window W={taa_window} (m=3), clean split": (
            TOLERANCES,
            window_taa,
            clean,
        ),
    }
    if n <= limit:
        out[f"sliding window W={window}, clean split"] = (TOLERANCES, sliding, clean)
        out["Picard (full window)"] = (TOLERANCES, lambda a: fp.Jacobi(atol=a, rtol=0.0), noise)
        out["Picard (full window), clean split"] = (
            TOLERANCES,
            lambda a: fp.Jacobi(atol=a, rtol=0.0),
            clean,
        )
        out["triangular Anderson (ParaTAA, m=2)"] = (TOLERANCES, full_taa, noise)
        out["triangular Anderson (ParaTAA, m=2), clean split"] = (TOLERANCES, full_taa, clean)
    return out


def guidance(model, cfg) -> float | None:
    """Classifier-free guidance for a class-conditional model; None for an unconditional one."""
    return cfg["guidance"] if model.num_classes else None


def solve_once(model, chain, method, batch, seed, cfg):
    x, noise, labels = draw(model, chain, batch, seed)
    fmap = PicardMap(
        chain, model.denoiser(), x, noise, labels=labels, guidance=guidance(model, cfg)
    )
    start = time.perf_counter()
    out = solve_chain(fmap, method)
    seconds = time.perf_counter() - start
    return out, seconds


def sequential(model, chain, batch, seed, cfg):
    x, noise, labels = draw(model, chain, batch, seed)
    start = time.perf_counter()
    traj = sample_loop(
        chain,
        model.denoiser(),
        x,
        noise,
        labels=labels,
        guidance=guidance(model, cfg),
        trajectory=True,
    )
    return traj, time.perf_counter() - start


def study_sampler(model, chain, window, taa_window, cfg) -> dict:
    seeds = range(cfg["seeds"])
    ref = {s: sequential(model, chain, 1, s, cfg) for s in seeds}
    seq_time1 = sorted(t for _, t in ref.values())[len(ref) // 2]
    big_ref, seq_big = sequential(model, chain, cfg["big_batch"], 100, cfg)
    rows = [
        {
            "method": "sequential",
            "atol": None,
            "iterations": len(chain),
            "dependent_evals": len(chain) * chain.stages - (chain.stages - 1),
            "evals_per_sample": len(chain) * chain.stages - (chain.stages - 1),
            "deviation": 0.0,
            "seconds_b1": seq_time1,
            "seconds_big": seq_big,
        }
    ]
    split_chains = {s: type(chain).from_schedule(model.schedule, len(chain), s) for s in Split}
    chosen_methods = candidates(chain, window, taa_window, cfg["full_window_limit"])
    if cfg.get("methods"):
        wanted = [w.lower() for w in cfg["methods"]]
        chosen_methods = {
            k: v for k, v in chosen_methods.items() if any(w in k.lower() for w in wanted)
        }
    for name, (tols, make, split) in chosen_methods.items():
        print(f"[paradigms] {chain.name}-{len(chain)}: {name}", flush=True)
        chain = split_chains[split]
        # The loosest tolerance whose deviation is within the budget on every seed: one
        # seed alone chose W=400 at 5e-4 on MNIST DDPM-1000, which seed 1 then broke.
        for atol in tols or (None,):
            method = make(atol)
            devs, times, its, calls, rows_ = [], [], [], [], []
            for s in seeds:
                out, sec = solve_once(model, chain, method, 1, s, cfg)
                devs.append(final_error(out.result.x, ref[s][0]))
                times.append(sec)
                its.append(out.result.iterations)
                calls.append(out.network.calls)
                rows_.append(out.network.rows)
                if devs[-1] > BUDGET and tols is not None and atol != tols[-1]:
                    break
            if max(devs) <= BUDGET or tols is None or atol == tols[-1]:
                chosen = atol
                break
        big, sec_big = solve_once(model, chain, method, cfg["big_batch"], 100, cfg)
        rows.append(
            {
                "method": name,
                "split": split.value,
                "atol": chosen,
                "iterations": sum(its) / len(its),
                "dependent_evals": sum(calls) / len(calls),
                "evals_per_sample": sum(rows_) / len(rows_),
                "deviation": max(devs),
                "seconds_b1": sorted(times)[len(times) // 2],
                "seconds_big": sec_big,
                "deviation_big": final_error(big.result.x, big_ref),
                "iterations_big": big.result.iterations,
            }
        )
    for r in rows:
        r["speedup_dependent"] = rows[0]["dependent_evals"] / max(r["dependent_evals"], 1)
        r["speedup_b1"] = rows[0]["seconds_b1"] / r["seconds_b1"]
        r["speedup_big"] = rows[0]["seconds_big"] / r["seconds_big"]
        r["meets_budget"] = r["deviation"] <= BUDGET
    return {
        "sampler": chain.name,
        "steps": len(chain),
        "window": window,
        "taa_window": taa_window,
        "rows": rows,
    }


def fcd(model, chain, method, cfg, meter, seed0: int) -> tuple[float, float]:
    """FCD and accuracy of ``cfg['fcd_samples'][sampler]`` samples (None: sequential)."""
    images, labels = [], []
    total = cfg["fcd_samples"][chain.name]
    for k in range(max(1, total // cfg["fcd_batch"])):
        x, noise, lab = draw(model, chain, min(cfg["fcd_batch"], total), seed0 + k)
        if method is None:
            img = sample_loop(
                chain, model.denoiser(), x, noise, labels=lab, guidance=guidance(model, cfg)
            )
        else:
            fmap = PicardMap(
                chain, model.denoiser(), x, noise, labels=lab, guidance=guidance(model, cfg)
            )
            img = solve_chain(fmap, method).sample
        images.append(img)
        labels.append(lab)
    images = crop(torch.cat(images), model)
    return meter.frechet(images), meter.accuracy(images, torch.cat(labels))


def crop(images, model):
    size = model.meta.get("data_size", images.shape[-1])
    if size == images.shape[-1]:
        return images
    from fixedpoint.diffusion.train import crop_images

    return crop_images(images, size)


def section_values(p: dict) -> dict:
    """Placeholders ``par_<model>_*`` of the paper section."""
    m = p["model"]
    rows, fcd_rows, best = [], [], {}
    for entry in p["samplers"]:
        label = f"{entry['sampler'].upper()}-{entry['steps']}"
        for r in entry["rows"]:
            rows.append(
                [
                    label,
                    r["method"],
                    "-" if r["atol"] is None else f"{r['atol']:g}",
                    r["dependent_evals"],
                    round(r["evals_per_sample"]),
                    f"{r['deviation']:.1e}",
                    r["speedup_dependent"],
                    r["seconds_b1"],
                    r["speedup_b1"],
                    r["seconds_big"],
                    r["speedup_big"],
                ]
            )
        for k, q in entry["fcd"].items():
            fcd_rows.append([label, k, q["fcd"], q["accuracy"]])
        ok = [r for r in entry["rows"][1:] if r["meets_budget"]]
        top = max(ok, key=lambda r: r["speedup_dependent"]) if ok else None
        best[entry["sampler"]] = top
    calls = p["network_call_seconds"]
    one = calls["1"]
    values = {
        f"par_{m}_table": md_table(
            [
                "sampler",
                "method",
                "atol",
                "dependent evals",
                "evals / sample",
                "max deviation",
                "fewer dependent",
                "s, batch 1",
                "speed-up b1",
                f"s, batch {p['settings']['big_batch']}",
                "speed-up",
            ],
            rows,
        ),
        f"par_{m}_fcd_table": md_table(["sampler", "samples from", "FCD", "accuracy"], fcd_rows),
        f"par_{m}_calls_table": md_table(
            ["rows in one call", "ms", "ms per row", "relative to one row"],
            [[int(k), 1000 * v, 1000 * v / int(k), v / one] for k, v in calls.items()],
        ),
        f"par_{m}_test_loss": p["test_loss"],
        f"par_{m}_parameters": f"{p['parameters']:,}",
        f"par_{m}_seeds": p["settings"]["seeds"],
        f"par_{m}_big_batch": p["settings"]["big_batch"],
        f"par_{m}_guidance": p["settings"]["guidance"] if p["conditional"] else "none",
        f"par_{m}_budget": p["budget"],
        f"par_{m}_regime": p["regime"],
        f"par_{m}_anchors": "; ".join(f"{k}: {v}" for k, v in p["anchors"].items()),
    }
    targets = {"ddim": TARGET_DDIM, "ddpm": TARGET_DDPM}
    steps = {"ddim": 100, "ddpm": 1000}
    verdicts, sentences = [], []
    for sampler, goal in targets.items():
        entry = next((e for e in p["samplers"] if e["sampler"] == sampler), None)
        if entry is None:
            verdicts.append(f"{sampler.upper()}-{steps[sampler]}: not measured on this model")
            sentences.append(f"{sampler.upper()}: not measured on this model")
            continue
        r = best[sampler]
        got = 0.0 if r is None else r["speedup_dependent"]
        verdicts.append(
            f"{sampler.upper()}-{entry['steps']}: {got:.1f}x fewer dependent "
            f"evaluations within the budget, against the issue's target of {goal:g}x "
            f"({'met' if got >= goal else 'not met'})"
        )
        sentences.append(
            f"{sampler.upper()}: none within the budget"
            if r is None
            else f"{sampler.upper()} {r['method']} with {got:.1f}x fewer dependent "
            f"evaluations ({r['dependent_evals']:.1f})"
        )
    values[f"par_{m}_targets"] = "; ".join(verdicts)
    values[f"par_{m}_best"] = "; ".join(sentences)
    values[f"par_{m}_split"] = split_sentence(p)
    return values


def split_sentence(p: dict) -> str:
    """What the clean split changed, method by method, from the rows of both splits."""
    parts = []
    for entry in p["samplers"]:
        rows = {r["method"]: r for r in entry["rows"]}
        for name, r in rows.items():
            base = rows.get(name.removesuffix(", clean split"))
            if not name.endswith(", clean split") or base is None:
                continue
            parts.append(
                f"{entry['sampler'].upper()}-{entry['steps']} {base['method']}: "
                f"{base['dependent_evals']:.1f} dependent evaluations on the noise split "
                f"(max deviation {base['deviation']:.1e}), {r['dependent_evals']:.1f} on the "
                f"clean split ({r['deviation']:.1e})"
            )
    return "; ".join(parts) if parts else "not measured"


def keep_other_samplers(path, model, samplers: list[dict]) -> list[dict]:
    """``samplers`` plus the entries of samplers not rerun from an earlier result file of
    the same model (``--samplers ddim`` and ``--samplers ddpm`` can run one after the
    other, or side by side on two cores, into one table), DDIM first."""
    if not path.exists():
        return samplers
    old = read_json(path)
    params = sum(p.numel() for p in model.unet.parameters())
    if old.get("test_loss") != model.meta.get("test_loss") or old.get("parameters") != params:
        return samplers  # another model: its rows do not belong in this table
    done = {e["sampler"] for e in samplers}
    merged = samplers + [e for e in old.get("samplers", []) if e["sampler"] not in done]
    order = {"ddim": 0, "ddpm": 1}
    return sorted(merged, key=lambda e: order.get(e["sampler"], 2))


def revalue(mode, name: str) -> dict:
    """Recompute the section values of an existing result file (no sampling), e.g.
    after the section template gained a value; the measured rows stay as they are."""
    path = out_path(mode, f"diffusion_paradigms-{name}.json")
    payload = read_json(path)  # its provenance (the measuring run) is kept
    payload["section_values"] = section_values(payload)
    payload["revalued"] = provenance(0)
    write_json(path, payload, seed=0)
    return payload


def run(argv: list[str] | None = None, models: tuple[str, ...] | None = None) -> dict:
    args = parse_args(__doc__, argv, samplers=("ddim", "ddpm"), revalue=True)
    mode = args.mode
    results = {}
    if args.revalue:
        return {name: revalue(mode, name) for name in args.models or model_names(mode)}
    for name in models or args.models or model_names(mode):
        cfg = settings(mode, name)
        cfg["methods"] = args.methods
        cfg["samplers"] = tuple(
            s
            for s in cfg["samplers"]
            if s[0].__name__.removesuffix("Chain").lower() in args.samplers
        )
        model = trained_model(name, mode)
        meter, _ = meter_for(name)
        den = model.denoiser()
        scaling = {str(r): network_call_seconds(den, r) for r in (1, 4, 16, 64, 256, 1024)}
        samplers = []
        for chain_type, steps, window, taa_window in cfg["samplers"]:
            chain = chain_type.from_schedule(model.schedule, steps)
            entry = study_sampler(model, chain, window, taa_window, cfg)
            within = [r for r in entry["rows"][1:] if r["meets_budget"]]
            best = min(within, key=lambda r: r["dependent_evals"]) if within else None
            q = {
                "sequential": fcd(model, chain, None, cfg, meter, 1000),
                "sequential (other seeds)": fcd(model, chain, None, cfg, meter, 5000),
            }
            if best is not None:
                _, make, split = candidates(
                    chain, window, taa_window, cfg["full_window_limit"]
                )[best["method"]]
                solved = chain_type.from_schedule(model.schedule, steps, split)
                q[best["method"]] = fcd(model, solved, make(best["atol"]), cfg, meter, 1000)
            entry["fcd"] = {k: {"fcd": v[0], "accuracy": v[1]} for k, v in q.items()}
            entry["best"] = None if best is None else best["method"]
            samplers.append(entry)
        path = out_path(mode, f"diffusion_paradigms-{name}.json")
        samplers = keep_other_samplers(path, model, samplers)
        payload = {
            "model": name,
            "budget": BUDGET,
            "conditional": bool(model.num_classes),
            "test_loss": model.meta.get("test_loss"),
            "parameters": sum(p.numel() for p in model.unet.parameters()),
            "network_call_seconds": scaling,
            "samplers": samplers,
            "settings": {
                k: (v if k != "samplers" else [(c.__name__, *rest) for c, *rest in v])
                for k, v in cfg.items()
            },
            "regime": "CPU, 1 torch thread, float32, machine shared with other jobs",
            "anchors": {
                "ParaDiGMS SD DDPM-1000": "2040 evaluations in 44 parallel iterations",
                "ParaDiGMS SD DDIM-200": "425 evaluations in 16 parallel iterations",
                "ParaTAA SD DDIM-100": "matches the sequential image in 7 iterations",
            },
        }
        payload["section_values"] = section_values(payload)
        write_json(path, payload, seed=0)
        results[name] = payload
    return results


if __name__ == "__main__":
    run()

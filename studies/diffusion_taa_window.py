"""ParaTAA's window on the DDPM chain: dependent calls, total rows and wall-clock.

Triangular Anderson (m = 3, ridge 1e-3) on the Picard form of ancestral DDPM (clean split,
noise drawn in advance, guidance ``diffusion_common.GUIDANCE``) at one tolerance, for
windows from ParaDiGMS's 80 to the whole chain: how many dependent network calls, how
many rows through the network, the CPU wall-clock at batch 1 and the deviation from the
sequential sample.  It is the measurement behind ``diffusion_paradigms``' choice of
ParaTAA's DDPM window.  Full mode: the MNIST model, DDPM-1000; fast mode: the digits
model, DDPM-100.  Writes ``diffusion_taa_window-<model>.json``.

    python -m studies.diffusion_taa_window --mode fast|full [--models mnist]
"""

from __future__ import annotations

import time

import torch

import fixedpoint as fp
from fixedpoint.diffusion import DDPMChain, PicardMap, sample_loop, solve_chain
from fixedpoint.diffusion.chain import Split

from .common import write_json
from .diffusion_common import GUIDANCE, final_error, md_table, out_path, parse_args, trained_model

ATOL = 5e-4


def settings(mode) -> dict:
    if mode.name == "full":
        return dict(steps=1000, windows=(80, 160, 250, 400, 600, 1000), model="mnist")
    return dict(steps=100, windows=(8, 16, 32, 64, 100), model="digits")


def measure(model, steps: int, windows, seed: int = 0) -> dict:
    chain = DDPMChain.from_schedule(model.schedule, steps, Split.CLEAN)
    den = model.denoiser()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, *model.sample_shape, generator=g)
    noise = torch.randn(1, steps, *model.sample_shape, generator=g)
    labels = torch.tensor([seed % model.num_classes]) if model.num_classes else None
    guidance = GUIDANCE if model.num_classes else None
    start = time.perf_counter()
    exact = sample_loop(chain, den, x, noise, labels=labels, guidance=guidance, trajectory=True)
    sequential = time.perf_counter() - start
    rows = []
    for w in windows:
        print(f"[taa window] W={w}", flush=True)
        method = fp.TriangularAnderson(
            memory=3, ridge=1e-3, atol=ATOL, rtol=0.0, window_width=min(w, steps)
        )
        fmap = PicardMap(chain, den, x, noise, labels=labels, guidance=guidance)
        start = time.perf_counter()
        out = solve_chain(fmap, method)
        rows.append(
            {
                "window": min(w, steps),
                "dependent_calls": out.network.calls,
                "rows": out.network.rows,
                "seconds": time.perf_counter() - start,
                "deviation": final_error(out.result.x, exact),
                "status": out.result.status.name,
            }
        )
    return {"steps": steps, "sequential_seconds": sequential, "rows": rows}


def section_values(p: dict) -> dict:
    m = p["model"]
    table = md_table(
        ["window", "dependent calls", "speed-up (dependent)", "network rows", "s", "deviation"],
        [
            [
                r["window"],
                r["dependent_calls"],
                p["steps"] / r["dependent_calls"],
                r["rows"],
                r["seconds"],
                f"{r['deviation']:.1e}",
            ]
            for r in p["rows"]
        ],
    )
    return {
        f"taaw_{m}_table": table,
        f"taaw_{m}_atol": p["atol"],
        f"taaw_{m}_steps": p["steps"],
        f"taaw_{m}_sequential_seconds": p["sequential_seconds"],
        f"taaw_{m}_regime": p["regime"],
    }


def run(argv: list[str] | None = None) -> dict:
    args = parse_args(__doc__, argv)
    mode = args.mode
    cfg = settings(mode)
    name = (args.models or (cfg["model"],))[0]
    torch.set_num_threads(1)
    model = trained_model(name, mode)
    payload = {
        "model": name,
        "atol": ATOL,
        **measure(model, cfg["steps"], cfg["windows"]),
        "regime": "CPU, 1 torch thread, batch 1, float32, seed 0, clean split, "
        "machine shared with other jobs",
    }
    payload["section_values"] = section_values(payload)
    write_json(out_path(mode, f"diffusion_taa_window-{name}.json"), payload, seed=0)
    return payload


if __name__ == "__main__":
    run()

"""Study 4: window size against iterations, total evaluations and wall-clock.

Sliding-window Picard (ParaDiGMS's method) on the trained digits model, DDIM-100 and
DDPM-1000 in full mode, for window sizes from 1 (sequential) to the whole chain
(Picard-Jacobi), at a fixed tolerance: dependent network calls, rows through the network
per sample, wall-clock at batch 1 (CPU, one thread) and the deviation from the
sequential sampler; with the measured time of one network call on ``rows`` rows, which
explains the wall-clock.  Writes ``diffusion_window.json`` and ``diffusion_window.png``.

    python -m studies.diffusion_window --mode fast|full
"""

from __future__ import annotations

import time

import torch

import fixedpoint as fp
from fixedpoint.diffusion import DDIMChain, DDPMChain, PicardMap, sample_loop, solve_chain
from fixedpoint.diffusion.diagnostics import network_call_seconds

from .common import save_figure, write_json
from .diffusion_common import GUIDANCE, final_error, md_table, out_path, parse, trained_model

ATOL = 1e-4


def run(argv: list[str] | None = None) -> dict:
    mode = parse(__doc__, argv)
    full = mode.name == "full"
    model = trained_model("digits", mode)
    den = model.denoiser()
    configs = [(DDIMChain, 100), (DDPMChain, 1000)] if full else [(DDIMChain, 20), (DDPMChain, 100)]
    out = {}
    g = torch.Generator().manual_seed(0)
    for chain_type, n in configs:
        chain = chain_type.from_schedule(model.schedule, n)
        x = torch.randn(1, *model.sample_shape, generator=g)
        noise = torch.randn(1, n, *model.sample_shape, generator=g) if chain.stochastic else None
        labels = torch.tensor([7])
        start = time.perf_counter()
        exact = sample_loop(
            chain, den, x, noise, labels=labels, guidance=GUIDANCE, trajectory=True
        )
        seq_time = time.perf_counter() - start
        widths = sorted({w for w in (1, 5, 20, 80, 320, n) if w <= n})
        rows = []
        for w in widths:
            fmap = PicardMap(chain, den, x, noise, labels=labels, guidance=GUIDANCE)
            start = time.perf_counter()
            res = solve_chain(fmap, fp.SlidingWindow(w, atol=ATOL, rtol=0.0))
            sec = time.perf_counter() - start
            rows.append(
                {
                    "window": w,
                    "iterations": res.result.iterations,
                    "calls": res.network.calls,
                    "rows_per_sample": res.network.rows,
                    "seconds": sec,
                    "deviation": final_error(res.result.x, exact),
                    "call_seconds": network_call_seconds(den, w, repeats=3),
                }
            )
        out[f"{chain.name}-{n}"] = {"sequential_seconds": seq_time, "rows": rows}
    payload = {
        "atol": ATOL,
        "results": out,
        "regime": f"CPU, 1 thread, batch 1, float32, guidance {GUIDANCE:g} (class 7); "
        "machine shared with other jobs",
    }
    payload["section_values"] = section_values(payload)
    write_json(out_path(mode, "diffusion_window.json"), payload, seed=0)
    plot(payload, mode)
    return payload


def section_values(p: dict) -> dict:
    rows = []
    for key, r in p["results"].items():
        for row in r["rows"]:
            rows.append(
                [
                    key,
                    row["window"],
                    row["iterations"],
                    row["calls"],
                    row["rows_per_sample"],
                    row["seconds"],
                    r["sequential_seconds"] / row["seconds"],
                    f"{row['deviation']:.1e}",
                    1000 * row["call_seconds"],
                ]
            )
    return {
        "win_table": md_table(
            [
                "sampler",
                "window",
                "iterations",
                "dependent calls",
                "rows / sample",
                "s",
                "speed-up vs sequential",
                "deviation",
                "ms per call of W rows",
            ],
            rows,
        ),
        "win_atol": p["atol"],
        "win_regime": p["regime"],
    }


def plot(payload, mode) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for key, r in payload["results"].items():
        ws = [row["window"] for row in r["rows"]]
        axes[0].loglog(ws, [row["calls"] for row in r["rows"]], "o-", label=key)
        axes[1].loglog(ws, [row["rows_per_sample"] for row in r["rows"]], "o-", label=key)
        axes[2].loglog(ws, [row["seconds"] for row in r["rows"]], "o-", label=f"{key}")
        axes[2].axhline(r["sequential_seconds"], ls=":", lw=0.8)
    for ax, label in zip(
        axes, ("dependent network calls", "network rows per sample", "wall-clock, batch 1 (s)")
    ):
        ax.set_xlabel("window W")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    save_figure(fig, out_path(mode, "diffusion_window.png"))
    plt.close(fig)


if __name__ == "__main__":
    run()

"""Study 3: convergence per method, and the (iteration x step) wavefront.

On the trained digits model (DDIM-100 and DDPM-200 in full mode, each method capped at
40 iterations) and on an exact-score
mixture, every method's error against the sequential sampler after each iteration (the
final sample's error), and for Jacobi on both forms the error of every step after every
iteration: the Markov form shows the wavefront (exactness advancing one step per
iteration), the Picard form converges everywhere at once.  Writes
``diffusion_convergence.json`` and ``diffusion_convergence.png``.

    python -m studies.diffusion_convergence --mode fast|full
"""

from __future__ import annotations

import torch

import fixedpoint as fp
from fixedpoint.diffusion import (
    DDIMChain,
    DDPMChain,
    GaussianMixture,
    MarkovMap,
    MixtureDenoiser,
    NoiseSchedule,
    PicardMap,
    sample_loop,
    solve_chain,
)
from fixedpoint.diffusion.diagnostics import RecordingMap, error_by_step

from .common import save_figure, write_json
from .diffusion_common import GUIDANCE, md_table, out_path, parse, trained_model

EXACT = dict(atol=0.0, rtol=0.0)


def methods(steps: int, window: int, cap: int) -> dict:
    """Every method run for at most ``cap`` iterations: the curves are what is wanted."""
    blocks = max(2, steps // window)
    return {
        "Jacobi, Markov form": (MarkovMap, fp.Jacobi(**EXACT, max_iter=cap)),
        "Picard (Jacobi)": (PicardMap, fp.Jacobi(**EXACT, max_iter=cap)),
        f"sliding window W={window} (Picard)": (
            PicardMap,
            fp.SlidingWindow(window, **EXACT, max_iter=cap),
        ),
        f"block Picard ({blocks} blocks)": (
            PicardMap,
            fp.GSJacobi(modules=blocks, **EXACT, max_iter=max(1, cap // blocks)),
        ),
        "triangular Anderson (Picard)": (
            PicardMap,
            fp.TriangularAnderson(memory=2, ridge=1e-3, **EXACT, max_iter=cap),
        ),
    }


def curves(den, chain, x, noise, labels, window, cap, guidance=None) -> dict:
    exact = sample_loop(
        chain, den, x, noise, labels=labels, guidance=guidance, trajectory=True
    )
    out = {}
    for name, (form, method) in methods(len(chain), window, cap).items():
        rec = RecordingMap(form(chain, den, x, noise, labels=labels, guidance=guidance))
        res = solve_chain(rec, method)
        grid = error_by_step(rec.iterates, res.result.x, exact)
        out[name] = {
            "final_error": grid[:, -1].tolist()[: cap + 1],
            "iterations": res.result.iterations,
            "dependent_steps": res.result.dependent_steps,
        }
        if name in ("Jacobi, Markov form", "Picard (Jacobi)"):
            out[name]["wavefront"] = grid[: cap + 1].clamp(min=1e-12).log10().tolist()
    return out


def run(argv: list[str] | None = None) -> dict:
    mode = parse(__doc__, argv)
    full = mode.name == "full"
    steps = (100, 200) if full else (20, 50)
    cap = 40 if full else 20
    model = trained_model("digits", mode)
    den = model.denoiser()
    g = torch.Generator().manual_seed(0)
    results = {}
    for chain_type, n in zip((DDIMChain, DDPMChain), steps):
        chain = chain_type.from_schedule(model.schedule, n)
        x = torch.randn(1, *model.sample_shape, generator=g)
        noise = torch.randn(1, n, *model.sample_shape, generator=g) if chain.stochastic else None
        window = 20
        results[f"digits {chain.name}-{n}"] = curves(
            den, chain, x, noise, torch.tensor([3]), window, cap, GUIDANCE
        )
    schedule = NoiseSchedule.default()
    mixture = GaussianMixture.random(256, components=8, seed=0)
    mden = MixtureDenoiser(mixture, schedule.alphas_cumprod)
    chain = DDIMChain.from_schedule(schedule, steps[0])
    x = torch.randn(1, 256, generator=g, dtype=torch.float64)
    results[f"mixture d=256 ddim-{steps[0]}"] = curves(mden, chain, x, None, None, 20, cap)
    payload = {
        "cap": cap,
        "results": results,
        "regime": f"CPU, 1 thread; float32 (digits UNet, class 3, guidance {GUIDANCE:g}), "
        "float64 (mixture)",
    }
    payload["section_values"] = section_values(payload)
    write_json(out_path(mode, "diffusion_convergence.json"), payload, seed=0)
    plot(payload, mode)
    return payload


def section_values(p: dict) -> dict:
    """Iterations each method needs to bring the final sample within 1e-3, per case."""
    cases = list(p["results"])
    names = list(p["results"][cases[0]])
    rows = []
    for name in names:
        row = [name.split(" (")[0] if name.startswith("block Picard") else name]
        for case in cases:
            # block Picard's name carries its block count, which differs per case
            same = [k for k in p["results"][case] if k.split(" (")[0] == name.split(" (")[0]]
            errs = p["results"][case][same[0]]["final_error"] if same else []
            hit = next((k for k, e in enumerate(errs) if e <= 1e-3), None)
            row.append(f"> {len(errs) - 1}" if hit is None else hit)
        rows.append(row)
    return {
        "conv_table": md_table(["method", *cases], rows),
        "conv_cap": p["cap"],
        "conv_regime": p["regime"],
    }


def plot(payload, mode) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = payload["results"]
    keys = list(results)
    fig, axes = plt.subplots(2, len(keys), figsize=(5 * len(keys), 8.5))
    for j, key in enumerate(keys):
        ax = axes[0, j]
        for name, r in results[key].items():
            errs = [max(e, 1e-12) for e in r["final_error"]]
            ax.semilogy(range(len(errs)), errs, label=name)
        ax.axhline(1e-3, color="k", ls=":", lw=0.8)
        ax.set_title(key)
        ax.set_xlabel("iteration")
        ax.set_ylabel("max error of the final sample")
        ax.legend(fontsize=7)
        ax = axes[1, j]
        markov = torch.tensor(results[key]["Jacobi, Markov form"]["wavefront"])
        picard = torch.tensor(results[key]["Picard (Jacobi)"]["wavefront"])
        rows = min(len(markov), len(picard))
        both = torch.cat([markov[:rows], torch.full((rows, 2), float("nan")), picard[:rows]], 1)
        im = ax.imshow(both.numpy(), aspect="auto", cmap="viridis", vmin=-8, vmax=1)
        ax.set_title("log10 error: Markov Jacobi | Picard")
        ax.set_xlabel("step (left block: Markov form, right block: Picard form)")
        ax.set_ylabel("iteration")
        fig.colorbar(im, ax=ax)
    save_figure(fig, out_path(mode, "diffusion_convergence.png"))
    plt.close(fig)


if __name__ == "__main__":
    run()

"""Figures 2 and 3: pure-Jacobi convergence per block, GS-Jacobi convergence per module.

For every model: the sequential samples are the reference; every block is then solved
by Jacobi from the noise start with exact termination (``atol = rtol = 0``: finite
termination makes it exact after at most T - 1 iterations) and traced against the
reference, and once more with the default tolerance (stop at the rounding level of the
iterate) to count its iterations.  Plotted per block and
iteration: the true error max |x_k - x_seq| (not the change between iterates) and the
residual max |x_k - x_{k-1}|.  Then the block that needs the most iterations is solved
with GS-Jacobi modules and traced per module.

    python -m studies.convergence --mode fast
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import fixedpoint as fp  # noqa: E402
from fixedpoint.tarflow import BlockInverse  # noqa: E402

from .common import Mode, save_figure, study_main, write_json  # noqa: E402
from .lib import BUDGET, GUIDANCE, SEED, TOL, noise, per_block, sample, sequential_strategy, trained  # noqa: E402

BATCH = {"fast": 8, "full": 64}
MODULES = 4


def first_below(values: list[float], level: float) -> int | None:
    """1-based index of the first value <= level (None if never)."""
    return next((i + 1 for i, v in enumerate(values) if v <= level), None)


def block_curves(result: fp.Result) -> dict[str, list[float]]:
    rows = result.trace or ()
    return {
        "error": [float(r.error.max()) for r in rows],
        "residual": [float(r.residual.max()) for r in rows],
        "module": [r.module for r in rows],
    }


# Absolute tolerances tried per method on the tough block; None is the default tolerance.
SWEEP = (1e-3, 1e-4, 1e-5, 1e-6, 0.0, None)
SWEEP_BATCH = 16


def compare_on_block(model, reference, y, block: int) -> list[dict]:
    """Every method on one block: the fewest dependent steps that meet the error budget.

    The block's input is taken from the sequential trajectory (first ``SWEEP_BATCH``
    samples); each method runs at every tolerance of ``SWEEP`` and the cheapest run
    whose max error against the sequential solution is within ``BUDGET`` is kept.
    An update tolerance is not an error bound (on a tough block a small update can hide
    a large error), so the budget is checked against the true error.
    """
    from .auto_strategy import block_inputs

    n = SWEEP_BATCH
    zp = block_inputs(model, reference)[block][:n]
    target = reference.blocks[block].x[:n]
    fmap = BlockInverse(model, block, zp, None if y is None else y[:n], guidance=GUIDANCE)
    T = model.config.seq_len
    makers = {
        "Jacobi": lambda tol: fp.Jacobi(atol=tol),
        "TriangularAnderson": lambda tol: fp.TriangularAnderson(atol=tol),
        "Anderson": lambda tol: fp.Anderson(atol=tol, max_iter=2 * T),
        **{f"GSJacobi(modules={g})": (lambda tol, g=g: fp.GSJacobi(modules=g, atol=tol))
           for g in (2, 4, 8) if g < T},
    }
    rows = []
    for name, make in makers.items():
        best = None
        for tol in SWEEP:
            r = fp.solve(fmap, zp, make(tol))
            err = float((r.x - target).abs().max())
            if r.status.name == "SUCCESS" and err <= BUDGET and (
                    best is None or r.dependent_steps < best["dependent_steps"]):
                best = {"method": make(tol).describe(), "status": r.status.name,
                        "dependent_steps": r.dependent_steps, "token_evals": r.token_evals,
                        "error": err, "tol": tol}
        rows.append(best or {"method": name, "status": "NO RUN WITHIN BUDGET",
                             "dependent_steps": None, "token_evals": None, "error": None,
                             "tol": None})
    return rows


def run_model(preset: str, mode: Mode) -> dict:
    t = trained(preset, mode)
    model, c = t.model, t.model.config
    z, y = noise(model, BATCH[mode.name])
    reference = sample(model, z, y, sequential_strategy(c.blocks))
    exact = fp.Jacobi(atol=0.0, rtol=0.0)
    jacobi = sample(model, z, y, per_block([exact] * c.blocks), reference=reference,
                    trace=True)
    default = sample(model, z, y, per_block([fp.Jacobi()] * c.blocks))
    curves = [block_curves(r) for r in jacobi.blocks]
    to_budget = [first_below(cv["error"], BUDGET) for cv in curves]
    tough = max(range(c.blocks), key=lambda k: to_budget[k] or c.seq_len)

    methods = [exact] * c.blocks
    methods[tough] = fp.GSJacobi(modules=MODULES, atol=TOL)
    gs = sample(model, z, y, per_block(methods), reference=reference, trace=True)
    gs_curve = block_curves(gs.blocks[tough])
    tough_table = compare_on_block(model, reference, y, tough)

    out = {
        "preset": preset, "seq_len": c.seq_len, "blocks": c.blocks, "batch": len(z),
        "jacobi": curves, "iterations_to_budget": to_budget, "budget": BUDGET,
        "tough_block": tough, "gs_modules": MODULES, "gs_curve": gs_curve,
        "gs_module_iterations": list(gs.blocks[tough].module_iterations),
        "gs_tol": TOL, "tough_block_methods": tough_table, "sweep": list(SWEEP),
        "sweep_batch": SWEEP_BATCH,
        "default_iterations": [r.iterations for r in default.blocks],
        "default_dependent_steps": sum(r.dependent_steps for r in default.blocks),
        "default_max_deviation": float((default.x - reference.x).abs().max()),
    }
    write_json(mode.out_dir / f"convergence-{preset}.json", out, seed=SEED)
    plot(out, mode)
    return out


def plot(out: dict, mode: Mode) -> None:
    preset, T = out["preset"], out["seq_len"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for k, cv in enumerate(out["jacobi"]):
        its = range(1, len(cv["error"]) + 1)
        axes[0].semilogy(its, [max(e, 1e-12) for e in cv["error"]], label=f"block {k}")
        axes[1].semilogy(its, [max(r, 1e-12) for r in cv["residual"]], label=f"block {k}")
    for ax, what in zip(axes[:2], ("error vs sequential", "residual |x_k - x_(k-1)|"),
                        strict=True):
        ax.axhline(out["budget"], color="grey", ls=":", lw=1)
        ax.set(xlabel="Jacobi iteration", ylabel=f"max {what}", yscale="log",
               title=f"{preset} (T={T}): {what}")
        ax.legend(fontsize=8)
    cv = out["gs_curve"]
    starts = [i for i, m in enumerate(cv["module"]) if i == 0 or cv["module"][i - 1] != m]
    axes[2].semilogy(range(1, len(cv["error"]) + 1), [max(e, 1e-12) for e in cv["error"]])
    for s in starts:
        axes[2].axvline(s + 0.5, color="grey", lw=0.5)
    axes[2].set(xlabel="iteration (all modules in order)", ylabel="max error vs sequential",
                title=f"block {out['tough_block']}: GS-Jacobi, {out['gs_modules']} modules, "
                      f"tol {out['gs_tol']:g}")
    fig.tight_layout()
    save_figure(fig, mode.out_dir / f"convergence-{preset}.png")
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    study_main(__doc__, run_model, "convergence", argv)


if __name__ == "__main__":
    main()

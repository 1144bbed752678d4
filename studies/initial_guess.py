"""Figure 7: Jacobi from the noise start, from zeros after the first position, and by IGM.

    python -m studies.initial_guess --mode fast
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import fixedpoint as fp  # noqa: E402
from fixedpoint.quality import QualityMeter, deviation  # noqa: E402
from fixedpoint.tarflow import BlockMetrics, InitialGuess  # noqa: E402

from .common import CACHE, Mode, read_json, save_figure, study_main, write_json  # noqa: E402
from .lib import (  # noqa: E402
    SEED,
    noise,
    per_block,
    sample,
    sequential_strategy,
    totals,
    trained,
)


def initial_guess_study(preset: str, mode: Mode) -> dict:
    t = trained(preset, mode)
    model, c = t.model, t.model.config
    table = [BlockMetrics(**r) for r in read_json(mode.out_dir / f"crm_igm-{preset}.json")["table"]]
    igm = [InitialGuess.ZEROS_AFTER_FIRST if r.igm_sample_zeros < r.igm_sample_noise
           else InitialGuess.NOISE for r in table]
    z, y = noise(model, mode.eval_batch)
    ref = sample(model, z, y, sequential_strategy(c.blocks), denoise=True)
    meter = QualityMeter.for_dataset(t.data, cache_dir=CACHE / "classifiers")
    # A fixed cap, so the start matters: half the finite-termination bound.
    cap = max(1, c.seq_len // 4)
    variants = {"noise z": [InitialGuess.NOISE] * c.blocks,
                "zeros after first": [InitialGuess.ZEROS_AFTER_FIRST] * c.blocks,
                "IGM choice": igm}
    out = {"preset": preset, "cap": cap, "variants": {}}
    fig, axes = plt.subplots(1, c.blocks, figsize=(3.2 * c.blocks, 3), squeeze=False)
    for name, inits in variants.items():
        capped = fp.Jacobi(atol=0.0, rtol=0.0, max_iter=cap)  # exact tolerance: the cap rules
        s = sample(model, z, y, per_block([capped] * c.blocks, inits),
                   reference=ref, trace=True, denoise=True)
        curves = [[float(r.error.max()) for r in b.trace] for b in s.blocks]
        out["variants"][name] = {
            "inits": [i.value for i in inits], "curves": curves, **totals(s),
            "deviation": deviation(s.x, ref.x), "fcd": meter.frechet(s.x),
            "finite": bool(torch.isfinite(s.x).all()),
        }
        for k in range(c.blocks):
            axes[0, k].semilogy(range(1, len(curves[k]) + 1),
                                [max(e, 1e-12) for e in curves[k]], label=name)
    for k in range(c.blocks):
        axes[0, k].set(title=f"block {k}", xlabel="Jacobi iteration",
                       ylabel="max error vs sequential")
        axes[0, k].legend(fontsize=7)
    fig.suptitle(f"{preset}: initial guesses (Jacobi capped at {cap} iterations)")
    fig.tight_layout()
    save_figure(fig, mode.out_dir / f"initial_guess-{preset}.png")
    plt.close(fig)
    write_json(mode.out_dir / f"initial_guess-{preset}.json", out, seed=SEED)
    return out


def main(argv: list[str] | None = None) -> None:
    study_main(__doc__, initial_guess_study, "initial_guess", argv)


if __name__ == "__main__":
    main()

"""Figure 5: sequential samples beside paper-rule GS-Jacobi samples from the same noise.

    python -m studies.samples --mode fast
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fixedpoint.tarflow import BlockMetrics  # noqa: E402

from .common import Mode, read_json, save_figure, study_main  # noqa: E402
from .crm_igm import paper_rule  # noqa: E402
from .lib import (  # noqa: E402
    noise,
    sample,
    sequential_strategy,
    trained,
)
from .trace import show  # noqa: E402

SHOW = 8  # samples shown


def samples_figure(preset: str, mode: Mode) -> None:
    t = trained(preset, mode)
    model, c = t.model, t.model.config
    table = [BlockMetrics(**r) for r in read_json(mode.out_dir / f"crm_igm-{preset}.json")["table"]]
    strategy = paper_rule(table, c.seq_len)
    z, y = noise(model, SHOW)
    seq = sample(model, z, y, sequential_strategy(c.blocks), denoise=True)
    gs = sample(model, z, y, strategy, denoise=True)
    fig, axes = plt.subplots(3, SHOW, figsize=(1.3 * SHOW, 4.2))
    diff = (gs.x - seq.x).abs()
    for i in range(SHOW):
        show(axes[0, i], seq.x[i])
        show(axes[1, i], gs.x[i])
        axes[2, i].imshow(diff[i, 0].numpy(), cmap="magma", vmin=0, vmax=max(float(diff.max()),
                                                                               1e-12))
        axes[2, i].set_xticks([])
        axes[2, i].set_yticks([])
    axes[0, 0].set_ylabel("sequential", fontsize=8)
    axes[1, 0].set_ylabel("GS-Jacobi", fontsize=8)
    axes[2, 0].set_ylabel("|difference|", fontsize=8)
    fig.suptitle(f"{preset}: sequential vs paper-rule strategy {strategy.to_spec() or ''} "
                 f"(max |diff| {float(diff.max()):.1e})", fontsize=9)
    save_figure(fig, mode.out_dir / f"samples-{preset}.png")
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    study_main(__doc__, samples_figure, "samples", argv)


if __name__ == "__main__":
    main()

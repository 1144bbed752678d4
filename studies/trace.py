"""Figure 1: the sampling trace: noise, the image after each inverted block, denoised.

    python -m studies.trace --mode fast
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from .common import Mode, save_figure, study_main  # noqa: E402
from .lib import (  # noqa: E402
    noise,
    sample,
    sequential_strategy,
    trained,
)


def show(ax, img: torch.Tensor, title: str | None = None) -> None:
    ax.imshow(img[0].clamp(-1, 1).numpy(), cmap="gray", vmin=-1, vmax=1)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=8)


def trace_figure(preset: str, mode: Mode) -> None:
    t = trained(preset, mode)
    model = t.model
    z, y = noise(model, 4)
    s = sample(model, z, y, sequential_strategy(model.config.blocks), denoise=True)
    K = model.config.blocks
    titles = ["noise"] + [f"after block {k}" for k in reversed(range(K))] + ["denoised"]
    fig, axes = plt.subplots(len(z), len(titles), figsize=(1.4 * len(titles), 1.5 * len(z)))
    for i in range(len(z)):
        for j, img in enumerate(s.intermediates):
            show(axes[i, j], img[i], titles[j] if i == 0 else None)
    fig.suptitle(f"{preset}: sampling trace (sequential, guidance, labels {y.tolist()})")
    save_figure(fig, mode.out_dir / f"trace-{preset}.png")
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    study_main(__doc__, trace_figure, "trace", argv)


if __name__ == "__main__":
    main()

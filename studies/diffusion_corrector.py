"""Chen et al.'s parallel corrector on exact-score mixtures: distribution error vs cost.

The probability-flow variant of Chen, Ren, Ying and Rotskoff (2024) follows each outer
block of block Picard (the predictor) with a short underdamped Langevin run at the
block's end noise level (the corrector), itself solved by Picard iterations
(:func:`fixedpoint.diffusion.predictor_corrector`).  On Gaussian mixtures with an exact
score in ``d = 2 .. 1024`` (fast mode: fewer, smaller), for DDIM this measures the
distribution error of the final samples against the true mixture versus the total
dependent network evaluations, for

* the sequential sampler with ``N`` steps, several ``N`` (cost ``N``);
* block Picard on ``N_bp`` steps in ``B`` blocks, ``K`` Picard sweeps per block, without
  the corrector (cost ``B K``) and with it (``M`` Langevin steps after each of the
  ``B - 1`` inner block ends, ``K_c`` Picard sweeps each: cost ``B K + (B - 1) K_c``);
* the sequential predictor-corrector (both parts solved exactly, step by step).

**The error.** The sliced 2-Wasserstein distance between the samples and exact samples
of the mixture (many more of them, so the reference adds little noise), averaged over
fixed random directions.  Chosen over mean-and-covariance errors because it sees what a
sampler gets wrong on a mixture, the mode weights and the spread inside each mode, at a
cost linear in ``d``; a covariance estimate in ``d = 1024`` from a thousand samples would
be mostly its own sampling noise, and its Frobenius norm is dominated by the separation
of the modes, not their width.  Its own finite-sample floor is measured too: the same
distance for independent *exact* sample sets of the same size (mean and spread over a
few draws); differences smaller than that spread are not resolved.  All configurations
at one dimension share the starting noise, the corrector noise and the directions
(common random numbers), so their differences are less noisy than the floor.

    python -m studies.diffusion_corrector --mode fast|full
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

import fixedpoint as fp
from fixedpoint.diffusion import (
    DDIMChain,
    GaussianMixture,
    MixtureDenoiser,
    NoiseSchedule,
    predictor_corrector,
)

from .common import save_figure, write_json
from .diffusion_common import md_table, out_path, parse

REFERENCE_FACTOR = 10  # exact reference samples per sampler sample
FLOOR_DRAWS = 4


@dataclass(frozen=True)
class Config:
    dims: tuple[int, ...]
    samples: int
    sequential_steps: tuple[int, ...]  # N of the plain sequential sampler
    steps: int  # N of the block-Picard runs
    blocks: int
    iterations: tuple[int, ...]  # K per block
    corrector_steps: int  # M
    corrector_iterations: int  # K_c
    step_size: float
    friction: float
    directions: int


FULL = Config(
    dims=(2, 8, 32, 128, 512, 1024),
    samples=1000,
    sequential_steps=(4, 8, 16, 32),
    steps=32,
    blocks=4,
    iterations=(1, 2, 3, 4),
    corrector_steps=4,
    corrector_iterations=2,
    step_size=0.25,
    friction=2.0,
    directions=128,
)
FAST = Config(
    dims=(2, 16),
    samples=200,
    sequential_steps=(4, 16),
    steps=16,
    blocks=4,
    iterations=(1, 2, 4),
    corrector_steps=3,
    corrector_iterations=2,
    step_size=0.25,
    friction=2.0,
    directions=32,
)


class FastMixtureDenoiser(MixtureDenoiser):
    """The same exact noise prediction (unconditional), by matrix products, in chunks.

    ``|x - a mu_k|^2 = |x|^2 - 2 a x.mu_k + a^2 |mu_k|^2`` and the score
    ``-sum_k r_k (x - a mu_k) / v_k`` need two ``(R, d) x (d, K)`` products instead of
    the ``(R, K, d)`` tensor of :meth:`GaussianMixture.eps`: tens of times faster at
    ``d = 1024``, and chunking the rows bounds the memory of a whole Picard block.  Equal
    to the reference to rounding (tested).
    """

    CHUNK = 8192

    def __init__(self, mixture: GaussianMixture, alphas_cumprod: Tensor):
        super().__init__(mixture, alphas_cumprod)
        self.means = mixture.means.double()
        self.norms = (self.means**2).sum(1)
        self.var0 = mixture.stds.double() ** 2
        self.logw = mixture.weights.double().log()

    def __call__(self, x: Tensor, timesteps: Tensor, labels: Tensor | None = None) -> Tensor:
        if labels is not None and not bool((labels == self.null_label).all()):
            raise ValueError("FastMixtureDenoiser is unconditional")
        flat = x.flatten(1)
        abar = self.alphas_cumprod[timesteps.long().cpu()].to(flat.device)
        out = torch.empty_like(flat)
        for lo in range(0, flat.shape[0], self.CHUNK):
            hi = lo + self.CHUNK
            out[lo:hi] = self._eps(flat[lo:hi].double(), abar[lo:hi, None]).to(x.dtype)
        return out.reshape(x.shape)

    def _eps(self, x: Tensor, a: Tensor) -> Tensor:
        root = a.sqrt()
        var = a * self.var0[None] + (1 - a)  # (R, K)
        sq = (x**2).sum(1, keepdim=True) - 2 * root * (x @ self.means.T) + a * self.norms[None]
        logp = self.logw[None] - 0.5 * sq / var - 0.5 * x.shape[1] * var.log()
        r = torch.softmax(logp, 1) / var
        score = root * (r @ self.means) - x * r.sum(1, keepdim=True)
        return -(1 - a).sqrt() * score


def directions(dim: int, count: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(dim, count, generator=g, dtype=torch.float64)
    return u / u.norm(dim=0, keepdim=True)


def sliced_w2(samples: Tensor, reference: Tensor, dirs: Tensor) -> float:
    """Sliced 2-Wasserstein distance; the larger ``reference`` is read at the samples'
    quantile levels ``(i + 1/2) / n``."""
    a, _ = (samples.double() @ dirs).sort(0)
    b, _ = (reference.double() @ dirs).sort(0)
    n, m = a.shape[0], b.shape[0]
    idx = ((torch.arange(n, dtype=torch.float64) + 0.5) * m / n).long().clamp(max=m - 1)
    return float(((a - b[idx]) ** 2).mean().sqrt())


def measure(dim: int, cfg: Config, seed: int = 0) -> dict[str, object]:
    schedule = NoiseSchedule.default()
    mixture = GaussianMixture.random(dim, components=8, seed=seed)
    den = FastMixtureDenoiser(mixture, schedule.alphas_cumprod)
    n = cfg.samples
    g = torch.Generator().manual_seed(1000 + seed)
    reference, _ = mixture.sample(REFERENCE_FACTOR * n, generator=g)
    dirs = directions(dim, cfg.directions, seed + 7)
    floors = [
        sliced_w2(mixture.sample(n, generator=g)[0], reference, dirs) for _ in range(FLOOR_DRAWS)
    ]
    x = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    rows: list[dict[str, object]] = []

    def run(label: str, family: str, steps: int, **kw) -> None:
        chain = DDIMChain.from_schedule(schedule, steps)
        out = predictor_corrector(
            chain,
            den,
            x,
            step_size=cfg.step_size,
            friction=cfg.friction,
            generator=torch.Generator().manual_seed(seed + 2),
            **kw,
        )
        rows.append(
            {
                "label": label,
                "family": family,
                "steps": steps,
                "blocks": kw["blocks"],
                "iterations": kw.get("iterations"),
                "corrector_steps": kw["corrector_steps"],
                "network_calls": out.network_calls,
                "network_rows": out.network_rows,
                "predictor_calls": out.cost("predictor")["network_calls"],
                "corrector_calls": out.cost("corrector")["network_calls"],
                "sw2": sliced_w2(out.sample, reference, dirs),
            }
        )

    seq = fp.Sequential()
    for steps in sorted({*cfg.sequential_steps, cfg.steps}):  # N = steps: the baseline
        run(
            f"sequential N={steps}", "sequential", steps, blocks=1, corrector_steps=0, predictor=seq
        )
    corrected = " + corrector"
    run(
        f"sequential N={cfg.steps}{corrected}",
        f"sequential{corrected}",
        cfg.steps,
        blocks=cfg.blocks,
        corrector_steps=cfg.corrector_steps,
        predictor=seq,
        corrector=seq,
    )
    with_corrector = dict(
        corrector_steps=cfg.corrector_steps, corrector_iterations=cfg.corrector_iterations
    )
    for k in cfg.iterations:  # per K: without the corrector, then with it
        for suffix, extra in (("", dict(corrector_steps=0)), (corrected, with_corrector)):
            run(
                f"block Picard K={k}{suffix}",
                f"block Picard{suffix}",
                cfg.steps,
                blocks=cfg.blocks,
                iterations=k,
                **extra,
            )
    mean = sum(floors) / len(floors)
    spread = (sum((f - mean) ** 2 for f in floors) / (len(floors) - 1)) ** 0.5
    return {"dim": dim, "floor": mean, "floor_std": spread, "runs": rows}


def run(argv: list[str] | None = None) -> dict[str, object]:
    mode = parse(__doc__, argv)
    cfg = FULL if mode.name == "full" else FAST
    start, cpu = time.perf_counter(), time.process_time()
    by_dim = []
    for dim in cfg.dims:
        t = time.perf_counter()
        by_dim.append(measure(dim, cfg))
        print(f"diffusion_corrector: d={dim} {time.perf_counter() - t:.1f}s", flush=True)
    payload = {
        "config": cfg.__dict__,
        "by_dim": by_dim,
        "seconds": time.perf_counter() - start,
        # The machine is shared: CPU time is what the study costs on one free core.
        "cpu_seconds": time.process_time() - cpu,
        "regime": "float64, CPU, 1 thread; DDIM on a mixture of 8 isotropic Gaussians, exact score",
    }
    payload["section_values"] = section_values(payload)
    write_json(out_path(mode, "diffusion_corrector.json"), payload, seed=0)
    plot(payload, mode)
    return payload


def _family(dim_row: dict, family: str) -> list[dict]:
    """The runs of one sampler family at one dimension, in run order."""
    return [r for r in dim_row["runs"] if r["family"] == family]


def _value(dim_row: dict, label: str, key: str = "sw2") -> Any:
    """``key`` of the run called ``label`` at one dimension."""
    return next(r[key] for r in dim_row["runs"] if r["label"] == label)


def _pairs(dim_row: dict) -> list[tuple[dict, dict]]:
    """(without, with) corrector, block Picard rows of one dimension, by K."""
    return list(zip(_family(dim_row, "block Picard"), _family(dim_row, "block Picard + corrector")))


def section_values(p: dict) -> dict:
    cfg = p["config"]
    labels = [r["label"] for r in p["by_dim"][0]["runs"]]
    calls = {r["label"]: r["network_calls"] for r in p["by_dim"][0]["runs"]}
    headers = ["sampler", "dependent evaluations"] + [f"d={r['dim']}" for r in p["by_dim"]]
    rows = []
    for label in labels:
        row: list[object] = [label, calls[label]]
        row += [_value(dim_row, label) for dim_row in p["by_dim"]]
        rows.append(row)
    rows.append(["exact samples (floor)", "-"] + [r["floor"] for r in p["by_dim"]])
    rows.append(["floor spread (std)", "-"] + [r["floor_std"] for r in p["by_dim"]])
    pairs = [(a, b) for dim_row in p["by_dim"] for a, b in _pairs(dim_row)]
    better = sum(b["sw2"] < a["sw2"] for a, b in pairs)
    # The corrector's help measured at equal cost: the cheapest block-Picard run without
    # it that is at least as accurate as each corrected run, per dimension.
    cheaper = 0
    for dim_row in p["by_dim"]:
        plain = _family(dim_row, "block Picard")
        for _, b in _pairs(dim_row):
            rivals = [r for r in plain if r["network_calls"] <= b["network_calls"]]
            if rivals and b["sw2"] < min(r["sw2"] for r in rivals):
                cheaper += 1
    # Per K: does the corrector lower the error at every dimension?
    ks = list(cfg["iterations"])
    helps = {
        k: all(
            b["sw2"] < a["sw2"] for d in p["by_dim"] for a, b in _pairs(d) if a["iterations"] == k
        )
        for k in ks
    }
    from_k = next((k for i, k in enumerate(ks) if all(helps[j] for j in ks[i:])), None)
    top = ks[-1]
    first = p["by_dim"][0]
    best = f"block Picard K={top} + corrector"
    seq = f"sequential N={cfg['steps']}"
    dims = len(p["by_dim"])
    return {
        "corr_help_from": f"from K = {from_k} on" if from_k is not None else "at no K tried",
        "corr_top_k": top,
        "corr_top_calls": _value(first, best, "network_calls"),
        "corr_top_beats_seq": sum(_value(d, best) < _value(d, seq) for d in p["by_dim"]),
        "corr_top_beats_seq_corr": sum(
            _value(d, best) < _value(d, seq + " + corrector") for d in p["by_dim"]
        ),
        "corr_top_at_floor": sum(
            _value(d, best) <= d["floor"] + 2 * d["floor_std"] for d in p["by_dim"]
        ),
        "corr_seq_corr_calls": _value(first, seq + " + corrector", "network_calls"),
        "corr_ndims": dims,
        "corr_regime": p["regime"],
        "corr_dims": ", ".join(str(r["dim"]) for r in p["by_dim"]),
        "corr_samples": cfg["samples"],
        "corr_reference": REFERENCE_FACTOR * cfg["samples"],
        "corr_directions": cfg["directions"],
        "corr_steps": cfg["steps"],
        "corr_blocks": cfg["blocks"],
        "corr_iterations": ", ".join(str(k) for k in cfg["iterations"]),
        "corr_m": cfg["corrector_steps"],
        "corr_kc": cfg["corrector_iterations"],
        "corr_step_size": cfg["step_size"],
        "corr_friction": cfg["friction"],
        "corr_table": md_table(headers, rows),
        "corr_pairs": len(pairs),
        "corr_better": better,
        "corr_better_at_cost": cheaper,
        "corr_cpu_minutes": p["cpu_seconds"] / 60,
    }


def plot(payload: dict, mode) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = payload["by_dim"]
    fig, axes = plt.subplots(1, len(rows), figsize=(3.2 * len(rows), 3.4), sharey=True)
    axes = [axes] if len(rows) == 1 else list(axes)
    styles = {
        "sequential": "k:o",
        "block Picard": "C0-o",
        "block Picard + corrector": "C1-s",
        "sequential + corrector": "C1*",
    }
    for ax, dim_row in zip(axes, rows):
        for family, style in styles.items():
            pts = sorted((r["network_calls"], r["sw2"]) for r in _family(dim_row, family))
            if pts:
                ax.plot(*zip(*pts), style, label=family, ms=4)
        ax.axhline(dim_row["floor"], color="grey", lw=0.8, ls="--", label="exact samples")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ticks = sorted({r["network_calls"] for r in dim_row["runs"]})
        ax.set_xticks(ticks[:: max(1, len(ticks) // 5)])
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_title(f"d = {dim_row['dim']}")
        ax.set_xlabel("dependent evaluations")
    axes[0].set_ylabel("sliced W2 to the mixture")
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    save_figure(fig, out_path(mode, "diffusion_corrector.png"))
    plt.close(fig)


if __name__ == "__main__":
    run()

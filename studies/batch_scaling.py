"""Beyond the paper: speed-up against batch size on this CPU, and the cost model.

On a 2-core CPU a Jacobi iteration (a full pass) costs real arithmetic, so parallel
strategies win only while the per-call latency dominates: at small batch.  For batch
sizes 1 to 256 this measures the wall-clock of the sequential sampler and of the
parallel strategies (median of repeats, same run), finds the crossover batch size where
sequential becomes faster, fits the cost model (network time from bare calls, solver
overhead from calibration solves, see :mod:`studies.costmodel`) at every batch size,
compares its predictions with the measurements of these strategies (none was used to
fit it), and states what the same strategies would give on a latency-bound device
(speed-up = ratio of dependent steps).

    python -m studies.batch_scaling --mode fast
"""

from __future__ import annotations

import math
from functools import partial

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import fixedpoint as fp  # noqa: E402
from fixedpoint.benchmark import interleaved_medians  # noqa: E402
from fixedpoint.tarflow import BlockMetrics, Strategy  # noqa: E402

from . import costmodel  # noqa: E402
from .common import Mode, read_json, save_figure, study_main, timed, write_json  # noqa: E402
from .crm_igm import paper_rule  # noqa: E402
from .lib import (  # noqa: E402
    SEED,
    TOL,
    noise,
    sample,
    sequential_strategy,
    timing_clock,
    totals,
    trained,
)


def crossover(batches: list[int], speedups: list[float]) -> float | None:
    """Batch size where the speed-up falls through 1 (log-linear interpolation)."""
    for (b0, s0), (b1, s1) in zip(zip(batches, speedups), zip(batches[1:], speedups[1:])):
        if s0 >= 1 > s1:
            f = math.log(s0) / (math.log(s0) - math.log(s1))
            return math.exp(math.log(b0) + f * (math.log(b1) - math.log(b0)))
    return None


def run_model(preset: str, mode: Mode) -> dict:
    t = trained(preset, mode)
    model, c = t.model, t.model.config
    table = [BlockMetrics(**r) for r in read_json(mode.out_dir / f"crm_igm-{preset}.json")["table"]]
    plans = {
        "sequential": sequential_strategy(c.blocks),
        "jacobi": Strategy.uniform(fp.Jacobi(atol=TOL), c.blocks),
        "paper rule": paper_rule(table, c.seq_len),
        "triangular anderson": Strategy.uniform(fp.TriangularAnderson(atol=TOL), c.blocks),
    }
    # Batch 256 on the T = 196 model would take most of the time budget by itself.
    batches = [b for b in mode.batch_sizes if b <= 64 or c.seq_len <= 64]
    clock, clock_name = timing_clock()
    cost = {}
    measured: dict[str, dict] = {name: {"time": [], "predicted": [], "steps": [], "tokens": []}
                                 for name in plans}
    for b in batches:
        with timed(f"{preset}: cost model at batch {b}"):
            cost[b] = costmodel.fit(model, b, repeats=mode.repeats, clock=clock)
        z, y = noise(model, b, seed=SEED)
        times = interleaved_medians({name: partial(sample, model, z, y, strategy)
                                     for name, strategy in plans.items()}, mode.repeats,
                                    clock=clock)
        for name, strategy in plans.items():
            s = sample(model, z, y, strategy)
            tt = totals(s)
            m = measured[name]
            m["time"].append(times[name])
            m["steps"].append(tt["dependent_steps"])
            m["tokens"].append(tt["token_evals"])
            m["predicted"].append(cost[b].predict_sample(s))
        print(f"batch {b}: " + ", ".join(f"{n} {1e3 * measured[n]['time'][-1]:.1f} ms"
                                         for n in plans), flush=True)
    seq = measured["sequential"]
    out = {"preset": preset, "seq_len": c.seq_len, "batches": batches, "device": "cpu",
           "dtype": "float32", "threads": torch.get_num_threads(), "repeats": mode.repeats,
           "clock": clock_name,
           "cost_model": {b: cost[b].to_dict() for b in batches}, "strategies": {}}
    errors = []
    for name, m in measured.items():
        speed = [s / p for s, p in zip(seq["time"], m["time"])]
        err = [p / tm - 1 for p, tm in zip(m["predicted"], m["time"])]
        errors += [abs(e) for e in err]
        out["strategies"][name] = {
            **m, "speedup": speed, "prediction_error": err,
            "crossover_batch": crossover(batches, speed) if name != "sequential" else None,
            "latency_bound_speedup": [s / p for s, p in zip(seq["steps"], m["steps"])],
        }
    out["mean_abs_prediction_error"] = sum(errors) / len(errors)
    out["max_abs_prediction_error"] = max(errors)
    write_json(mode.out_dir / f"batch_scaling-{preset}.json", out, seed=SEED)
    plot(out, mode)
    return out


def plot(out: dict, mode: Mode) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    b = out["batches"]
    for name, m in out["strategies"].items():
        if name != "sequential":
            axes[0].plot(b, m["speedup"], "o-", label=name)
        line = axes[1].plot(b, [1e3 * v for v in m["time"]], "o-", label=f"{name} measured")
        axes[1].plot(b, [1e3 * v for v in m["predicted"]], "x--", color=line[0].get_color(),
                     label=f"{name} predicted")
    axes[0].axhline(1, color="grey", lw=1)
    axes[0].set(xscale="log", yscale="log", xlabel="batch size",
                ylabel="speed-up vs sequential (wall-clock)",
                title=f"{out['preset']} (T={out['seq_len']}): CPU, fp32")
    axes[1].set(xscale="log", yscale="log", xlabel="batch size", ylabel="ms per sampling run",
                title="measured vs cost model")
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    save_figure(fig, mode.out_dir / f"batch_scaling-{out['preset']}.png")
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    study_main(__doc__, run_model, "batch_scaling", argv)


if __name__ == "__main__":
    main()

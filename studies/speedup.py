"""Table 6: time / quality / speed-up of every strategy, beside the paper's table.

Strategies: sequential (the lean KV-cached sampler), pure Jacobi, the paper's rule
(CRM-dominant blocks get modules, IGM picks the start, caps [*-8-32-10]), Anderson,
triangular Anderson, the automatic strategy for the wall-clock objective (this CPU) at
batch 1 and at batch 64, and for the latency objective (fewest dependent steps within the
budget: a latency-bound device).  Columns: the objective of an automatic strategy,
dependent steps, their reduction against sequential, and token evaluations (summed over
blocks), wall-clock at batch 1 and
at batch 64 (median of repeats in this run, this CPU, fp32), speed-up vs sequential,
max and mean deviation from the sequential samples from the same noise, and quality
(Fréchet classifier distance, FCD, and conditional accuracy of the classifier).  The
metric's own noise is the FCD difference between two sequential runs with different
seeds.  The cost model's prediction of each wall-clock is stored beside it.

    python -m studies.speedup --mode fast
"""

from __future__ import annotations

from functools import partial

import torch

import fixedpoint as fp
from fixedpoint.benchmark import interleaved_medians, markdown_table
from fixedpoint.quality import QualityMeter, deviation
from fixedpoint.tarflow import BlockMetrics, InitialGuess, Strategy
from fixedpoint.tarflow.strategy import Objective

from . import auto_strategy, costmodel
from .common import CACHE, Mode, read_json, study_main, timed, write_json
from .crm_igm import paper_rule
from .lib import (
    BUDGET,
    QSEED,
    SEED,
    TOL,
    noise,
    quality_images,
    sample,
    sequential_strategy,
    timing_clock,
    totals,
    trained,
)

PUBLISHED = [
    # model, For time, For FID, strategy, GS-J time, GS-J FID, speed-up
    ("Img128cond (4-1024-8-8-0.15)", 133.19, 5.06, "[6-8-32-10]", 29.41, 5.09, 4.53),
    ("AFHQ-256 (8-768-8-8-0.07)", 109.24, 13.60, "[7-8-32-10]", 20.54, 13.73, 5.32),
    ("Img64uncond (2-768-8-8-0.05)", 109.05, 14.67, "[0/6-8-32-20]", 36.84, 14.80, 2.96),
    ("Img64cond (4-1024-8-8-0.05)", 12.16, 4.42, "[0/7-256/8-1/13-6]", 4.97, 4.42, 2.51),
]


def strategies(model, table: list[BlockMetrics], auto: dict[int, Strategy],
               latency: Strategy | None = None) -> dict:
    c = model.config
    K, T = c.blocks, c.seq_len
    out = {
        "sequential": sequential_strategy(K),
        "jacobi": Strategy.uniform(fp.Jacobi(atol=TOL), K),
        "paper rule": paper_rule(table, T),
        "anderson": Strategy.uniform(fp.Anderson(atol=TOL, max_iter=T), K),
        "triangular anderson": Strategy.uniform(fp.TriangularAnderson(atol=TOL), K),
    }
    for b, s in auto.items():
        out[f"auto (b={b})"] = s
    if latency is not None:
        out["auto (latency)"] = latency
    return out


def objective_of(name: str) -> str | None:
    """The objective of a row's automatic strategy (None: not an automatic strategy)."""
    if name == "auto (latency)":
        return Objective.LATENCY.value
    return Objective.WALLCLOCK.value if name.startswith("auto (b=") else None


def igm_inits(table: list[BlockMetrics]) -> list[InitialGuess]:
    return [InitialGuess.ZEROS_AFTER_FIRST if r.igm_sample_zeros < r.igm_sample_noise
            else InitialGuess.NOISE for r in table]


def run_model(preset: str, mode: Mode) -> dict:
    t = trained(preset, mode)
    model, c = t.model, t.model.config
    table = [BlockMetrics(**r) for r in read_json(mode.out_dir / f"crm_igm-{preset}.json")["table"]]
    timing_batches = (1, 64) if mode.name == "full" else (1, 8)
    clock, clock_name = timing_clock()
    with timed(f"{preset}: cost model"):
        cost = {b: costmodel.fit(model, b, repeats=mode.repeats, clock=clock)
                for b in timing_batches}
    auto, auto_info = {}, {}
    for b in timing_batches:
        with timed(f"{preset}: automatic strategy for batch {b}"):
            info = auto_strategy.choose(model, cost[b], b, igm_inits(table))
        auto[b] = info["strategy"]
        auto_info[b] = {"objective": info["objective"], "rounds": info["rounds"],
                        "predicted_s": info["predicted_s"],
                        "strategy": info["strategy"].describe()}
    b0 = timing_batches[0]
    with timed(f"{preset}: automatic strategy, latency objective"):
        # Calibrated on as many samples as the largest timing batch: a batch takes as
        # many steps as its slowest sample.
        info = auto_strategy.choose(model, cost[b0], b0, igm_inits(table),
                                    calibration=max(timing_batches),
                                    objective=Objective.LATENCY)
    auto_info["latency"] = {"objective": info["objective"], "rounds": info["rounds"],
                            "margin": info["margin"], "strategy": info["strategy"].describe()}
    plans = strategies(model, table, auto, info["strategy"])

    meter = QualityMeter.for_dataset(t.data, cache_dir=CACHE / "classifiers")
    # Steps, tokens and deviation on the evaluation batch; quality on quality_samples
    # samples per row from their own noise (seeds QSEED, QSEED + 1), drawn in chunks.
    z, y = noise(model, mode.eval_batch, seed=SEED)
    reference = sample(model, z, y, plans["sequential"], denoise=True)
    n_q = mode.quality_samples
    with timed(f"{preset}: sequential quality, 2 x {n_q} samples"):
        xq, yq = quality_images(model, n_q, QSEED, plans["sequential"])
        xq2, yq2 = quality_images(model, n_q, QSEED + 1, plans["sequential"])
    fcd_seq, acc_seq = meter.frechet(xq), meter.accuracy(xq, yq)
    fcd_second, acc_second = meter.frechet(xq2), meter.accuracy(xq2, yq2)
    noise_floor = abs(fcd_second - fcd_seq)

    rows = []
    for name, strategy in plans.items():
        with timed(f"{preset}: {name}"):
            s = reference if name == "sequential" else sample(model, z, y, strategy, denoise=True)
            xs = xq if name == "sequential" else quality_images(model, n_q, QSEED, strategy)[0]
            rows.append({"strategy": name, "objective": objective_of(name),
                         "spec": strategy.describe(), **totals(s),
                         "deviation": deviation(s.x, reference.x),
                         "quality_deviation": deviation(xs, xq)["max_abs"],
                         "fcd": meter.frechet(xs), "accuracy": meter.accuracy(xs, yq)})
    for b in timing_batches:
        zb, yb = noise(model, b, seed=SEED)
        with timed(f"{preset}: timing at batch {b}"):
            times = interleaved_medians({name: partial(sample, model, zb, yb, strategy)
                                         for name, strategy in plans.items()}, mode.repeats,
                                        clock=clock)
        for row, strategy in zip(rows, plans.values(), strict=True):
            sb = sample(model, zb, yb, strategy)
            tb = totals(sb)
            row[f"time_b{b}"] = times[row["strategy"]]
            row[f"steps_b{b}"] = tb["dependent_steps"]
            row[f"tokens_b{b}"] = tb["token_evals"]
            row[f"predicted_b{b}"] = cost[b].predict_sample(sb)
    for row in rows:
        for b in timing_batches:
            row[f"speedup_b{b}"] = rows[0][f"time_b{b}"] / row[f"time_b{b}"]
            row[f"prediction_error_b{b}"] = row[f"predicted_b{b}"] / row[f"time_b{b}"] - 1
        row["step_reduction"] = rows[0]["dependent_steps"] / row["dependent_steps"]

    out = {
        "preset": preset, "seq_len": c.seq_len, "blocks": c.blocks,
        "eval_batch": mode.eval_batch, "quality_samples": n_q,
        "timing_batches": list(timing_batches),
        "tolerance": TOL, "budget": BUDGET, "dtype": "float32", "device": "cpu",
        "repeats": mode.repeats,
        "threads": torch.get_num_threads(), "clock": clock_name,
        "test_bpd": t.test_bpd, "train_time_s": t.train_time, "parameters": t.parameters,
        "classifier_test_accuracy": meter.test_accuracy,
        "fcd_sequential": fcd_seq, "fcd_second_seed": fcd_second,
        "fcd_noise_floor": noise_floor, "accuracy_sequential": acc_seq,
        "accuracy_second_seed": acc_second, "accuracy_noise_floor": abs(acc_second - acc_seq),
        "cost_model": {b: cost[b].to_dict() for b in timing_batches},
        "auto": auto_info, "rows": rows, "published": PUBLISHED,
    }
    write_json(mode.out_dir / f"speedup-{preset}.json", out, seed=SEED)
    print(markdown(out))
    return out


def markdown(out: dict) -> str:
    bs = out["timing_batches"]
    head = ["strategy", "objective", "dependent steps", "step reduction", "token evals"]
    head += [f"ms (b={b})" for b in bs] + [f"speed-up (b={b})" for b in bs]
    head += ["max dev", "FCD", "accuracy"]
    rows = []
    for r in out["rows"]:
        cells = [r["strategy"], r.get("objective") or "", str(r["dependent_steps"]),
                 f"{r['step_reduction']:.2f}x", str(r["token_evals"])]
        cells += [f"{1e3 * r[f'time_b{b}']:.1f}" for b in bs]
        cells += [f"{r[f'speedup_b{b}']:.2f}x" for b in bs]
        cells += [f"{r['deviation']['max_abs']:.1e}", f"{r['fcd']:.3f}", f"{r['accuracy']:.3f}"]
        rows.append(cells)
    return markdown_table(head, rows)


def main(argv: list[str] | None = None) -> None:
    study_main(__doc__, run_model, "speedup", argv)


if __name__ == "__main__":
    main()

"""The cost model on every model architecture: fitted constants and held-out error.

``studies/batch_scaling.py`` judges the cost model on trained models; this check runs the
same fit (:func:`studies.costmodel.fit`) on every preset's architecture at small and
medium batch, and compares its predictions with measured sampling runs of strategies
that were not used to fit it.  Timing does not depend on what the weights learned, only
on the steps and token rows a strategy takes, which the prediction is given; so a preset named
with ``--untrained`` (MNIST takes long to train here) is checked with its architecture's
initial weights, and the JSON says which.

    python -m studies.costmodel_check --mode full
"""

from __future__ import annotations

import argparse
from functools import partial
from typing import Any

import torch

import fixedpoint as fp
from fixedpoint.benchmark import interleaved_medians
from fixedpoint.tarflow import Strategy, TarFlow
from fixedpoint.tarflow.train import PRESETS

from . import costmodel
from .common import MODES, Mode, timed, write_json
from .lib import SEED, TOL, noise, per_block, sample, sequential_strategy, timing_clock, trained

BATCHES = {"fast": (1, 8), "full": (1, 8, 64)}
LONG = 64  # above this sequence length, batch 64 runs take minutes each here: batches <= 8


def held_out(model: TarFlow) -> dict[str, Strategy]:
    """Strategies of every method class, at tolerances and caps the fit never saw."""
    c = model.config
    K, T = c.blocks, c.seq_len
    tough = [fp.Jacobi(atol=TOL)] * (K - 1) + [fp.GSJacobi(modules=4, atol=TOL)]
    return {
        "sequential": sequential_strategy(K),
        "jacobi": Strategy.uniform(fp.Jacobi(atol=TOL), K),
        "jacobi, default tolerance": Strategy.uniform(fp.Jacobi(), K),
        "GS-Jacobi on the last block": per_block(tough),
        "triangular anderson": Strategy.uniform(fp.TriangularAnderson(atol=TOL), K),
        "anderson": Strategy.uniform(fp.Anderson(atol=TOL, max_iter=T), K),
    }


def model_for(preset: str, mode: Mode, untrained: bool) -> tuple[TarFlow, str]:
    """The trained model (trained or loaded from the cache), or the untrained architecture."""
    if not untrained:
        return trained(preset, mode, progress=False).model, "trained"
    with torch.random.fork_rng(devices=[]):  # reproducible weights, global RNG untouched
        torch.manual_seed(SEED)
        model = TarFlow(PRESETS[preset].model).eval()
        with torch.no_grad():
            # The output projections start at zero (an identity flow, solved by one
            # iteration); small random ones make every method iterate, as bench_tarflow.
            for block in model.blocks:
                block.proj_out.weight.normal_(0, 0.02)
                block.proj_out.bias.normal_(0, 0.02)
    return model, "untrained: initial weights, output projections N(0, 0.02)"


def check(preset: str, mode: Mode, untrained: bool = False) -> dict[str, Any]:
    model, weights = model_for(preset, mode, untrained)
    clock, clock_name = timing_clock()
    plans = held_out(model)
    rows = []
    fits = {}
    batches = [b for b in BATCHES[mode.name] if b <= 8 or model.config.seq_len <= LONG]
    for b in batches:
        with timed(f"{preset}: cost model at batch {b}"):
            cost = costmodel.fit(model, b, repeats=mode.repeats, clock=clock)
        fits[b] = cost.to_dict()
        z, y = noise(model, b, seed=SEED)
        times = interleaved_medians({n: partial(sample, model, z, y, s) for n, s in plans.items()},
                                    mode.repeats, clock=clock)
        for name, strategy in plans.items():
            s = sample(model, z, y, strategy)
            predicted = cost.predict_sample(s)
            network = sum(cost.network(r.dependent_steps, r.token_evals) for r in s.blocks)
            rows.append({"batch": b, "strategy": name,
                         "dependent_steps": sum(r.dependent_steps for r in s.blocks),
                         "token_evals": sum(r.token_evals for r in s.blocks),
                         "measured_s": times[name], "predicted_s": predicted,
                         "network_share": network / predicted,
                         "error": predicted / times[name] - 1})
    errors = costmodel.prediction_errors([r["predicted_s"] for r in rows],
                                         [r["measured_s"] for r in rows])
    return {"preset": preset, "seq_len": model.config.seq_len, "weights": weights,
            "batches": batches, "threads": torch.get_num_threads(),
            "clock": clock_name, "repeats": mode.repeats, "cost_model": fits, "rows": rows,
            "mean_abs_error": errors["mean_abs"], "max_abs_error": errors["max_abs"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=MODES, default="fast")
    parser.add_argument("--models", nargs="*", help="presets (default: the mode's)")
    parser.add_argument("--untrained", nargs="*", default=[],
                        help="presets to check with their initial weights instead of training")
    args = parser.parse_args(argv)
    mode = MODES[args.mode]
    torch.set_num_threads(1)
    out = {}
    mode.out_dir.mkdir(parents=True, exist_ok=True)
    for preset in args.models or mode.models:
        with timed(f"costmodel_check {preset}"):
            out[preset] = check(preset, mode, preset in args.untrained)
        print(f"{preset}: mean abs error {100 * out[preset]['mean_abs_error']:.0f}%, "
              f"max {100 * out[preset]['max_abs_error']:.0f}%", flush=True)
        # After every model, so an interrupted run keeps what it measured.
        write_json(mode.out_dir / "costmodel_check.json", {"models": out}, seed=SEED)


if __name__ == "__main__":
    main()

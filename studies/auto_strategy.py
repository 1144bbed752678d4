"""Automatic strategy: per block, the best plan within an error budget, for an objective.

Every block is tried on a calibration batch (its own noise seed, never the evaluation
noise) with candidate plans, each block from its exact input along the sequential
trajectory; a candidate's error is its distance to that block's sequential solution.
Each block then gets the best candidate whose error stays within its share of the
budget, *best* by the :class:`~fixedpoint.tarflow.strategy.Objective`:

* ``WALLCLOCK`` (the device at hand): the shortest time the measured cost model predicts
  from the candidate's dependent steps and token evaluations scaled to the target batch.
  Candidates: Jacobi, GS-Jacobi with 2/4/8 modules and triangular Anderson at the
  tolerances :data:`TOLERANCES`, from the initial guess IGM prefers (and sequential).
* ``LATENCY`` (a latency-bound device): the fewest dependent steps, then the fewest token
  evaluations.  Candidates: Jacobi and triangular Anderson at the tolerances
  :data:`LATENCY_TOLERANCES` (down to 1e-5: per-block tolerances are the main lever),
  from both initial guesses.  GS-Jacobi is left out: each module costs at least one
  step and it was never the latency choice on the digits and mnist-p4 models.  A batch
  takes as many steps as its slowest sample, so calibrate on as many samples as the
  strategy will run at (the calibration batch of 8 chose 18 steps for the tough block of
  a 1-epoch mnist-p4 model that then took 27 on 64 evaluation samples).

The assembled strategy is checked end to end on the calibration batch and the shares are
tightened until the final samples stay within ``margin * budget``: the margin leaves room
for the evaluation batch, whose worst sample is worse than the calibration batch's
(more samples, other noise).  The candidate solves do not depend on the shares, so each
block is solved once per candidate and re-selected each round.

    python -m studies.auto_strategy --checkpoint PATH [--checkpoint PATH ...]

measures both objectives on trained checkpoints (dependent steps and deviation on an
evaluation batch per strategy) and writes ``auto_strategy-<name>.json``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

import fixedpoint as fp
from fixedpoint.quality import deviation
from fixedpoint.tarflow import BlockInverse, BlockPlan, InitialGuess, Sample, Strategy, TarFlow
from fixedpoint.tarflow.strategy import Objective

from .costmodel import CostModel
from .lib import BUDGET, GUIDANCE, SEED, TOL, noise, sample, sequential_strategy, totals

CALIBRATION_SEED = 1234
TOLERANCES = (1e-2, 3e-3, 1e-3, 3e-4, 1e-4)
LATENCY_TOLERANCES = (1e-3, 3e-4, 1e-4, 3e-5, 1e-5)
# The end-to-end check on the calibration batch asks for margin * budget.
MARGIN = 0.5

Candidates = Callable[[int, float], list[fp.Method]]


@dataclass(frozen=True)
class Choice:
    block: int
    plan: BlockPlan
    error: float
    steps: int
    tokens: int
    predicted_s: float | None
    converged: bool = True


def candidates(seq_len: int, tol: float) -> list[fp.Method]:
    """The wall-clock candidates at one tolerance."""
    methods: list[fp.Method] = [fp.Jacobi(atol=tol), fp.TriangularAnderson(atol=tol)]
    methods += [fp.GSJacobi(modules=g, atol=tol) for g in (2, 4, 8) if g < seq_len]
    return methods


def latency_candidates(seq_len: int, tol: float) -> list[fp.Method]:
    """The latency candidates at one tolerance."""
    return [fp.Jacobi(atol=tol), fp.TriangularAnderson(atol=tol)]


def with_newton(seq_len: int, tol: float) -> list[fp.Method]:
    """The latency candidates and damped Newton (its Jacobian costs ``T x d``
    directional derivatives per iteration: slow to calibrate on a CPU)."""
    return [*latency_candidates(seq_len, tol), fp.Newton(atol=tol)]


def block_inputs(model: TarFlow, ref: Sample) -> list[torch.Tensor]:
    """Each block's noise input (its permuted order) along the sequential trajectory."""
    K = model.config.blocks
    x = ref.intermediates[0]  # scaled noise, image layout
    inputs: list[torch.Tensor] = [None] * K  # type: ignore[list-item]
    tokens = model.patchify(x)
    for k in reversed(range(K)):
        inputs[k] = model.blocks[k].permute(tokens)
        tokens = model.blocks[k].permute(ref.blocks[k].x)
    return inputs


def _predict(cost: CostModel | None, method: fp.Method, steps: int, tokens: int,
             scale: float) -> float | None:
    if cost is None or type(method).__name__ not in cost.overhead:
        return None
    return cost.predict_solve(method, steps, int(tokens * scale))


def _trials(model: TarFlow, k: int, z: torch.Tensor, y: torch.Tensor | None,
            exact: torch.Tensor, plans: Sequence[BlockPlan], cost: CostModel | None,
            scale: float) -> list[Choice]:
    """Block ``k`` solved with every plan from its exact input ``z``; sequential first."""
    fmap = BlockInverse(model, k, z, y, guidance=GUIDANCE)
    seq = fp.solve(fmap, z, fp.Sequential())
    out = [Choice(k, BlockPlan(fp.Sequential()), 0.0, seq.dependent_steps, seq.token_evals,
                  _predict(cost, fp.Sequential(), seq.dependent_steps, seq.token_evals,
                           scale))]
    for plan in plans:
        r = fp.solve(fmap, plan.init.start(z), plan.method)
        out.append(Choice(k, plan, float((r.x - exact).abs().max()), r.dependent_steps,
                          r.token_evals, _predict(cost, plan.method, r.dependent_steps,
                                                  r.token_evals, scale),
                          bool(r.converged.all())))
    return out


def _best(trials: Sequence[Choice], limit: float, objective: Objective) -> Choice:
    ok = [t for t in trials if t.converged and t.error <= limit]
    return min(ok, key=lambda t: objective.key(t.steps, t.tokens, t.predicted_s))


def choose(model: TarFlow, cost: CostModel | None, target_batch: int,
           igm_inits: list[InitialGuess], calibration: int = 8, budget: float = BUDGET,
           objective: Objective = Objective.WALLCLOCK, margin: float = MARGIN,
           methods: Candidates | None = None,
           tolerances: Sequence[float] | None = None) -> dict:
    """The automatic strategy for ``objective``; see the module docstring.

    ``cost`` (the cost model at ``target_batch``) is required for ``WALLCLOCK``; for
    ``LATENCY`` it only fills the predicted times.  ``methods`` / ``tolerances``
    override the objective's candidate family.
    """
    if objective is Objective.WALLCLOCK and cost is None:
        raise ValueError("the wallclock objective needs a cost model")
    if not 0 < margin <= 1:
        raise ValueError(f"margin must be in (0, 1], got {margin!r}")
    c = model.config
    latency = objective is Objective.LATENCY
    methods = methods or (latency_candidates if latency else candidates)
    tolerances = tolerances or (LATENCY_TOLERANCES if latency else TOLERANCES)
    z, y = noise(model, calibration, seed=CALIBRATION_SEED)
    ref = sample(model, z, y, sequential_strategy(c.blocks))
    inputs = block_inputs(model, ref)
    scale = target_batch / calibration
    trials = []
    for k in range(c.blocks):
        inits = tuple(InitialGuess) if latency else (igm_inits[k],)
        plans = [BlockPlan(m, i) for tol in tolerances for m in methods(c.seq_len, tol)
                 for i in inits]
        trials.append(_trials(model, k, inputs[k], y, ref.blocks[k].x, plans, cost, scale))
    share = 1.0 / c.blocks
    rounds = []
    for _ in range(6):
        chosen = [_best(t, margin * budget * share, objective) for t in trials]
        strategy = Strategy(tuple(ch.plan for ch in chosen))
        check = sample(model, z, y, strategy)
        dev = deviation(check.x, ref.x)
        rounds.append({"share": share, "deviation": dev, "strategy": strategy.describe(),
                       "dependent_steps": totals(check)["dependent_steps"]})
        if dev["max_abs"] <= margin * budget:
            break
        share /= 4  # errors grew through later blocks: ask every block for less
    predicted = [ch.predicted_s for ch in chosen]
    return {
        "objective": objective.value,
        "margin": margin,
        "strategy": strategy,
        "choices": chosen,
        "rounds": rounds,
        "predicted_s": (None if cost is None or None in predicted
                        else cost.per_run + sum(predicted)),
        "calibration_totals": totals(check),
    }


# ---- the measurement on trained checkpoints ------------------------------------------------


def measure(model: TarFlow, name: str, eval_batch: int, calibration: int, margin: float,
            cost_batch: int, out_dir: Path, newton: bool, newton_samples: int = 0,
            bandwidths: Sequence[int | None] = (None,)) -> dict:
    """Dependent steps and deviation on the evaluation batch for the simple strategies
    and the automatic strategy under both objectives.  ``newton_samples > 0`` also runs
    the latency strategy with its slowest block switched to damped Newton (same
    tolerance and start) on that many of the evaluation samples (Newton's Jacobian is
    costly on a CPU), beside the unchanged strategy on the same samples; one row per
    Jacobian ``bandwidths`` entry (``None``: dense; ``k``: the banded approximation of
    :class:`fixedpoint.Newton`, ``k`` of the ``T - 1`` sub-diagonal blocks)."""
    from . import costmodel
    from .common import timed, write_json
    from .speedup import igm_inits

    c = model.config
    K = c.blocks
    inits = igm_inits(_igm_table(model))
    with timed(f"{name}: cost model at batch {cost_batch}"):
        cost = costmodel.fit(model, cost_batch, repeats=2)
    auto = {}
    for objective in Objective:
        with timed(f"{name}: automatic strategy, {objective.value}"):
            # Latency: calibrate on as many samples as are evaluated (see the docstring).
            n = eval_batch if objective is Objective.LATENCY else calibration
            auto[objective] = choose(model, cost, cost_batch, inits, calibration=n,
                                     objective=objective, margin=margin,
                                     methods=with_newton if newton and objective is
                                     Objective.LATENCY else None)
    plans = {
        "sequential": sequential_strategy(K),
        "jacobi": Strategy.uniform(fp.Jacobi(atol=TOL), K),
        "triangular anderson": Strategy.uniform(fp.TriangularAnderson(atol=TOL), K),
        **{f"auto ({o.value})": a["strategy"] for o, a in auto.items()},
    }
    z, y = noise(model, eval_batch, seed=SEED)
    rows = []
    reference = None
    for label, strategy in plans.items():
        with timed(f"{name}: {label} on {eval_batch} samples"):
            s = sample(model, z, y, strategy)
        reference = reference if reference is not None else s
        t = totals(s)
        rows.append({"strategy": label, "spec": strategy.describe(), **t,
                     "deviation": deviation(s.x, reference.x),
                     "step_reduction": None})
    for row in rows:
        row["step_reduction"] = rows[0]["dependent_steps"] / row["dependent_steps"]
    newton_rows = []
    if newton_samples:
        base = auto[Objective.LATENCY]["strategy"]
        its = next(r["iterations"] for r in rows if r["strategy"] == "auto (latency)")
        slow = max(range(K), key=lambda b: its[b])
        plan = base.plans[slow]
        tol = getattr(plan.method, "atol", None)
        variants = [("auto (latency)", base)]
        for k in bandwidths:
            switched = fp.Newton(atol=tol, bandwidth=k)
            label = f"auto (latency), block {slow} Newton" + (
                "" if k is None else f" (bandwidth {k})")
            variants.append((label, Strategy(tuple(
                BlockPlan(switched, plan.init) if b == slow else p
                for b, p in enumerate(base.plans)))))
        zs, ys = z[:newton_samples], y[:newton_samples] if y is not None else None
        ref = sample(model, zs, ys, sequential_strategy(K))
        for label, strategy in variants:
            with timed(f"{name}: {label} on {newton_samples} samples"):
                s = sample(model, zs, ys, strategy)
            t = totals(s)
            newton_rows.append({"strategy": label, "spec": strategy.describe(),
                                "samples": newton_samples, **t,
                                "deviation": deviation(s.x, ref.x),
                                "step_reduction": K * (c.seq_len - 1) / t["dependent_steps"]})
            print(f"{label:>34} ({newton_samples} samples): {t['dependent_steps']} steps, "
                  f"{t['token_evals']} token evals, max dev "
                  f"{newton_rows[-1]['deviation']['max_abs']:.2e}")
    out = {"model": name, "seq_len": c.seq_len, "blocks": K, "eval_batch": eval_batch,
           "calibration_batch": {"latency": eval_batch, "wallclock": calibration},
           "margin": margin, "budget": BUDGET,
           "guidance": GUIDANCE, "threads": torch.get_num_threads(), "dtype": "float32",
           "cost_model_batch": cost_batch,
           "auto": {o.value: {k: v for k, v in a.items() if k not in ("strategy", "choices")}
                    | {"choices": [{"block": ch.block, "plan": ch.plan.describe(),
                                    "error": ch.error, "steps": ch.steps}
                                   for ch in a["choices"]]}
                    for o, a in auto.items()},
           "rows": rows, "newton_rows": newton_rows}
    write_json(out_dir / f"auto_strategy-{name}.json", out, seed=SEED)
    for r in rows:
        print(f"{r['strategy']:>22}: {r['dependent_steps']:5d} steps "
              f"({r['step_reduction']:.2f}x), max dev {r['deviation']['max_abs']:.2e}")
    return out


def tough_block_probe(model: TarFlow, draws: int = 3, tol: float = 1e-5) -> list[dict]:
    """Jacobi, triangular Anderson, damped and undamped Newton on the tough block (the
    most Jacobi iterations), one noise draw (batch 1) at a time, from the block's exact
    input: iterations, dependent steps, token evaluations, final error against the
    block's sequential solution and the largest error along the way."""
    K = model.config.blocks
    methods = {"jacobi": fp.Jacobi(atol=tol), "triangular anderson":
               fp.TriangularAnderson(atol=tol), "newton": fp.Newton(atol=tol),
               "newton, one Jacobian (chord)": fp.Newton(atol=tol, refresh=10**9),
               "newton, undamped": fp.Newton(atol=tol, radius=1e12)}
    rows = []
    for draw in range(draws):
        z, y = noise(model, 1, seed=CALIBRATION_SEED + 1 + draw)
        ref = sample(model, z, y, sequential_strategy(K))
        jac = sample(model, z, y, Strategy.uniform(fp.Jacobi(atol=tol), K))
        k = max(range(K), key=lambda b: jac.blocks[b].iterations)
        inputs = block_inputs(model, ref)
        fmap = BlockInverse(model, k, inputs[k], y, guidance=GUIDANCE)
        exact = ref.blocks[k].x
        for label, method in methods.items():
            r = fp.solve(fmap, inputs[k], method, trace=True, reference=exact)
            rows.append({"draw": draw, "block": k, "method": label,
                         "iterations": r.iterations, "dependent_steps": r.dependent_steps,
                         "token_evals": r.token_evals, "status": r.status.name,
                         "error": float((r.x - exact).abs().max()),
                         "largest_error": max(float(t.error.max()) for t in r.trace)})
            print(rows[-1])
    return rows


def uniform_probe(model: TarFlow, samples: int, tol: float = TOL,
                  bandwidths: Sequence[int | None] = (None,)) -> list[dict]:
    """Sequential, Jacobi and damped Newton (one row per Jacobian bandwidth, ``None``
    dense) on every block (tolerance ``tol``) on the first ``samples`` evaluation
    samples: dependent steps, token evaluations and the deviation from the sequential
    samples."""
    K = model.config.blocks
    z, y = noise(model, samples, seed=SEED)
    rows, ref = [], None
    methods: list[tuple[str, fp.Method]] = [("sequential", fp.Sequential()),
                                            ("jacobi", fp.Jacobi(atol=tol))]
    methods += [("newton" + ("" if k is None else f" (bandwidth {k})"),
                 fp.Newton(atol=tol, bandwidth=k)) for k in bandwidths]
    for label, method in methods:
        s = sample(model, z, y, Strategy.uniform(method, K))
        ref = ref if ref is not None else s
        rows.append({"strategy": label, "samples": samples, **totals(s),
                     "deviation": deviation(s.x, ref.x)})
        print(label, rows[-1]["iterations"], rows[-1]["dependent_steps"],
              rows[-1]["token_evals"], f"{rows[-1]['deviation']['max_abs']:.2e}")
    return rows


def _igm_table(model: TarFlow, images: int = 64) -> list:
    """CRM / IGM on noisy training images, as studies/crm_igm.py computes them."""
    from fixedpoint.data import load_dataset
    from fixedpoint.tarflow import crm_igm_table

    c = model.config
    data = load_dataset("digits" if c.image_size == 8 else "mnist")
    g = torch.Generator().manual_seed(SEED)
    idx = torch.randperm(len(data.train_x), generator=g)[:images]
    x = data.train_x[idx]
    x = x + c.noise_std * torch.randn(x.shape, generator=g)
    with torch.no_grad():
        return crm_igm_table(model, x, data.train_y[idx], guidance=GUIDANCE)


def _bandwidth(text: str) -> int | None:
    """``dense`` or a positive int (argparse type)."""
    if text == "dense":
        return None
    try:
        k = int(text)
    except ValueError:
        k = 0
    if k < 1:
        raise argparse.ArgumentTypeError(f"a bandwidth is 'dense' or a positive int, got {text!r}")
    return k


def main(argv: list[str] | None = None) -> None:
    from fixedpoint.tarflow.checkpoint import load_model

    from .common import CACHE

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", action="append", required=True, type=Path)
    parser.add_argument("--eval-batch", type=int, default=64)
    parser.add_argument("--calibration", type=int, default=8)
    parser.add_argument("--margin", type=float, default=MARGIN)
    parser.add_argument("--cost-batch", type=int, default=1)
    parser.add_argument("--newton", action="store_true",
                        help="add damped Newton to the latency candidates")
    parser.add_argument("--newton-samples", type=int, default=0, metavar="N",
                        help="also run the latency strategy with its slowest block on "
                             "damped Newton, on N of the evaluation samples")
    parser.add_argument("--probe", type=int, default=0, metavar="DRAWS",
                        help="only compare the methods on the tough block, DRAWS noise "
                             "draws at batch 1 (damped Newton against Jacobi)")
    parser.add_argument("--uniform-newton", type=int, default=0, metavar="N",
                        help="only compare sequential, Jacobi and damped Newton on every "
                             "block, on N evaluation samples")
    parser.add_argument("--newton-bandwidth", nargs="+", type=_bandwidth, default=[None],
                        metavar="K", help="Jacobian bandwidths for the Newton rows: 'dense' "
                        "or a positive int (the banded approximation; default: dense)")
    parser.add_argument("--out-dir", type=Path, default=CACHE / "auto_strategy")
    parser.add_argument("--name", default=None,
                        help="model name in the output file (default: the checkpoint's "
                             "directory); `--name mnist-p4 --out-dir paper/results` puts "
                             "the table into the paper's section for that model")
    args = parser.parse_args(argv)
    if args.name and len(args.checkpoint) > 1:
        parser.error("--name names one model: pass one --checkpoint with it")
    torch.set_num_threads(1)
    for path in args.checkpoint:
        model = load_model(path).eval()
        name = args.name or path.parent.name
        if args.uniform_newton:
            from .common import write_json

            rows = uniform_probe(model, args.uniform_newton,
                                 bandwidths=args.newton_bandwidth)
            write_json(args.out_dir / f"uniform_newton-{name}.json",
                       {"model": name, "tolerance": TOL, "guidance": GUIDANCE,
                        "threads": 1, "dtype": "float32", "rows": rows}, seed=SEED)
            continue
        if args.probe:
            from .common import write_json

            rows = tough_block_probe(model, args.probe)
            write_json(args.out_dir / f"tough_block-{name}.json",
                       {"model": name, "tolerance": 1e-5, "guidance": GUIDANCE,
                        "batch": 1, "threads": 1, "dtype": "float32", "rows": rows},
                       seed=CALIBRATION_SEED)
            continue
        measure(model, name, args.eval_batch, args.calibration, args.margin,
                args.cost_batch, args.out_dir, args.newton, args.newton_samples,
                args.newton_bandwidth)


if __name__ == "__main__":
    main()

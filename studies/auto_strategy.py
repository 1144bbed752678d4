"""Automatic strategy: per block, the cheapest plan that meets an error budget.

For a target batch size, every block is tried on a calibration batch (its own noise
seed, never the evaluation noise) with candidate plans: sequential, Jacobi, GS-Jacobi
with 2/4/8 modules and triangular Anderson, each at several tolerances, starting from
the initial guess that IGM prefers.  A candidate's time is *predicted* by the measured
cost model from its dependent steps and token evaluations scaled to the target batch.
Each block gets the cheapest candidate whose error against that block's sequential
solution stays within its share of the budget; the assembled strategy is then checked
end to end and the shares are tightened until the final samples meet the budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import fixedpoint as fp
from fixedpoint.quality import deviation
from fixedpoint.tarflow import BlockInverse, BlockPlan, InitialGuess, Sample, Strategy, TarFlow

from .costmodel import CostModel
from .lib import BUDGET, GUIDANCE, noise, sample, sequential_strategy, totals

CALIBRATION_SEED = 1234
TOLERANCES = (1e-2, 3e-3, 1e-3, 3e-4, 1e-4)


@dataclass(frozen=True)
class Choice:
    block: int
    plan: BlockPlan
    error: float
    steps: int
    tokens: int
    predicted_s: float


def candidates(seq_len: int, tol: float) -> list[fp.Method]:
    methods: list[fp.Method] = [fp.Jacobi(atol=tol), fp.TriangularAnderson(atol=tol)]
    methods += [fp.GSJacobi(modules=g, atol=tol) for g in (2, 4, 8) if g < seq_len]
    return methods


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


def choose(model: TarFlow, cost: CostModel, target_batch: int, igm_inits: list[InitialGuess],
           calibration: int = 8, budget: float = BUDGET) -> dict:
    c = model.config
    z, y = noise(model, calibration, seed=CALIBRATION_SEED)
    ref = sample(model, z, y, sequential_strategy(c.blocks))
    inputs = block_inputs(model, ref)
    scale = target_batch / calibration
    share = 1.0 / c.blocks
    rounds = []
    for _ in range(4):
        plans, chosen = [], []
        for k in range(c.blocks):
            fmap = BlockInverse(model, k, inputs[k], y, guidance=GUIDANCE)
            seq = fp.solve(fmap, inputs[k], fp.Sequential())
            best = Choice(k, BlockPlan(fp.Sequential()), 0.0, seq.dependent_steps,
                          seq.token_evals, cost.predict_solve(
                              fp.Sequential(), seq.dependent_steps,
                              int(seq.token_evals * scale)))
            for tol in TOLERANCES:
                for method in candidates(c.seq_len, tol):
                    x0 = igm_inits[k].start(inputs[k])
                    r = fp.solve(fmap, x0, method)
                    err = float((r.x - ref.blocks[k].x).abs().max())
                    if not r.converged.all() or err > budget * share:
                        continue
                    t = cost.predict_solve(method, r.dependent_steps,
                                           int(r.token_evals * scale))
                    if t < best.predicted_s:
                        best = Choice(k, BlockPlan(method, igm_inits[k]), err,
                                      r.dependent_steps, r.token_evals, t)
            chosen.append(best)
            plans.append(best.plan)
        strategy = Strategy(tuple(plans))
        check = sample(model, z, y, strategy)
        dev = deviation(check.x, ref.x)
        rounds.append({"share": share, "deviation": dev, "strategy": strategy.describe()})
        if dev["max_abs"] <= budget:
            break
        share /= 4  # errors grew through later blocks: ask every block for less
    return {
        "strategy": strategy,
        "choices": chosen,
        "rounds": rounds,
        "predicted_s": cost.per_run + sum(ch.predicted_s for ch in chosen),
        "calibration_totals": totals(check),
    }

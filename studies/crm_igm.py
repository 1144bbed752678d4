"""Table 4: CRM and IGM per block, and how well CRM ranks the measured convergence.

CRM (the paper's Convergence Ranking Metric) and IGM (Initial Guessing Metric, in the
paper's batch-mean form and the per-sample form) on a batch of training images with the
training noise added.  The ranking quality is the Spearman correlation between CRM and
the Jacobi iterations each block needs to reach the error budget (from
``studies.convergence``), printed beside the paper's published CRM columns.

    python -m studies.crm_igm --mode fast
"""

from __future__ import annotations

import dataclasses

import torch
from scipy.stats import spearmanr

from fixedpoint.tarflow import crm_igm_table, format_table, select_strategy

from .common import Mode, read_json, study_main, write_json
from .lib import GUIDANCE, SEED, trained

PUBLISHED_CRM = {
    "Img128cond": [5.22, 5.63, 2.47, 10.93, 7.74, 7.35, 56.57, 4.05],
    "AFHQ": [6.33, 6.28, 8.16, 7.94, 9.01, 10.27, 9.36, 42.60],
    "Img64uncond": [50.71, 2.42, 2.29, 3.38, 1.77, 1.33, 33.62, 4.44],
    "Img64cond": [74.58, 4.88, 0.72, 0.96, 4.05, 2.68, 1.62, 10.46],
}
BATCH = {"fast": 64, "full": 512}
# The paper's caps, [Stack-8-32-10]: modules, iterations per module, iterations elsewhere.
PAPER_RULE = {"modules": 8, "gs_max_iter": 32, "jacobi_max_iter": 10}


def paper_rule(table: list, seq_len: int) -> object:
    return select_strategy(table, seq_len=seq_len, modules=min(PAPER_RULE["modules"], seq_len),
                           gs_max_iter=PAPER_RULE["gs_max_iter"],
                           jacobi_max_iter=PAPER_RULE["jacobi_max_iter"])


def run_model(preset: str, mode: Mode) -> dict:
    t = trained(preset, mode)
    model, c = t.model, t.model.config
    g = torch.Generator().manual_seed(SEED)
    idx = torch.randperm(len(t.data.train_x), generator=g)[: BATCH[mode.name]]
    images = t.data.train_x[idx]
    images = images + c.noise_std * torch.randn(images.shape, generator=g)
    labels = t.data.train_y[idx]
    table = crm_igm_table(model, images, labels, guidance=GUIDANCE)
    conv_path = mode.out_dir / f"convergence-{preset}.json"
    iterations = read_json(conv_path)["iterations_to_budget"] if conv_path.exists() else None
    rho = None
    if iterations is not None:
        its = [i if i is not None else c.seq_len + 1 for i in iterations]
        rho = float(spearmanr([r.crm for r in table], its).statistic)
    strategy = paper_rule(table, c.seq_len)
    out = {
        "preset": preset, "batch": len(images), "guidance": GUIDANCE,
        "table": [dataclasses.asdict(r) for r in table],
        "markdown": format_table(table),
        "iterations_to_budget": iterations,
        "spearman_crm_vs_iterations": rho,
        "paper_rule_strategy": strategy.to_spec() or strategy.describe(),
        "paper_rule_description": strategy.describe(),
        "published_crm": PUBLISHED_CRM,
    }
    write_json(mode.out_dir / f"crm_igm-{preset}.json", out, seed=SEED)
    print(out["markdown"])
    print(f"Spearman(CRM, iterations to budget) = {rho}; paper rule: {out['paper_rule_strategy']}")
    return out


def main(argv: list[str] | None = None) -> None:
    study_main(__doc__, run_model, "crm_igm", argv)


if __name__ == "__main__":
    main()

"""The GS-Jacobi paper's per-block diagnostics: CRM and IGM.

* **CRM** (Convergence Ranking Metric) of block ``k``, on a batch of (training) images:

      CRM = ||mean_batch(exp(-a) * x)||_2 * ||W_a||_2 + ||W_mu||_2

  ``x`` is the block's input and ``a`` its log-scale from the forward pass, both in the
  block's permuted order; the first norm is the Frobenius norm of the ``(T, d)`` batch
  mean; ``W_a`` / ``W_mu`` are the two halves (rows ``[:d]`` / ``[d:]``) of the
  out-projection weight, measured by their spectral norms.  Reported also as a
  percentage of the sum over blocks.

* **IGM** (Initial Guessing Metric): with the block's true input ``x_true`` and output
  ``z`` from the forward pass, one Jacobi iterate ``F(x0)`` of the block inverse from a
  candidate start ``x0`` (``z``, or ``z`` with every position but the first zeroed) is
  compared with ``x_true``:

  - paper form: ``||mean_batch(F(x0) - x_true)||_2``.  The batch mean comes before the
    norm, so errors of opposite sign cancel;
  - per-sample form: ``mean_batch ||F(x0) - x_true||_2``, which cannot cancel.  By the
    triangle inequality the paper form is never larger.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .model import TarFlow, wide
from .sampling import BlockInverse, _initial_guess
from .strategy import InitialGuess

__all__ = ["BlockMetrics", "crm_igm_table", "format_table", "igm_paper", "igm_sample"]


@dataclass(frozen=True)
class BlockMetrics:
    """CRM and IGM of one block (forward block index ``block``)."""

    block: int
    crm: float
    crm_percent: float
    igm_paper_noise: float
    igm_paper_zeros: float
    igm_sample_noise: float
    igm_sample_zeros: float


def igm_paper(pred: Tensor, target: Tensor) -> float:
    """``||mean_batch(pred - target)||_2`` over the remaining dimensions."""
    return float(torch.linalg.vector_norm(wide(pred - target).mean(0)))


def igm_sample(pred: Tensor, target: Tensor) -> float:
    """``mean_batch ||pred_b - target_b||_2``."""
    return float(torch.linalg.vector_norm(wide(pred - target).flatten(1), dim=1).mean())


@torch.no_grad()
def crm_igm_table(
    model: TarFlow,
    images: Tensor,
    labels: Tensor | None = None,
    guidance: float = 0.0,
) -> list[BlockMetrics]:
    """CRM and IGM of every block, in forward block order, on ``images`` (B, C, H, W).

    ``images`` are used as given (scale them to [-1, 1]; add the training noise first if
    the statistics should match training inputs).  ``guidance`` is the CFG strength used
    in the IGM's Jacobi iterate (0: the plain inverse, for which ``F(x_true) = x_true``).
    """
    traces = model.block_traces(images, labels)
    d = model.config.token_dim
    crms, igms = [], []
    for k, (block, t) in enumerate(zip(model.blocks, traces)):
        w = wide(block.proj_out.weight)
        spectral_a = torch.linalg.matrix_norm(w[:d], ord=2)
        spectral_mu = torch.linalg.matrix_norm(w[d:], ord=2)
        scaled = (torch.exp(-wide(t.a)) * wide(t.x)).mean(0)
        crms.append(float(torch.linalg.vector_norm(scaled) * spectral_a + spectral_mu))

        fmap = BlockInverse(model, k, t.z, labels, guidance=guidance)
        row = []
        for init in (InitialGuess.NOISE, InitialGuess.ZEROS_AFTER_FIRST):
            pred = fmap(_initial_guess(t.z, init))
            row.append((igm_paper(pred, t.x), igm_sample(pred, t.x)))
        igms.append(row)
    total = sum(crms)
    return [
        BlockMetrics(
            block=k,
            crm=c,
            crm_percent=100.0 * c / total if total > 0 else 100.0 / len(crms),
            igm_paper_noise=row[0][0],
            igm_paper_zeros=row[1][0],
            igm_sample_noise=row[0][1],
            igm_sample_zeros=row[1][1],
        )
        for k, (c, row) in enumerate(zip(crms, igms))
    ]


def format_table(table: Sequence[BlockMetrics], *, digits: int = 3) -> str:
    """A markdown table, one row per block."""
    head = (
        "| block | CRM | CRM % | IGM paper (z) | IGM paper (zeros) | "
        "IGM sample (z) | IGM sample (zeros) |"
    )
    lines = [head, "|" + " --- |" * 7]
    for r in table:
        vals = [r.crm, r.crm_percent, r.igm_paper_noise, r.igm_paper_zeros,
                r.igm_sample_noise, r.igm_sample_zeros]
        cells = [f"{v:.2f}" if i == 1 else f"{v:.{digits}g}" for i, v in enumerate(vals)]
        lines.append(f"| {r.block} | " + " | ".join(cells) + " |")
    return "\n".join(lines)

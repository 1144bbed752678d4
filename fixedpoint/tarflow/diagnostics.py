"""The GS-Jacobi paper's per-block diagnostics (CRM, IGM) and its strategy rule.

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
  compared with ``x_true`` in one of two forms (:class:`IGMForm`):

  - ``PAPER``: ``||mean_batch(F(x0) - x_true)||_2``.  The batch mean comes before the
    norm, so errors of opposite sign cancel;
  - ``PER_SAMPLE``: ``mean_batch ||F(x0) - x_true||_2``, which cannot cancel.  By the
    triangle inequality the paper form is never larger.

:func:`select_strategy` is the paper's rule turning such a table into a
:class:`~fixedpoint.tarflow.strategy.Strategy`.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

import fixedpoint as fp

from .inverse import BlockInverse
from .model import TarFlow, wide
from .strategy import BlockPlan, InitialGuess, Strategy

__all__ = [
    "BlockMetrics",
    "IGMForm",
    "crm_igm_table",
    "format_table",
    "igm_paper",
    "igm_sample",
    "select_strategy",
]


class IGMForm(enum.Enum):
    """Which IGM decides the initial guess (see the module docstring)."""

    PAPER = "paper"  # norm of the batch-mean error, as published
    PER_SAMPLE = "sample"  # mean of the per-sample norms


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

    def igm(self, form: IGMForm, start: InitialGuess) -> float:
        """The IGM of ``form`` for the initial guess ``start``."""
        table = {
            (IGMForm.PAPER, InitialGuess.NOISE): self.igm_paper_noise,
            (IGMForm.PAPER, InitialGuess.ZEROS_AFTER_FIRST): self.igm_paper_zeros,
            (IGMForm.PER_SAMPLE, InitialGuess.NOISE): self.igm_sample_noise,
            (IGMForm.PER_SAMPLE, InitialGuess.ZEROS_AFTER_FIRST): self.igm_sample_zeros,
        }
        return table[form, start]


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
            pred = fmap(init.start(t.z))
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


def select_strategy(
    table: Sequence[BlockMetrics],
    *,
    seq_len: int,
    modules: int = 8,
    gs_max_iter: int = 32,
    jacobi_max_iter: int = 10,
    threshold: float = 1.5,
    igm: IGMForm = IGMForm.PAPER,
    atol: float | None = None,
    rtol: float | None = None,
) -> Strategy:
    """The paper's rule: split CRM-dominant blocks into modules, pick starts by IGM.

    A block is *dominant* when its CRM share exceeds ``threshold`` times the uniform
    share ``100 / K`` percent (default 1.5x: with 8 blocks, above 18.75 %; the published
    tables have one or two blocks at 33-75 % and the rest below 11 %).  Dominant blocks
    get ``GSJacobi(modules, gs_max_iter)``; the others ``Jacobi(jacobi_max_iter)``.
    Every block starts from the candidate with the smaller IGM of form ``igm``; ties
    and non-finite values favour the noise start.
    """
    K = len(table)
    if K == 0:
        raise ValueError("the metrics table is empty")
    if not isinstance(igm, IGMForm):
        raise ValueError(f"igm must be an IGMForm (PAPER or PER_SAMPLE), got {igm!r}")
    if not 1 <= modules <= seq_len:
        raise ValueError(f"modules must be in [1, seq_len={seq_len}], got {modules}")
    if not threshold > 0:
        raise ValueError(f"threshold must be > 0, got {threshold!r}")
    cut = threshold * 100.0 / K
    plans = []
    for row in table:
        if row.crm_percent > cut:
            method: fp.Method = fp.GSJacobi(modules=modules, max_iter=gs_max_iter, atol=atol,
                                            rtol=rtol)
        else:
            method = fp.Jacobi(atol=atol, rtol=rtol, max_iter=jacobi_max_iter)
        noise = _finite_or_inf(row.igm(igm, InitialGuess.NOISE))
        zeros = _finite_or_inf(row.igm(igm, InitialGuess.ZEROS_AFTER_FIRST))
        init = InitialGuess.ZEROS_AFTER_FIRST if zeros < noise else InitialGuess.NOISE
        plans.append(BlockPlan(method, init))
    return Strategy(tuple(plans))


def _finite_or_inf(v: float) -> float:
    return v if math.isfinite(v) else math.inf

"""Damped Newton on the triangular system (DEER with an ELK-style trust region).

``x = F(x)`` with ``F`` strictly causal has a strictly block lower triangular Jacobian
``J = dF/dx``, so the Newton system ``(I - J) dx = F(x) - x`` is unit lower triangular
and forward substitution solves it without any further call of ``F``.  DEER (Lim et
al. 2024) iterates exactly that; far from the solution the linearisation is poor and,
along a long sequence, the substitution compounds it (undamped, the error of a trained
TarFlow block first grows to ~30).  ELK (Gonzalez et al. 2024) damps the step with a
trust region.  Here the trust region bounds the *Newton correction* on top of the
Jacobi step, position by position inside the substitution:

    dx_t = r_t + clip( sum_{s<t} J_ts dx_s, -rho, rho ),      r = F(x) - x,

so ``rho -> 0`` is Jacobi and ``rho -> inf`` is Newton.  Each sample has its own
radius: it doubles when the sample's largest residual shrank since the previous
iteration and is quartered when it grew.

The method lives on the frozen-prefix machinery (:mod:`fixedpoint.methods.sweep`): the
first unsettled position takes the plain value ``F(x)`` and freezes, so the exact prefix
grows by at least one position per iteration and the solve ends within ``T`` iterations
like every triangular method; a non-finite map value stops the sample (NONFINITE, last
finite iterate kept), and a position whose Newton proposal is non-finite takes the
Jacobi value.

Costs.  The Jacobian columns over the unsettled window are ``W x d`` directional
derivatives (forward mode, :func:`torch.func.jvp` under :func:`torch.func.vmap`) of the
full map at the current iterate.  Each direction is one full pass: ``token_evals`` grows
by ``batch x rows_per_sample x positions read by a full call`` per direction.  The
directions are evaluated at the iterate at which ``F`` is evaluated in the same
iteration and depend on nothing else, so on a device wide enough to run them beside
``F`` they add no dependent step; ``dependent_steps`` therefore counts one per
iteration, and the width shows in ``token_evals`` (a wide step is not latency-bound:
compare the two counters before calling Newton fast).  ``refresh = k`` recomputes the
Jacobian every ``k`` iterations and reuses it in between (the chord method), ``k``
times fewer directions for a slower, still safeguarded, convergence.

The map must support forward-mode AD (a torch function of ``x``).  Fused
scaled-dot-product-attention kernels on the CPU have no forward-mode derivative, so the
Jacobian is evaluated with the math attention backend.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import jvp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from .base import Problem
from .linalg import own_precision
from .sweep import PrefixMethod
from .tolerance import ToleranceLike, check_max_iter, check_tolerance

__all__ = ["Newton"]

_GROW, _SHRINK = 2.0, 0.25


@dataclass(frozen=True)
class Newton(PrefixMethod):
    """Damped Newton (DEER with a per-sample trust region on the Newton correction).

    ``radius``: the first trust radius, relative to the sample's largest first residual
    (``0`` gives Jacobi's iterates at Newton's cost, useful only as a check).
    ``refresh``: recompute the Jacobian every ``refresh`` iterations (1: exact Newton).
    ``chunk``: directional derivatives evaluated per vectorised call (memory bound).
    ``atol``/``rtol``/``max_iter``: as for :class:`~fixedpoint.Jacobi`; the stopping test
    is on the residual ``F(x) - x``.
    """

    radius: float = 1.0
    refresh: int = 1
    chunk: int = 64
    atol: ToleranceLike = None
    rtol: ToleranceLike = None
    max_iter: int | None = None

    def __post_init__(self) -> None:
        check_tolerance("atol", self.atol)
        check_tolerance("rtol", self.rtol)
        check_max_iter(self.max_iter)
        if not (isinstance(self.radius, (int, float)) and 0 <= self.radius < float("inf")):
            raise ValueError(f"radius must be a finite number >= 0, got {self.radius!r}")
        for name in ("refresh", "chunk"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")

    def proposer(self, problem: Problem, lo0: int, hi: int) -> _NewtonStep:
        return _NewtonStep(self, problem, lo0, hi)


class _NewtonStep:
    """Per-module state: the trust radii, the last residuals and the Jacobian in use."""

    def __init__(self, method: Newton, problem: Problem, lo0: int, hi: int):
        self.method = method
        self.problem = problem
        self.hi = hi
        self.rho: Tensor | None = None  # (B,) trust radius
        self.last: Tensor | None = None  # (B,) largest residual of the previous iteration
        self.jac: Tensor | None = None  # (B, W, d, W - 1, d) on the window from jac_lo
        self.jac_lo = lo0
        self.age = 0

    def propose(self, x: Tensor, f: Tensor, lo: int, unfrozen: Tensor, first: Tensor) -> Tensor:
        with own_precision(x):
            return self._propose(x, f, lo, unfrozen, first)

    def _propose(self, x: Tensor, f: Tensor, lo: int, unfrozen: Tensor, first: Tensor) -> Tensor:
        width = x.shape[1]
        r = torch.where(unfrozen[..., None], f - x, 0.0)  # frozen positions do not move
        size = r.abs().flatten(1).amax(1)
        size = torch.where(torch.isfinite(size), size, 0.0)
        if self.rho is None:
            self.rho = self.method.radius * size
        else:
            factor = torch.where(size < self.last, _GROW, _SHRINK)
            self.rho = self.rho * factor
        self.last = size
        if width < 2:
            return f
        jac = self._jacobian(lo, lo + width)
        # dx = r + c, with c the clipped Newton correction; the proposal is the Jacobi
        # value plus c (exactly Jacobi's value where c = 0).
        dx = r.clone()
        c = torch.zeros_like(r)
        for t in range(1, width):
            corr = torch.einsum("bejc,bjc->be", jac[:, t, :, :t], dx[:, :t])
            corr = torch.maximum(torch.minimum(corr, self.rho[:, None]), -self.rho[:, None])
            c[:, t] = torch.where(unfrozen[:, t, None], corr, 0.0)
            dx[:, t] += c[:, t]
        proposal = f + c
        fallback = first[..., None] | ~torch.isfinite(proposal)
        return torch.where(fallback, f, proposal)

    def _jacobian(self, lo: int, end: int) -> Tensor:
        """``dF_t / dx_s`` for outputs ``lo <= t < end`` and inputs ``lo <= s < end - 1``:
        ``(B, W, d, W - 1, d)``, fresh or sliced from the one in use."""
        stale = self.jac is None or self.age >= self.method.refresh
        if stale:
            self.jac = _columns(self.problem, lo, end, self.method.chunk)
            self.jac_lo, self.age = lo, 0
        self.age += 1
        off = lo - self.jac_lo
        return self.jac[:, off:, :, off:]


def _columns(problem: Problem, lo: int, end: int, chunk: int) -> Tensor:
    """The Jacobian of ``F(x)[:, lo:end]`` with respect to ``x[:, lo:end-1]`` at the
    iterate, by forward-mode directional derivatives, counted in ``token_evals``."""
    x, fmap = problem.x, problem.fmap
    B, T, d = x.shape
    inputs = end - 1 - lo
    n = inputs * d
    full = fmap.positions_read(0, 0, T, T)
    problem.token_evals += n * B * problem.rows * full

    def window(v: Tensor) -> Tensor:
        moved = torch.cat([x[:, :lo], x[:, lo : end - 1] + v, x[:, end - 1 :]], 1)
        return fmap(moved)[:, lo:end]

    zero = x.new_zeros(B, inputs, d)
    basis = torch.eye(n, dtype=x.dtype, device=x.device).view(n, 1, inputs, d)
    basis = basis.expand(n, B, inputs, d)

    def column(v: Tensor) -> Tensor:
        return jvp(window, (zero,), (v,))[1]

    with sdpa_kernel(SDPBackend.MATH):
        cols = vmap(column, chunk_size=chunk)(basis)  # (n, B, W, d)
    return cols.view(inputs, d, B, end - lo, d).permute(2, 3, 4, 0, 1)

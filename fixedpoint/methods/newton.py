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

Banded maps.  Many maps are Markov (``F(x)_t`` reads only ``x_{t-1}``; a sampler chain
in its Markov form) or banded (``F(x)_t`` reads only ``x_{t-k} .. x_{t-1}``): then only
the ``k`` sub-diagonal blocks of ``J`` are nonzero.  ``bandwidth = k`` colours the input
positions modulo ``k`` and perturbs every position of one colour by the same direction at
once (the Curtis-Powell-Reid compression of a banded Jacobian): output ``t`` sees exactly
one perturbed input within its band, so ``min(k, W - 1) x d`` directions recover every
band block, instead of ``(W - 1) x d``, and the substitution costs ``k`` block products
per position instead of ``t``.  The cost accounting is the dense one with that count.
Nothing checks the band while solving (the compressed derivatives cannot tell a
dependence outside it from one inside): on a map that is not banded as declared, the
contributions of the inputs of one colour are summed into one block, so the Jacobian is
*wrong*.  The result is still the fixed point: the iteration stops on the residual
``F(x) - x`` and freezes positions from plain values, neither of which uses ``J``, so a
wrong Jacobian costs iterations (at most ``T``, as for every triangular method), not
accuracy.  :func:`bandwidth_leak` measures a map's dependence outside a band.

The map must support forward-mode AD (a torch function of ``x``).  Fused
scaled-dot-product-attention kernels on the CPU have no forward-mode derivative, so the
Jacobian is evaluated with the math attention backend.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import jvp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from .base import Problem
from .linalg import own_precision
from .sweep import PrefixMethod
from .tolerance import ToleranceLike, check_max_iter, check_tolerance

__all__ = ["Newton", "bandwidth_leak"]

_GROW, _SHRINK = 2.0, 0.25


@dataclass(frozen=True)
class Newton(PrefixMethod):
    """Damped Newton (DEER with a per-sample trust region on the Newton correction).

    ``radius``: the first trust radius, relative to the sample's largest first residual
    (``0`` gives Jacobi's iterates at Newton's cost, useful only as a check).
    ``refresh``: recompute the Jacobian every ``refresh`` iterations (1: exact Newton).
    ``chunk``: directional derivatives evaluated per vectorised call (memory bound).
    ``bandwidth``: ``k`` declares that ``F(x)_t`` depends only on ``x_{t-k} .. x_{t-1}``
    (1: a Markov map) and takes the Jacobian with ``k x d`` directions instead of
    ``(W - 1) x d``; ``None`` (default) assumes nothing.  A wrong ``k`` gives a wrong
    Jacobian: still the right fixed point, only more iterations (see the module text).
    ``atol``/``rtol``/``max_iter``: as for :class:`~fixedpoint.Jacobi`; the stopping test
    is on the residual ``F(x) - x``.
    """

    radius: float = 1.0
    refresh: int = 1
    chunk: int = 64
    bandwidth: int | None = None
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
        k = self.bandwidth
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 1):
            raise ValueError(f"bandwidth must be None or a positive int, got {k!r}")

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
        # Dense: (B, W, d, W - 1, d) on the window from jac_lo.  Banded (bandwidth k):
        # (B, W, k, d, d), entry [:, t, j] = dF_t / dx_{t-k+j} (zero before the window).
        self.jac: Tensor | None = None
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
        k = self.method.bandwidth
        if k is None:
            dx = r.clone()
            c = torch.zeros_like(r)
        else:
            # dx with k zero rows in front: the inputs of position t are rows t .. t+k-1.
            dx = torch.cat([r.new_zeros(r.shape[0], k, r.shape[2]), r], 1)
            c = torch.zeros_like(dx)
        for t in range(1, width):
            if k is None:
                corr = torch.einsum("bejc,bjc->be", jac[:, t, :, :t], dx[:, :t])
                row = t
            else:
                corr = torch.einsum("bjec,bjc->be", jac[:, t], dx[:, t : t + k])
                row = t + k
            corr = torch.maximum(torch.minimum(corr, self.rho[:, None]), -self.rho[:, None])
            c[:, row] = torch.where(unfrozen[:, t, None], corr, 0.0)
            dx[:, row] += c[:, row]
        if k is not None:
            c = c[:, k:]
        proposal = f + c
        fallback = first[..., None] | ~torch.isfinite(proposal)
        return torch.where(fallback, f, proposal)

    def _jacobian(self, lo: int, end: int) -> Tensor:
        """``dF_t / dx_s`` for outputs ``lo <= t < end`` and inputs ``lo <= s < end - 1``:
        ``(B, W, d, W - 1, d)``, or its band ``(B, W, k, d, d)`` (see :func:`_band`),
        fresh or sliced from the one in use."""
        stale = self.jac is None or self.age >= self.method.refresh
        k = self.method.bandwidth
        if stale:
            if k is None:
                self.jac = _columns(self.problem, lo, end, self.method.chunk)
            else:
                self.jac = _band(self.problem, lo, end, k, self.method.chunk)
            self.jac_lo, self.age = lo, 0
        self.age += 1
        off = lo - self.jac_lo
        if k is not None:
            # Blocks of inputs before the new window start multiply the zero rows in
            # front of dx, so slicing the outputs is enough.
            return self.jac[:, off:]
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


def _band(problem: Problem, lo: int, end: int, k: int, chunk: int) -> Tensor:
    """The ``k`` sub-diagonal blocks of the Jacobian of ``F(x)[:, lo:end]`` with respect
    to ``x[:, lo:end-1]``, ``(B, W, k, d, d)`` with ``[:, t, j] = dF_t / dx_{t-k+j}``
    (zero where that input is before the window), from ``min(k, W - 1) x d`` directions:
    direction ``(colour, i)`` moves component ``i`` of every input of that colour
    (position mod ``k``), and under the band output ``t`` reads exactly one of them."""
    x, fmap = problem.x, problem.fmap
    B, T, d = x.shape
    width, inputs = end - lo, end - 1 - lo
    colours = min(k, inputs)
    full = fmap.positions_read(0, 0, T, T)
    problem.token_evals += colours * d * B * problem.rows * full

    def window(v: Tensor) -> Tensor:
        moved = torch.cat([x[:, :lo], x[:, lo : end - 1] + v, x[:, end - 1 :]], 1)
        return fmap(moved)[:, lo:end]

    pos = torch.arange(inputs, device=x.device)
    paint = (pos[None, :] % colours == torch.arange(colours, device=x.device)[:, None])
    eye = torch.eye(d, dtype=x.dtype, device=x.device)
    basis = paint.to(x.dtype)[:, None, :, None] * eye[None, :, None, :]  # (colour, i, s, d)
    basis = basis.reshape(colours * d, 1, inputs, d).expand(colours * d, B, inputs, d)
    zero = x.new_zeros(B, inputs, d)

    def column(v: Tensor) -> Tensor:
        return jvp(window, (zero,), (v,))[1]

    with sdpa_kernel(SDPBackend.MATH):
        cols = vmap(column, chunk_size=chunk)(basis)  # (colour * d, B, W, d)
    cols = cols.view(colours, d, B, width, d).permute(2, 3, 0, 4, 1)  # (B, W, colour, e, i)
    # Block j of output t is the input s = t - k + j (window-relative, s <= t - 1 <=
    # inputs - 1), of colour s mod colours; an input before the window is a zero block.
    t = torch.arange(width, device=x.device)[:, None]
    s = t - k + torch.arange(k, device=x.device)[None, :]  # (W, k)
    band = cols[:, t, s.clamp(min=0) % colours]  # (B, W, k, e, i)
    return torch.where((s >= 0)[None, :, :, None, None], band, 0.0)


def bandwidth_leak(F: Callable[[Tensor], Tensor], x: Tensor, bandwidth: int) -> float:
    """How far ``F`` depends on inputs outside the band ``bandwidth`` at ``x``.

    Each input position ``s`` is moved alone along a seeded random direction (one
    forward-mode directional derivative each, ``T - 1`` in all); the largest change of an
    output ``t > s + bandwidth`` is divided by the largest change of an output inside the
    band.  A map banded as declared gives 0 exactly (its outputs outside the band do not
    read the moved input); anything else means ``fp.Newton(bandwidth=...)`` uses a wrong
    Jacobian on it (still the right fixed point, but slower).  A spot check at one
    point and along one direction per position, for tests: not a proof.  ``F`` is a
    plain map or an :class:`~fixedpoint.IncrementalMap` (called on the whole ``x``).
    """
    if not isinstance(x, Tensor) or x.ndim != 3 or not x.is_floating_point():
        raise ValueError("bandwidth_leak needs a floating-point tensor x of shape (B, T, d)")
    k = bandwidth
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"bandwidth must be a positive int, got {k!r}")
    B, T, d = x.shape
    if T < 2:
        return 0.0
    g = torch.Generator(device="cpu").manual_seed(0)
    v = torch.randn(T - 1, B, d, generator=g, dtype=torch.float64).to(x.dtype).to(x.device)
    positions = torch.arange(T, device=x.device)
    basis = (positions[None, :, None] == torch.arange(T - 1, device=x.device)[:, None, None])
    tangents = basis.to(x.dtype)[:, None, :, :] * v[:, :, None, :]  # (s, B, T, d)

    def moved(t: Tensor) -> Tensor:
        return jvp(F, (x,), (t,))[1]

    with sdpa_kernel(SDPBackend.MATH):
        out = vmap(moved)(tangents).abs().amax(-1).amax(1)  # (s, T)
    lag = positions[None, :] - torch.arange(T - 1, device=x.device)[:, None]  # t - s
    outside = out[lag > k]
    inside = out[(lag >= 1) & (lag <= k)]
    leak = float(outside.max()) if outside.numel() else 0.0
    scale = float(inside.max()) if inside.numel() else 0.0
    if leak == 0.0:
        return 0.0
    return leak / scale if scale > 0 else float("inf")

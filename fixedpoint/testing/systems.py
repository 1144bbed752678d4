"""Synthetic strictly causal (triangular) systems ``x = F(x)`` with known solutions.

Shared by the tests, the studies and the notebooks; needs no hypothesis.  Random
constructors by name: :data:`RANDOM_SYSTEMS` (the ``kinds`` of the strategies in
:mod:`fixedpoint.testing.strategies`).  Every system is a small object
that is called like a map, ``F(x)`` on tensors of shape ``(B, T, d)``, and knows

* ``batch``, ``length``, ``dim``, ``dtype``, ``device``;
* :meth:`~TriangularSystem.solution`: the unique fixed point, computed by explicit
  forward substitution in this module (an oracle independent of :func:`fixedpoint.solve`);
* :meth:`~TriangularSystem.select`: the same system restricted to some samples, so a
  sample can be solved alone and compared with the batched solve;
* :meth:`~TriangularSystem.noise_guess`: a seeded random initial guess.

Constructors are ``Kind.random(batch, length, dim, *, toughness=..., seed=..., dtype=...,
device=...)``.  Parameters are always drawn in float64 on the CPU from a seeded
:class:`torch.Generator` and then cast, so a float32 and a float64 system built with the
same seed are the same mathematical problem (useful to measure rounding effects).

``toughness`` scales how strongly each position depends on its prefix: 0 makes ``F``
constant (Jacobi converges in one iteration) and larger values make Jacobi need more of
its ``T`` iterations before the error stops mattering.

Systems
-------
* :class:`LinearSystem`: ``x = L x + b`` with ``L`` strictly block-lower-triangular
  (nilpotent), with the exact Jacobi error ``L^k e0``.
* :class:`AffineAutoregressive`: ``x_t = z_t exp(s_t) + m_t`` where ``(s_t, m_t)`` come
  from a tanh MLP on a causal summary of ``x_<t`` (previous position and running mean).
  ``overflow=True`` adds a log-scale term that explodes for large inputs, so bad initial
  guesses overflow to ``inf`` while the true solution stays moderate.
* :class:`AttentionAutoregressive`: the same affine form driven by one causal
  self-attention layer with a right shift (a miniature TarFlow block).  It is also an
  :class:`fixedpoint.IncrementalMap` with a preallocated key/value cache.
* :class:`MarkovSystem`: ``x_t = tanh(x_{t-1} A + c) + z_t``.
* :class:`PoisonedSystem`: a wrapper whose output is non-finite at one sample and
  position, for failure tests.
* :class:`NonCausalSystem`: a wrapper that breaks causality from a given position on.

All maps here are causal *to the bit* (an output never changes, even by rounding, when a
later input changes) and, apart from :class:`LinearSystem` and
:class:`AttentionAutoregressive` (whose dense matrix products multiply later positions by
exact zeros, and ``0 * nan`` is ``nan``), they also keep non-finite values from flowing
backwards.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as nnf
from torch import Tensor

from ..maps import IncrementalMap

__all__ = [
    "TriangularSystem",
    "LinearSystem",
    "AffineAutoregressive",
    "AttentionAutoregressive",
    "AttentionState",
    "MarkovSystem",
    "PoisonedSystem",
    "NonCausalSystem",
    "forward_substitution",
    "RANDOM_SYSTEMS",
    "SYSTEM_KINDS",
]

_F64 = torch.float64


def _generator(seed: int) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(int(seed))
    return g


def _randn(g: torch.Generator, *shape: int) -> Tensor:
    return torch.randn(*shape, generator=g, dtype=_F64)


def _per_sample(op: Callable[..., Tensor], *tensors: Tensor) -> Tensor:
    """``op`` applied to each sample's slices on its own, stacked back into a batch.

    A product over the whole batch lets the kernel depend on the batch size: ``a @ w``
    folds the batch into the rows of one ``(B*n, k) x (k, m)`` product, batched products
    (``bmm``) and ``scaled_dot_product_attention`` split their work by batch size and
    thread count, and BLAS picks its kernel (and so the rounding) by those shapes.  A
    sample's result then changes in the last bits with the batch it sits in.  One call
    per sample, on a fresh contiguous copy of its slices, gives a sample alone and in any
    batch the same bits: same shapes, same strides and the same memory alignment (a
    sample's row inside a batch can start at an address that is not a multiple of the
    vector width, and the vectorised kernels then split the sum differently: measured on
    a linear system with ``T * d = 85``, every odd sample was off by one ulp).  Checked
    in tests/test_systems.py for ``B = 1..8``; ``B`` is small in the tests, so the loop
    costs little.
    """
    batch = tensors[0].shape[0]
    return torch.stack(
        [op(*(t[b].clone(memory_format=torch.contiguous_format) for t in tensors))
         for b in range(batch)]
    )


def _matmul(a: Tensor, w: Tensor) -> Tensor:
    """``a @ w`` for ``a`` of shape ``(B, n, k)`` and a shared ``w`` of shape ``(k, m)``,
    one sample at a time (see :func:`_per_sample`)."""
    return _per_sample(lambda a_b: a_b @ w, a)


def _attention(q: Tensor, k: Tensor, v: Tensor, visible: Tensor) -> Tensor:
    """Softmax attention of ``q`` ``(B, H, n, e)`` over ``k, v`` ``(B, H, m, e)`` where the
    ``(n, m)`` bool mask ``visible`` allows it, one sample at a time (see
    :func:`_per_sample`; ``scaled_dot_product_attention`` rounds a sample differently in
    different batches, measured with 2 threads in float32)."""
    scale = 1.0 / math.sqrt(q.shape[-1])

    def one(q_b: Tensor, k_b: Tensor, v_b: Tensor) -> Tensor:
        scores = (q_b @ k_b.transpose(-1, -2)) * scale
        return torch.softmax(scores.masked_fill(~visible, -math.inf), dim=-1) @ v_b

    return _per_sample(one, q, k, v)


def _check_sizes(batch: int, length: int, dim: int) -> None:
    for name, v in (("batch", batch), ("length", length), ("dim", dim)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")


def _check_dtype(dtype: torch.dtype) -> None:
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch dtype, got {dtype!r}")


def forward_substitution(F: Any, like: Tensor) -> Tensor:
    """The solution of ``x = F(x)`` by forward substitution: ``x_t = F(x)_t``, ``t = 0..T-1``.

    Uses only full evaluations of ``F`` (``T`` of them) on a tensor shaped like ``like``
    (whose values are ignored), so it is independent of :func:`fixedpoint.solve`.  Valid
    for any strictly causal ``F``; positions not yet computed hold zeros.
    """
    x = torch.zeros_like(like)
    with torch.no_grad():
        for t in range(x.shape[1]):
            x[:, t] = F(x)[:, t]
    return x


class TriangularSystem:
    """Base class: a batch of ``B`` strictly causal systems on ``T`` positions of size ``d``.

    Subclasses hold per-sample tensors (with leading batch dimension) listed in
    ``_per_sample`` and shared parameters otherwise; :meth:`select` slices the former.
    """

    _per_sample: tuple[str, ...] = ()
    batch: int
    length: int
    dim: int
    dtype: torch.dtype
    device: torch.device

    # -- the map ---------------------------------------------------------------------
    def __call__(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _check_input(self, x: Tensor) -> int:
        """Validate ``x`` and return its length (any prefix length ``<= T`` is allowed)."""
        if not isinstance(x, Tensor) or x.ndim != 3:
            raise ValueError(f"{type(self).__name__} expects a (B, T, d) tensor")
        b, t, d = x.shape
        if b != self.batch or d != self.dim or not 1 <= t <= self.length:
            raise ValueError(
                f"{type(self).__name__} expects shape ({self.batch}, <= {self.length}, "
                f"{self.dim}), got {tuple(x.shape)}"
            )
        if x.dtype != self.dtype:
            raise TypeError(f"{type(self).__name__} expects dtype {self.dtype}, got {x.dtype}")
        return t

    # -- solutions and guesses --------------------------------------------------------
    def _solve(self) -> Tensor:
        """Forward substitution on growing prefixes: ``x_t = F(x_{0..t})_t``.

        Maps here accept any prefix length; evaluating prefixes costs about a third of
        ``T`` full evaluations for attention.  Subclasses may use an explicit recurrence.
        """
        x = self.empty()
        with torch.no_grad():
            for t in range(self.length):
                x[:, t] = self(x[:, : t + 1])[:, t]
        return x

    def solution(self) -> Tensor:
        """The unique fixed point, by forward substitution (cached; a fresh copy is returned)."""
        cached = self.__dict__.get("_solution")
        if cached is None:
            cached = self._solve()
            self.__dict__["_solution"] = cached
        return cached.clone()

    def empty(self) -> Tensor:
        return torch.zeros(self.shape, dtype=self.dtype, device=self.device)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.batch, self.length, self.dim)

    def noise_guess(self, scale: float = 1.0, seed: int = 0) -> Tensor:
        """A seeded Gaussian initial guess of standard deviation ``scale``."""
        g = _generator(seed)
        return (scale * _randn(g, *self.shape)).to(self.dtype).to(self.device)

    # -- sub-batches -------------------------------------------------------------------
    def select(self, index: int | Sequence[int] | Tensor) -> TriangularSystem:
        """The same system restricted to the samples ``index`` (shared parameters kept)."""
        if isinstance(index, int):
            index = [index]
        idx = torch.as_tensor(index, dtype=torch.long, device=self.device).reshape(-1)
        new = copy.copy(self)
        new.__dict__.pop("_solution", None)
        for name in self._per_sample:
            setattr(new, name, getattr(self, name)[idx])
        new.batch = int(idx.numel())
        return new

    def __repr__(self) -> str:
        extra = getattr(self, "_repr_extra", "")
        return (
            f"{type(self).__name__}(batch={self.batch}, length={self.length}, dim={self.dim}, "
            f"dtype={self.dtype}{extra})"
        )


def _finish(system: TriangularSystem, batch, length, dim, dtype, device) -> None:
    system.batch, system.length, system.dim = batch, length, dim
    system.dtype = dtype
    system.device = torch.device(device) if device is not None else torch.device("cpu")


def _cast(t: Tensor, dtype: torch.dtype, device: Any) -> Tensor:
    return t.to(dtype=dtype, device=device)


# ----------------------------------------------------------------------------------------
# Linear
# ----------------------------------------------------------------------------------------
class LinearSystem(TriangularSystem):
    """``x = L x + b`` with ``L`` strictly block-lower-triangular over positions.

    ``L`` is a ``(T*d, T*d)`` matrix shared by the batch whose ``(t, s)`` block of size
    ``d x d`` is zero unless ``s < t`` (and ``t - s <= bandwidth`` if given), so ``L`` is
    nilpotent.  ``b`` is per sample, ``(B, T, d)``.  Jacobi's error obeys ``e_k = L^k e_0``
    exactly in exact arithmetic: :meth:`jacobi_error`.
    """

    _per_sample = ("b",)

    def __init__(self, L: Tensor, b: Tensor):
        if b.ndim != 3:
            raise ValueError("b must have shape (B, T, d)")
        B, T, d = b.shape
        n = T * d
        if L.shape != (n, n):
            raise ValueError(f"L must have shape ({n}, {n}), got {tuple(L.shape)}")
        pos = torch.arange(n, device=L.device) // d
        if bool((L[pos[:, None] <= pos[None, :]] != 0).any()):
            raise ValueError("L must be strictly block-lower-triangular (zero diagonal blocks)")
        self.L, self.b = L, b
        _finish(self, B, T, d, b.dtype, b.device)

    @classmethod
    def random(
        cls,
        batch: int,
        length: int,
        dim: int,
        *,
        toughness: float = 0.5,
        bandwidth: int | None = None,
        seed: int = 0,
        dtype: torch.dtype = _F64,
        device: Any = None,
    ) -> LinearSystem:
        """Gaussian blocks, each row scaled so its norm is about ``toughness``."""
        _check_sizes(batch, length, dim)
        _check_dtype(dtype)
        g = _generator(seed)
        n = length * dim
        pos = torch.arange(n) // dim
        lag = pos[:, None] - pos[None, :]
        mask = lag > 0
        if bandwidth is not None:
            mask &= lag <= bandwidth
        L = _randn(g, n, n) * mask
        count = mask.sum(1, keepdim=True).clamp(min=1)
        L = toughness * L / count.sqrt()
        b = _randn(g, batch, length, dim)
        sys = cls(_cast(L, dtype, device), _cast(b, dtype, device))
        sys.toughness = float(toughness)
        sys._repr_extra = f", toughness={toughness}"
        return sys

    def __call__(self, x: Tensor) -> Tensor:
        t = self._check_input(x)
        n = t * self.dim
        # One product per sample, so results are batch-independent to the bit.
        flat = _matmul(x.reshape(self.batch, 1, n), self.L[:n, :n].T)
        return flat.reshape(self.batch, t, self.dim) + self.b[:, :t]

    def _solve(self) -> Tensor:
        B, T, d = self.shape
        x = torch.empty(B, T * d, dtype=self.dtype, device=self.device)
        b = self.b.reshape(B, T * d)
        for t in range(T):
            rows = slice(t * d, (t + 1) * d)
            block = self.L[rows, : t * d].T
            x[:, rows] = b[:, rows] + _matmul(x[:, None, : t * d], block)[:, 0]
        return x.reshape(B, T, d)

    def jacobi_error(self, e0: Tensor, k: int) -> Tensor:
        """``L^k e0``: the error of the Jacobi iterate after ``k`` steps from error ``e0``."""
        B, T, d = e0.shape
        e = e0.reshape(B, T * d)
        for _ in range(k):
            e = e @ self.L.T
        return e.reshape(B, T, d)


# ----------------------------------------------------------------------------------------
# Affine autoregressive (MLP on a causal summary)
# ----------------------------------------------------------------------------------------
class AffineAutoregressive(TriangularSystem):
    """``x_t = z_t * exp(s_t) + m_t`` with ``(s_t, m_t)`` from a tanh MLP on ``x_<t``.

    The MLP input at position ``t`` is ``[x_{t-1}, mean(x_0..x_{t-1})]`` (zeros at ``t = 0``).
    ``s_t = scale_cap * tanh(.)`` is bounded and ``m_t = toughness * (.)``; so ``F`` is
    bounded and smooth.  With ``overflow=True``, ``s_t`` gains
    ``softplus(mean_d(x_{t-1}^2) - radius^2)``: negligible on the true solution (checked
    at construction), but a guess with entries far above ``radius`` makes ``exp`` overflow.
    """

    _per_sample = ("z",)

    def __init__(self, z, W1, b1, Ws, bs, Wm, bm, *, scale_cap, overflow=False, radius=10.0):
        self.z, self.W1, self.b1, self.Ws, self.bs, self.Wm, self.bm = z, W1, b1, Ws, bs, Wm, bm
        self.scale_cap = float(scale_cap)
        self.overflow = bool(overflow)
        self.radius = float(radius)
        B, T, d = z.shape
        _finish(self, B, T, d, z.dtype, z.device)

    @classmethod
    def random(
        cls,
        batch: int,
        length: int,
        dim: int,
        *,
        toughness: float = 1.0,
        hidden: int = 16,
        overflow: bool = False,
        radius: float = 10.0,
        seed: int = 0,
        dtype: torch.dtype = _F64,
        device: Any = None,
    ) -> AffineAutoregressive:
        _check_sizes(batch, length, dim)
        _check_dtype(dtype)
        g = _generator(seed)
        z = _randn(g, batch, length, dim)
        W1 = _randn(g, 2 * dim, hidden) / math.sqrt(2 * dim)
        b1 = 0.5 * _randn(g, hidden)
        Ws = _randn(g, hidden, dim) / math.sqrt(hidden)
        bs = 0.2 * _randn(g, dim)
        Wm = _randn(g, hidden, dim) / math.sqrt(hidden)
        bm = 0.2 * _randn(g, dim)
        c = lambda t: _cast(t, dtype, device)  # noqa: E731
        sys = cls(
            c(z),
            c(W1),
            c(b1),
            c(Ws),
            c(bs),
            c(toughness * Wm),
            c(toughness * bm),
            scale_cap=0.5 * min(1.0, toughness),
            overflow=overflow,
            radius=radius,
        )
        sys.toughness = float(toughness)
        sys._repr_extra = f", toughness={toughness}, overflow={overflow}"
        if overflow:
            sol = sys.solution()
            if not bool((sol.pow(2).mean(-1) < 0.25 * radius**2).all()):
                raise ValueError(
                    "overflow system: the solution is not well inside the radius; "
                    "use a smaller toughness or a larger radius"
                )
        return sys

    def __call__(self, x: Tensor) -> Tensor:
        t = self._check_input(x)
        B, _, d = x.shape
        zero = x.new_zeros(B, 1, d)
        prev = torch.cat([zero, x[:, : t - 1]], dim=1)
        csum = torch.cat([zero, torch.cumsum(x[:, : t - 1], dim=1)], dim=1)
        count = torch.arange(t, device=x.device, dtype=x.dtype).clamp(min=1)[None, :, None]
        feats = torch.cat([prev, csum / count], dim=-1)
        h = torch.tanh(_matmul(feats, self.W1) + self.b1)
        s = self.scale_cap * torch.tanh(_matmul(h, self.Ws) + self.bs)
        if self.overflow:
            s = s + nnf.softplus(prev.pow(2).mean(-1, keepdim=True) - self.radius**2)
        m = _matmul(h, self.Wm) + self.bm
        return self.z[:, :t] * torch.exp(s) + m


# ----------------------------------------------------------------------------------------
# Attention autoregressive (a miniature TarFlow block), plain and incremental
# ----------------------------------------------------------------------------------------
@dataclass
class AttentionState:
    """Key/value cache of :class:`AttentionAutoregressive`.

    Entry ``j`` of ``hidden``/``keys``/``values`` belongs to the shifted position ``j``,
    whose input is ``x_{j-1}`` (entry 0 is the start token, filled at creation).  Entries
    ``0..committed`` are final; later entries are scratch space for the current window.
    """

    hidden: Tensor  # (B, T, D)
    keys: Tensor  # (B, H, T, D/H)
    values: Tensor  # (B, H, T, D/H)
    committed: int = 0


class AttentionAutoregressive(TriangularSystem, IncrementalMap):
    """``x_t = z_t exp(s_t) + m_t`` with ``(s_t, m_t)`` from one causal attention layer.

    Shifted inputs ``u_0 = start``, ``u_t = x_{t-1} W_in + b_in`` plus a positional
    embedding; one causal multi-head self-attention layer with a residual connection and
    a tanh, ``g = tanh(u + attn(u) W_o)``; then ``s = scale_cap * tanh(g W_s)`` and
    ``m = toughness * (g W_m + b_m)`` (so ``F`` is bounded).  Output
    ``t`` reads input ``t - 1`` (the right shift), which :meth:`positions_read` counts.

    As an :class:`~fixedpoint.IncrementalMap` it keeps a preallocated key/value cache
    (:class:`AttentionState`); :meth:`plain` returns a plain-callable view of the same
    map, to compare the incremental and the full evaluation paths.
    """

    _per_sample = ("z",)

    def __init__(self, z, params: dict[str, Tensor], *, heads: int, scale_cap: float):
        self.z = z
        self.params = params
        self.heads = int(heads)
        self.scale_cap = float(scale_cap)
        B, T, d = z.shape
        _finish(self, B, T, d, z.dtype, z.device)

    @classmethod
    def random(
        cls,
        batch: int,
        length: int,
        dim: int,
        *,
        toughness: float = 1.0,
        width: int = 16,
        heads: int = 2,
        seed: int = 0,
        dtype: torch.dtype = _F64,
        device: Any = None,
    ) -> AttentionAutoregressive:
        _check_sizes(batch, length, dim)
        _check_dtype(dtype)
        if width % heads:
            raise ValueError(f"width={width} must be divisible by heads={heads}")
        g = _generator(seed)
        D = width
        z = _randn(g, batch, length, dim)
        p = {
            "W_in": _randn(g, dim, D) / math.sqrt(dim),
            "b_in": 0.1 * _randn(g, D),
            "start": _randn(g, D),
            "pos": 0.5 * _randn(g, length, D),
            "Wq": _randn(g, D, D) / math.sqrt(D),
            "Wk": _randn(g, D, D) / math.sqrt(D),
            "Wv": _randn(g, D, D) / math.sqrt(D),
            "Wo": _randn(g, D, D) / math.sqrt(D),
            "Ws": _randn(g, D, dim) / math.sqrt(D),
            "Wm": toughness * _randn(g, D, dim) / math.sqrt(D),
            "bm": toughness * 0.2 * _randn(g, dim),
        }
        p = {k: _cast(v, dtype, device) for k, v in p.items()}
        sys = cls(_cast(z, dtype, device), p, heads=heads, scale_cap=0.5 * min(1.0, toughness))
        sys.toughness = float(toughness)
        sys._repr_extra = f", toughness={toughness}"
        return sys

    # -- pieces shared by both paths ---------------------------------------------------
    def _split(self, h: Tensor) -> Tensor:
        B, n, D = h.shape
        return h.reshape(B, n, self.heads, D // self.heads).transpose(1, 2)

    def _merge(self, a: Tensor) -> Tensor:
        B, H, n, dh = a.shape
        return a.transpose(1, 2).reshape(B, n, H * dh)

    def _shifted(self, x_prev: Tensor, first: int) -> Tensor:
        """Hidden inputs of shifted positions ``first..first+n-1`` from ``x_{first-1}..``."""
        p = self.params
        n = x_prev.shape[1]
        return _matmul(x_prev, p["W_in"]) + p["b_in"] + p["pos"][first : first + n]

    def _head(self, hidden: Tensor, attn: Tensor, lo: int, hi: int) -> Tensor:
        p = self.params
        g = torch.tanh(hidden + _matmul(self._merge(attn), p["Wo"]))
        s = self.scale_cap * torch.tanh(_matmul(g, p["Ws"]))
        m = _matmul(g, p["Wm"]) + p["bm"]
        return self.z[:, lo:hi] * torch.exp(s) + m

    def _start(self, B: int) -> Tensor:
        p = self.params
        return (p["start"] + p["pos"][0]).expand(B, 1, -1)

    # -- full evaluation -------------------------------------------------------------------
    def __call__(self, x: Tensor) -> Tensor:
        t = self._check_input(x)
        p = self.params
        h = torch.cat([self._start(x.shape[0]), self._shifted(x[:, : t - 1], 1)], dim=1)
        q, k, v = (self._split(_matmul(h, p[w])) for w in ("Wq", "Wk", "Wv"))
        visible = torch.arange(t, device=x.device)
        attn = _attention(q, k, v, visible[None, :] <= visible[:, None])
        return self._head(h, attn, 0, t)

    def plain(self):
        """A plain callable (not an IncrementalMap) computing the same map."""
        return lambda x: self(x)

    # -- incremental evaluation -------------------------------------------------------------
    def init_state(self, x: Tensor) -> AttentionState:
        self._check_input(x)
        B, T, D, H = self.batch, self.length, self.params["Wq"].shape[0], self.heads
        hidden = x.new_zeros(B, T, D)
        hidden[:, :1] = self._start(B)
        keys = x.new_zeros(B, H, T, D // H)
        values = x.new_zeros(B, H, T, D // H)
        keys[:, :, :1] = self._split(_matmul(hidden[:, :1], self.params["Wk"]))
        values[:, :, :1] = self._split(_matmul(hidden[:, :1], self.params["Wv"]))
        return AttentionState(hidden, keys, values, 0)

    def committed(self, state: AttentionState) -> int:
        return state.committed

    def positions_read(self, committed: int, lo: int, hi: int, length: int) -> int:
        # The right shift: outputs lo..hi-1 need inputs up to hi-2; committed.. are new.
        return max(hi - 1 - committed, 0)

    def advance(self, state: AttentionState, x: Tensor, lo: int, hi: int) -> Tensor:
        T = self._check_input(x)
        if T != self.length:
            raise ValueError(f"advance needs the full sequence, got length {T}")
        n = state.committed
        if not 0 <= n <= lo < hi <= T:
            raise ValueError(f"advance needs committed <= lo < hi <= T, got {n}, {lo}, {hi}, {T}")
        p = self.params
        # Shifted positions n+1 .. hi-1 read inputs x_n .. x_{hi-2}: the only new work.
        if hi - 1 > n:
            h_new = self._shifted(x[:, n : hi - 1], n + 1)
            state.hidden[:, n + 1 : hi] = h_new
            state.keys[:, :, n + 1 : hi] = self._split(_matmul(h_new, p["Wk"]))
            state.values[:, :, n + 1 : hi] = self._split(_matmul(h_new, p["Wv"]))
        state.committed = lo
        h = state.hidden[:, lo:hi]
        q = self._split(_matmul(h, p["Wq"]))
        keys = torch.arange(hi, device=x.device)
        mask = keys[None, :] <= torch.arange(lo, hi, device=x.device)[:, None]
        attn = _attention(q, state.keys[:, :, :hi], state.values[:, :, :hi], mask)
        return self._head(h, attn, lo, hi)


# ----------------------------------------------------------------------------------------
# Markov
# ----------------------------------------------------------------------------------------
class MarkovSystem(TriangularSystem):
    """``x_t = tanh(x_{t-1} A + c) + z_t`` with ``x_{-1} = 0``; ``A = toughness * G / sqrt(d)``."""

    _per_sample = ("z",)

    def __init__(self, A: Tensor, c: Tensor, z: Tensor):
        self.A, self.c, self.z = A, c, z
        B, T, d = z.shape
        _finish(self, B, T, d, z.dtype, z.device)

    @classmethod
    def random(
        cls,
        batch: int,
        length: int,
        dim: int,
        *,
        toughness: float = 1.0,
        seed: int = 0,
        dtype: torch.dtype = _F64,
        device: Any = None,
    ) -> MarkovSystem:
        _check_sizes(batch, length, dim)
        _check_dtype(dtype)
        g = _generator(seed)
        A = toughness * _randn(g, dim, dim) / math.sqrt(dim)
        c = 0.5 * _randn(g, dim)
        z = 0.5 * _randn(g, batch, length, dim)
        sys = cls(*(_cast(v, dtype, device) for v in (A, c, z)))
        sys.toughness = float(toughness)
        sys._repr_extra = f", toughness={toughness}"
        return sys

    def __call__(self, x: Tensor) -> Tensor:
        t = self._check_input(x)
        prev = torch.cat([x.new_zeros(x.shape[0], 1, self.dim), x[:, : t - 1]], dim=1)
        return torch.tanh(_matmul(prev, self.A) + self.c) + self.z[:, :t]

    def _solve(self) -> Tensor:
        x = self.empty()
        prev = x.new_zeros(self.batch, self.dim)
        for t in range(self.length):
            prev = torch.tanh(_matmul(prev[:, None], self.A)[:, 0] + self.c) + self.z[:, t]
            x[:, t] = prev
        return x


# ----------------------------------------------------------------------------------------
# Failure variants
# ----------------------------------------------------------------------------------------
class PoisonedSystem(TriangularSystem):
    """``base`` with ``F(x)[sample, position]`` replaced by ``value`` (``nan`` or ``inf``).

    ``sample`` and ``position`` may be ints or equally long sequences (one poisoned
    position per listed sample).  The solution is non-finite for a poisoned sample from
    its position on and equal to the base solution elsewhere, provided the base keeps
    non-finite values from flowing backwards (use :class:`AffineAutoregressive` or
    :class:`MarkovSystem`); the other samples are untouched whatever the base.
    """

    def __init__(
        self,
        base: TriangularSystem,
        sample: int | Sequence[int] = 0,
        position: int | Sequence[int] = 0,
        value: float = float("nan"),
    ):
        samples = [sample] if isinstance(sample, int) else list(sample)
        positions = [position] if isinstance(position, int) else list(position)
        if len(samples) != len(positions) or not samples:
            raise ValueError("give one position per poisoned sample")
        if any(not 0 <= b < base.batch for b in samples) or len(set(samples)) < len(samples):
            raise ValueError(f"samples must be distinct, in 0..{base.batch - 1}: {samples}")
        if any(not 0 <= t < base.length for t in positions):
            raise ValueError(f"positions must be in 0..{base.length - 1}: {positions}")
        if math.isfinite(value):
            raise ValueError("value must be nan or +-inf")
        self.base, self.value = base, value
        self.poisoned = dict(zip(samples, positions))
        self.sample, self.position = samples[0], positions[0]
        _finish(self, base.batch, base.length, base.dim, base.dtype, base.device)

    def __call__(self, x: Tensor) -> Tensor:
        y = self.base(x)
        hits = [(b, t) for b, t in self.poisoned.items() if t < x.shape[1]]
        if hits:
            y = y.clone()
            for b, t in hits:
                y[b, t] = self.value
        return y

    def select(self, index):
        raise NotImplementedError("PoisonedSystem does not support select()")


class NonCausalSystem(TriangularSystem):
    """``base`` plus a dependence that breaks strict causality from ``position`` on.

    ``F(x)_t += weight * tanh(x_{t + lookahead})`` for ``t >= position`` (and
    ``t + lookahead < T``): ``lookahead=0`` reads the output's own position (a map that
    forgot its right shift), ``lookahead=1`` the next one.  Either way the first
    offending output is ``position``, and the input it reads is ``position + lookahead``.
    There is no :meth:`solution`.
    """

    def __init__(
        self, base: TriangularSystem, position: int = 0, *, lookahead: int = 0,
        weight: float = 0.5,
    ):
        if isinstance(lookahead, bool) or not isinstance(lookahead, int) or lookahead < 0:
            raise ValueError(f"lookahead must be an int >= 0, got {lookahead!r}")
        last = base.length - 1 - lookahead
        if not 0 <= position <= last:
            raise ValueError(f"position must be in 0..{last} for lookahead={lookahead}")
        self.base, self.position, self.lookahead, self.weight = base, position, lookahead, weight
        _finish(self, base.batch, base.length, base.dim, base.dtype, base.device)

    def __call__(self, x: Tensor) -> Tensor:
        y = self.base(x).clone()
        p, a = self.position, self.lookahead
        end = x.shape[1] - a  # outputs p .. end-1 read inputs p+a .. end-1+a
        if p < end:
            y[:, p:end] += self.weight * torch.tanh(x[:, p + a : end + a])
        return y

    def _solve(self) -> Tensor:
        raise ValueError("a non-causal system has no forward-substitution solution")

    def select(self, index):
        return NonCausalSystem(
            self.base.select(index), self.position, lookahead=self.lookahead, weight=self.weight
        )


# ----------------------------------------------------------------------------------------
# Kinds, for the hypothesis strategies
# ----------------------------------------------------------------------------------------
RANDOM_SYSTEMS: dict[str, Callable[..., TriangularSystem]] = {
    "linear": LinearSystem.random,
    "affine": AffineAutoregressive.random,
    "attention": AttentionAutoregressive.random,
    "markov": MarkovSystem.random,
}
"""Name -> random constructor ``(batch, length, dim, *, toughness, seed, dtype, device)``:
the ``kinds`` a strategy (:func:`fixedpoint.testing.strategies.systems`) may draw."""

SYSTEM_KINDS = tuple(RANDOM_SYSTEMS)

"""A sampler chain as a strictly causal system over the step index.

Position ``n`` (``0 <= n < N``) of the unknown holds the state *after* step ``n``, the
whole image flattened into one token of ``d`` numbers, so the unknown has shape
``(B, N, d)`` and the solver core applies unchanged.  The state before step ``n`` is
``s_n``: the initial noise ``x_init`` for ``n = 0``, else position ``n - 1``.

Two fixed-point forms with the same solution (up to rounding):

* :class:`MarkovMap`, ``F(x)_n = Phi_n(s_n)``.  Jacobi on it moves information one step
  per iteration: after ``k`` iterations position ``n > k`` is the composition of ``k``
  steps applied to the *guess* at ``n - k``.  A probability-flow sampler is a
  near-identity, non-contractive map (the flow is invertible: it never forgets its
  start), so that error survives until the wavefront arrives and Jacobi needs about
  ``N`` iterations.
* :class:`PicardMap`, the integral form.  Write ``Phi_m(s) = a_m s + b_m(s)`` with the
  chain's linear part ``a_m``, ``A_n = a_0 ... a_{n-1}``; then exactly
  ``F(x)_n = A_{n+1} (x_init + sum_{m <= n} b_m(s_m) / A_{m+1})``.
  Every position sees the whole prefix at once; an error ``e`` in the inputs reaches
  ``F(x)_n`` only through the increments' derivatives ``b_m'``, of the order of the
  step size, summed along the chain.  So the iteration matrix is small (of the order of
  the time horizon times the Lipschitz constant of the drift), and its ``k``-th power
  shrinks like ``(L t)^k / k!``: Picard converges geometrically, independent of ``N``.
  For DDIM this is the ``sigma``-parametrised Euler sum that ParaDiGMS iterates.

Both are :class:`fixedpoint.IncrementalMap` s.  :meth:`advance` evaluates a window of
steps as **one batched network call** (two for Heun): the rows of all samples and all
steps in the window go through the noise predictor together.  The Markov form reads the
``hi - lo`` states of the window; the Picard form also re-reads the states committed
since its last call, and keeps the sum of the committed increments as its state.

Classifier-free guidance runs inside the map: conditional and unconditional rows share
the call, so one row per sample and step costs :attr:`rows_per_sample` network rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from ..maps import IncrementalMap
from .chain import Chain

__all__ = ["ChainMap", "Denoiser", "MarkovMap", "NetworkCount", "PicardMap"]


class Denoiser(Protocol):
    """A noise predictor: ``eps = denoiser(x (R, *sample_shape), timesteps (R,), labels)``.

    ``num_classes`` is ``None`` for an unconditional model; a conditional one takes the
    label ``null_label`` as "no class" (classifier-free guidance).
    """

    sample_shape: tuple[int, ...]
    num_classes: int | None
    null_label: int | None

    def __call__(self, x: Tensor, timesteps: Tensor, labels: Tensor | None) -> Tensor: ...


@dataclass
class NetworkCount:
    """Network calls of one map since its last :meth:`ChainMap.init_state` (the start of
    a solve); full calls (``fmap(x)``, e.g. Newton's Jacobian directions) add to it."""

    calls: int = 0  # batched calls of the noise predictor (each one waits on the last)
    rows: int = 0  # rows pushed through it (CFG doubles them)


class ChainMap(IncrementalMap):
    """What both forms share: validation, guidance and the batched step evaluation."""

    def __init__(
        self,
        chain: Chain,
        denoiser: Denoiser,
        x_init: Tensor,
        noise: Tensor | None = None,
        *,
        labels: Tensor | None = None,
        guidance: float | None = None,
    ):
        shape = tuple(denoiser.sample_shape)
        if not isinstance(x_init, Tensor) or not x_init.is_floating_point():
            raise TypeError("x_init must be a floating-point tensor")
        if tuple(x_init.shape[1:]) != shape:
            raise ValueError(
                f"x_init has sample shape {tuple(x_init.shape[1:])}, but the model takes {shape}"
            )
        if not bool(torch.isfinite(x_init).all()):
            raise ValueError("x_init contains non-finite values")
        batch, steps = x_init.shape[0], len(chain)
        if chain.stochastic:
            want = (batch, steps, *shape)
            if noise is None:
                raise ValueError(f"{chain.name} needs noise of shape {want} drawn in advance")
            if tuple(noise.shape) != want:
                raise ValueError(f"noise must have shape {want}, got {tuple(noise.shape)}")
            if not bool(torch.isfinite(noise).all()):
                raise ValueError("noise contains non-finite values")
            self.noise = noise.to(x_init.dtype).reshape(batch, steps, -1)
        else:
            if noise is not None:
                raise ValueError(f"{chain.name} is deterministic; it takes no noise")
            self.noise = None
        self.labels, self.guidance = _check_conditioning(denoiser, labels, guidance, batch)
        self.chain = chain
        self.denoiser = denoiser
        self.sample_shape = shape
        self.x_init = x_init.reshape(batch, -1)
        self.batch, self.steps, self.dim = batch, steps, self.x_init.shape[1]
        self.rows_per_sample = 2 if self.guidance is not None else 1
        self.count = NetworkCount()
        self.linear = chain.linear

    # ---------------------------------------------------------------- helpers
    def initial_guess(self) -> Tensor:
        """Every position starts at the initial noise (as in ParaDiGMS)."""
        return self.x_init[:, None, :].expand(self.batch, self.steps, self.dim).clone()

    def final(self, x: Tensor) -> Tensor:
        """The sample: the last position of a solution, shaped like ``x_init``."""
        return x[:, -1].reshape(self.batch, *self.sample_shape)

    def _eps(self, labels: Tensor | None) -> Any:
        def eps(x: Tensor, t: Tensor, subset: Tensor | None = None) -> Tensor:
            rows = x.shape[0]
            lab = labels if labels is None or subset is None else labels[subset]
            self.count.calls += 1
            self.count.rows += rows * self.rows_per_sample
            images = x.reshape(rows, *self.sample_shape)
            if self.guidance is None:
                return self.denoiser(images, t, lab).reshape(rows, -1)
            null = torch.full_like(lab, self.denoiser.null_label)
            both = self.denoiser(
                torch.cat([images, images]), torch.cat([t, t]), torch.cat([lab, null])
            ).reshape(2 * rows, -1)
            cond, uncond = both[:rows], both[rows:]
            return uncond + self.guidance * (cond - uncond)

        return eps

    def _phi(self, states: Tensor, first: int) -> Tensor:
        """``Phi_n(states[:, j])`` with ``n = first + j`` for all samples in one call."""
        batch, width, dim = states.shape
        n = torch.arange(first, first + width, device=states.device).repeat(batch)
        z = None
        if self.noise is not None:
            z = self.noise[:, first : first + width].reshape(batch * width, dim)
        labels = None
        if self.labels is not None:
            labels = self.labels.repeat_interleave(width)
        out = self.chain.step(states.reshape(batch * width, dim), n, self._eps(labels), z)
        return out.reshape(batch, width, dim)

    def _states(self, x: Tensor, lo: int, hi: int) -> Tensor:
        """``s_lo .. s_{hi-1}``: the initial noise, then positions ``lo-1 .. hi-2``."""
        if lo == 0:
            return torch.cat([self.x_init[:, None].to(x.dtype), x[:, : hi - 1]], 1)
        return x[:, lo - 1 : hi - 1]

    def _check(self, x: Tensor) -> None:
        want = (self.batch, self.steps, self.dim)
        if tuple(x.shape) != want:
            raise ValueError(f"the chain's unknown has shape {want}, got {tuple(x.shape)}")

    def init_state(self, x: Tensor) -> Any:
        """A solve begins: a fresh state, and the network count starts from zero."""
        self.count = NetworkCount()
        return self._fresh_state(x)

    def _fresh_state(self, x: Tensor) -> Any:
        raise NotImplementedError

    def __call__(self, x: Tensor) -> Tensor:
        # Not init_state: a full call inside a solve (fp.Newton evaluates one per
        # Jacobian direction) must add to the solve's count, not restart it.
        self._check(x)
        return self.advance(self._fresh_state(x), x, 0, self.steps)


class MarkovMap(ChainMap):
    """``F(x)_n = Phi_n(s_n)``: each step applied to the state before it."""

    def _fresh_state(self, x: Tensor) -> list[int]:
        return [0]

    def advance(self, state: list[int], x: Tensor, lo: int, hi: int) -> Tensor:
        state[0] = lo
        return self._phi(self._states(x, lo, hi), lo)

    def committed(self, state: list[int]) -> int:
        return state[0]

    def positions_read(self, committed: int, lo: int, hi: int, length: int) -> int:
        return hi - lo


@dataclass
class _PicardState:
    committed: int  # positions final in x; increments 0 .. committed-1 are summed
    total: Tensor  # x_init + sum of the committed increments / A_{m+1}, (B, d)


class PicardMap(ChainMap):
    """The integral form ``F(x)_n = A_{n+1} (x_init + sum_{m<=n} b_m(s_m) / A_{m+1})``."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        a = self.linear
        # A_0 = 1, A_{n+1} = a_n A_n, in float64 (for DDPM-1000 A_N is about 1/sqrt(abar_T)).
        self.scale = torch.cat([a.new_ones(1), torch.cumprod(a, 0)])

    def _fresh_state(self, x: Tensor) -> _PicardState:
        return _PicardState(0, self.x_init.to(x.dtype).clone())

    def advance(self, state: _PicardState, x: Tensor, lo: int, hi: int) -> Tensor:
        c = state.committed
        if lo < c:
            raise ValueError(f"window start {lo} is before the committed prefix {c}")
        states = self._states(x, c, hi)  # s_c .. s_{hi-1}
        phi = self._phi(states, c)
        a = self.linear[c:hi].to(x.device, x.dtype)[None, :, None]
        scale = self.scale.to(x.device)
        weights = (1 / scale[c + 1 : hi + 1]).to(x.dtype)[None, :, None]
        w = (phi - a * states) * weights  # b_m(s_m) / A_{m+1}
        partial = state.total[:, None] + torch.cumsum(w, 1)
        out = scale[lo + 1 : hi + 1].to(x.dtype)[None, :, None] * partial[:, lo - c :]
        if lo > c:
            state.total = partial[:, lo - c - 1].clone()
            state.committed = lo
        return out

    def committed(self, state: _PicardState) -> int:
        return state.committed

    def positions_read(self, committed: int, lo: int, hi: int, length: int) -> int:
        return hi - committed


def _check_conditioning(
    denoiser: Denoiser, labels: Tensor | None, guidance: float | None, batch: int
) -> tuple[Tensor | None, float | None]:
    classes = denoiser.num_classes
    if guidance is not None:
        if classes is None:
            raise ValueError("guidance needs a class-conditional model; this one is unconditional")
        if isinstance(guidance, bool) or not isinstance(guidance, (int, float)):
            raise TypeError(f"guidance must be a number, got {guidance!r}")
        if not math.isfinite(guidance):
            raise ValueError(f"guidance must be finite, got {guidance}")
        if labels is None:
            raise ValueError("guidance needs class labels")
    if labels is None:
        if classes is None:
            return None, None
        # A conditional model with no labels samples its unconditional branch.
        return torch.full((batch,), denoiser.null_label, dtype=torch.long), None
    if classes is None:
        raise ValueError("labels given, but the model is unconditional")
    labels = torch.as_tensor(labels)
    if labels.ndim != 1 or labels.shape[0] != batch:
        raise ValueError(f"labels must have shape ({batch},), got {tuple(labels.shape)}")
    if labels.is_floating_point() or bool(((labels < 0) | (labels > classes)).any()):
        raise ValueError(f"labels must be integers in [0, {classes}] ({classes}: no class)")
    return labels.long(), None if guidance is None else float(guidance)

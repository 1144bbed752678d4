"""The inverse of one TarFlow block as a triangular map for :func:`fixedpoint.solve`.

Inverting block ``k`` is the strictly triangular system (in the block's permuted order)

    x_t = z_t * exp(a_t(x_<t)) + mu_t(x_<t),       a_0 = mu_0 = 0  =>  x_0 = z_0,

wrapped as :class:`BlockInverse`, an :class:`fixedpoint.IncrementalMap`: any method of
:func:`fixedpoint.solve` reaches the same solution.

Classifier-free guidance (CFG) happens *inside* the map: the conditional and the
unconditional pass run as one batch of ``2B`` rows through the network, and

    a <- a_c + g_t (a_c - a_u),    mu <- mu_c + g_t (mu_c - mu_u),

with ``g_t = g`` or, annealed, ``g_t = g * t / (T - 1)`` for output position ``t`` (the
published sampler's ``(i + 1) / (T - 1)`` for the step reading input ``i = t - 1``).
The unconditional pass uses the mean class embedding and may use an attention
temperature (for unconditional models that is the only difference between the passes).

Costs: the map declares ``rows_per_sample`` (2 with CFG) and the right shift of the
network (output ``t`` reads input ``t - 1``; input ``T - 1`` is never read, and
``x_0 = z_0`` needs no network call), so ``token_evals`` counts the rows the network
really processes and ``dependent_steps`` only calls that read something.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
from torch import Tensor

import fixedpoint as fp

from .model import KVCache, MetaBlock, TarFlow, TarFlowConfig, wide

__all__ = ["BlockInverse", "BlockInverseState", "check_guidance"]


@dataclass
class BlockInverseState:
    """Solver-owned state of a :class:`BlockInverse`: the cache and ``F`` at the frontier.

    ``frontier`` is ``F(x)[:, cache.length]``, kept because it was computed from an input
    (position ``length - 1``) that later windows no longer push through the network.
    """

    cache: KVCache
    frontier: Tensor  # (B, 1, d)


class BlockInverse(fp.IncrementalMap):
    """The triangular map whose fixed point inverts flow block number ``block_index``.

    Args:
        model: the flow.
        block_index: the block's index (forward order).
        z: the block's output tokens **in the block's permuted order**, ``(B, T, d)``.
        y: labels ``(B,)`` (``-1`` = dropped) or None.
        guidance: CFG strength ``g`` (finite); 0 disables CFG (one pass of ``B`` rows).
        anneal_guidance: use ``g_t = g * t / (T - 1)``.
        uncond_temperature: attention temperature of the unconditional pass (> 0).

    Attributes: ``block_index`` (int) and ``flow_block`` (the block's module).  Iterates
    ``x`` are in the permuted order too; un-permute the solution with
    ``flow_block.permute``.
    """

    def __init__(
        self,
        model: TarFlow,
        block_index: int,
        z: Tensor,
        y: Tensor | None = None,
        *,
        guidance: float = 0.0,
        anneal_guidance: bool = False,
        uncond_temperature: float = 1.0,
    ):
        c = model.config
        _check_arguments(c, block_index, z, guidance, uncond_temperature)
        self.model = model
        self.block_index = int(block_index)
        self.flow_block: MetaBlock = model.blocks[block_index]
        self.config = c
        self.z = z
        self.batch = z.shape[0]
        self.guidance = float(guidance)
        self.cfg = self.guidance != 0.0
        self.q_scale: Tensor | None = None
        with torch.no_grad():
            cond = self.flow_block.class_vector(y, self.batch)
            if self.cfg:
                cond = self._guided_rows(cond, anneal_guidance, uncond_temperature)
            # Position (+ class) embedding for all rows, permuted order: (rows|1, T, W).
            self.emb = self.flow_block.embedding(cond).detach()

    def _guided_rows(
        self, cond: Tensor | None, anneal: bool, uncond_temperature: float
    ) -> Tensor | None:
        """Set up the 2B-row CFG batch: class vectors of both halves, the per-row query
        scale and the per-position guidance ``g_out``."""
        B, T, z = self.batch, self.config.seq_len, self.z
        uncond = self.flow_block.class_vector(None, B)
        if cond is not None:
            cond = torch.cat([cond.expand(B, -1, -1), uncond.expand(B, -1, -1)])
        if uncond_temperature != 1.0:
            # Per-row inverse temperature: 1 for the conditional half.
            scale = torch.ones(2 * B, 1, 1, 1, device=z.device)
            scale[B:] = 1.0 / uncond_temperature
            self.q_scale = scale
        t = torch.arange(1, T, device=z.device, dtype=torch.float64)
        g = self.guidance * (t / max(T - 1, 1) if anneal else torch.ones_like(t))
        self.g_out = g.to(wide(z).dtype).view(T - 1, 1)  # g_out[i]: output position i + 1
        return cond

    # ---- the map ---------------------------------------------------------------------

    def _apply(self, out: Tensor, first: int, x_dtype: torch.dtype) -> Tensor:
        """``F`` at positions ``first .. first + L - 1`` from raw network outputs.

        Combines the CFG halves (``c + g (c - u)`` on ``a`` and ``mu`` at once) and
        returns ``z exp(a) + mu``, with the combination and ``exp`` in >= float32.
        """
        out = wide(out)
        if self.cfg:
            B = self.batch
            cond, uncond = out[:B], out[B:]
            g = self.g_out[first - 1 : first - 1 + out.shape[1]]
            out = cond + g * (cond - uncond)
        a, mu = out.split(self.config.token_dim, dim=-1)
        zt = self.z[:, first : first + out.shape[1]]
        return torch.addcmul(mu, zt, torch.exp(a)).to(x_dtype)

    def _rows(self, x: Tensor) -> Tensor:
        return torch.cat([x, x]) if self.cfg else x

    def __call__(self, x: Tensor) -> Tensor:
        self._check(x)
        T = self.config.seq_len
        with torch.no_grad():
            if T == 1:
                return self.z.to(x.dtype).clone()
            out = self.flow_block.network(self._rows(x[:, : T - 1]), self.emb[:, : T - 1],
                                          q_scale=self.q_scale)
            rest = self._apply(out, 1, x.dtype)
            return torch.cat([self.z[:, :1].to(x.dtype), rest], dim=1)

    def init_state(self, x: Tensor) -> BlockInverseState:
        self._check(x)
        rows = self.rows_per_sample * self.batch
        # Under autocast the keys come out in the autocast dtype: store them so.
        dev = x.device.type
        dtype = (
            torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev)
            else self.flow_block.proj_in.weight.dtype
        )
        cache = KVCache.allocate(self.config, rows, device=x.device, dtype=dtype)
        return BlockInverseState(cache, self.z[:, :1].to(x.dtype).clone())

    def committed(self, state: BlockInverseState) -> int:
        return state.cache.length

    @property
    def rows_per_sample(self) -> int:
        """CFG runs the conditional and the unconditional pass: two network rows."""
        return 2 if self.cfg else 1

    def positions_read(self, committed: int, lo: int, hi: int, length: int) -> int:
        # Inputs committed..end-1 go through the network (see advance); input T-1 never.
        return max(_read_end(lo, hi, length) - committed, 0)

    def advance(self, state: BlockInverseState, x: Tensor, lo: int, hi: int) -> Tensor:
        cache = state.cache
        n, T = cache.length, self.config.seq_len
        if not 0 <= n <= lo <= hi <= T:
            raise ValueError(
                f"advance needs committed <= lo <= hi <= T, got committed={n}, lo={lo}, "
                f"hi={hi}, T={T}"
            )
        # Inputs n..end-1 go through the network in one call: n..lo-1 become committed,
        # lo..end-1 are provisional (cache entries past `length`, overwritten later).
        end = _read_end(lo, hi, T)
        new = None
        if end > n:
            with torch.no_grad():
                out = self.flow_block.network(
                    self._rows(x[:, n:end]), self.emb[:, n:end], q_scale=self.q_scale,
                    cache=cache, start=n,
                )
                new = self._apply(out, n + 1, x.dtype)  # F at positions n+1..end
        cache.length = lo
        if lo == n:
            parts = [state.frontier] if hi > lo else []
            if hi - 1 > n:
                parts.append(new[:, : hi - 1 - n])
            return torch.cat(parts, dim=1) if parts else x[:, lo:lo].clone()
        if new is None:  # lo == T: everything committed, nothing left to evaluate
            return x[:, lo:lo].clone()
        # A copy: the result is a view of `new` that the solver may own and modify.
        state.frontier = new[:, lo - n - 1 : lo - n].clone()
        return new[:, lo - n - 1 : hi - n - 1]

    def _check(self, x: Tensor) -> None:
        if x.shape != self.z.shape:
            raise ValueError(f"x must have shape {tuple(self.z.shape)}, got {tuple(x.shape)}")


def _read_end(lo: int, hi: int, length: int) -> int:
    """One past the last input a window ``lo:hi`` reads: output ``t`` reads input
    ``t - 1`` (the right shift), and input ``length - 1`` feeds no output."""
    return min(max(hi - 1, lo), length - 1)


def _check_arguments(c: TarFlowConfig, block_index: int, z: Tensor, guidance: float,
                     uncond_temperature: float) -> None:
    if isinstance(block_index, bool) or not isinstance(block_index, numbers.Integral) or not (
        0 <= block_index < c.blocks
    ):
        raise ValueError(f"block_index must be an int in [0, {c.blocks}), got {block_index!r}")
    if not isinstance(z, Tensor) or z.ndim != 3 or z.shape[1:] != (c.seq_len, c.token_dim):
        shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
        raise ValueError(f"z must have shape (B, {c.seq_len}, {c.token_dim}), got {shape}")
    check_guidance(guidance, uncond_temperature)


def check_guidance(guidance: float, uncond_temperature: float) -> None:
    """Refuse a non-finite guidance or a temperature that is not a finite number > 0."""
    if isinstance(guidance, bool) or not isinstance(guidance, numbers.Real) or not (
        math.isfinite(guidance)
    ):
        raise ValueError(f"guidance must be a finite number, got {guidance!r}")
    if isinstance(uncond_temperature, bool) or not isinstance(
        uncond_temperature, numbers.Real
    ) or not (0 < uncond_temperature < math.inf):
        raise ValueError(
            f"uncond_temperature must be a finite number > 0, got {uncond_temperature!r}"
        )

"""Sampling TarFlow by solving each block's inverse with the generic solvers.

Inverting block ``k`` is the strictly triangular system (in the block's permuted order)

    x_t = z_t * exp(a_t(x_<t)) + mu_t(x_<t),       a_0 = mu_0 = 0  =>  x_0 = z_0,

wrapped as :class:`BlockInverse`, an :class:`fixedpoint.IncrementalMap`.  Any solver of
:func:`fixedpoint.solve` reaches the same solution; :func:`reverse` chooses one per block
from a :class:`~fixedpoint.tarflow.strategy.Strategy` (default: sequential everywhere).

Classifier-free guidance (CFG) happens *inside* the map: the conditional and the
unconditional pass run as one batch of ``2B`` rows through the network, and

    a <- a_c + g_t (a_c - a_u),    mu <- mu_c + g_t (mu_c - mu_u),

with ``g_t = g`` or, annealed, ``g_t = g * t / (T - 1)`` for output position ``t`` (the
published sampler's ``(i + 1) / (T - 1)`` for the step reading input ``i = t - 1``).
The unconditional pass uses the mean class embedding and may use an attention
temperature (for unconditional models that is the only difference between the passes).

:func:`sample_sequential_naive` is a deliberately naive reference loop used only as a
test oracle and as the benchmark's baseline.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

import fixedpoint as fp
from fixedpoint.precision import (
    PrecisionWarning,
    arithmetic_name,
    low_tolerances,
    precision_message,
    raise_to_floor,
    rounding_unit,
)

from .model import KVCache, MetaBlock, TarFlow, wide
from .strategy import BlockPlan, InitialGuess, Strategy

__all__ = ["BlockInverse", "BlockInverseState", "Sample", "reverse", "sample_sequential_naive"]


@dataclass
class BlockInverseState:
    """Solver-owned state of a :class:`BlockInverse`: the cache and ``F`` at the frontier.

    ``frontier`` is ``F(x)[:, cache.length]``, kept because it was computed from an input
    (position ``length - 1``) that later windows no longer push through the network.
    """

    cache: KVCache
    frontier: Tensor  # (B, 1, d)


class BlockInverse(fp.IncrementalMap):
    """The triangular map whose fixed point inverts flow block ``block``.

    Args:
        model: the flow.
        block: the block index (forward order).
        z: the block's output tokens **in the block's permuted order**, ``(B, T, d)``.
        y: labels ``(B,)`` (``-1`` = dropped) or None.
        guidance: CFG strength ``g``; 0 disables CFG (one pass of ``B`` rows).
        anneal_guidance: use ``g_t = g * t / (T - 1)``.
        uncond_temperature: attention temperature of the unconditional pass.

    Iterates ``x`` are in the permuted order too; un-permute the solution.
    """

    def __init__(
        self,
        model: TarFlow,
        block: int,
        z: Tensor,
        y: Tensor | None = None,
        *,
        guidance: float = 0.0,
        anneal_guidance: bool = False,
        uncond_temperature: float = 1.0,
    ):
        c = model.config
        if not 0 <= block < c.blocks:
            raise ValueError(f"block index {block} out of range for {c.blocks} blocks")
        if z.ndim != 3 or z.shape[1:] != (c.seq_len, c.token_dim):
            raise ValueError(
                f"z must have shape (B, {c.seq_len}, {c.token_dim}), got {tuple(z.shape)}"
            )
        if not uncond_temperature > 0:
            raise ValueError(f"uncond_temperature must be > 0, got {uncond_temperature!r}")
        self.model = model
        self.index = block
        self.block: MetaBlock = model.blocks[block]
        self.config = c
        self.z = z
        self.batch = z.shape[0]
        self.guidance = float(guidance)
        self.cfg = self.guidance != 0.0
        T = c.seq_len
        with torch.no_grad():
            cond = self.block.class_vector(y, self.batch)
            if self.cfg:
                B = self.batch
                uncond = self.block.class_vector(None, B)
                if cond is not None:
                    cond = torch.cat([cond.expand(B, -1, -1), uncond.expand(B, -1, -1)])
                # Per-row inverse temperature: 1 for the conditional half.
                self.q_scale: Tensor | None = None
                if uncond_temperature != 1.0:
                    scale = torch.ones(2 * B, 1, 1, 1, device=z.device)
                    scale[B:] = 1.0 / uncond_temperature
                    self.q_scale = scale
                t = torch.arange(1, T, device=z.device, dtype=torch.float64)
                g = self.guidance * (t / max(T - 1, 1) if anneal_guidance else torch.ones_like(t))
                # g_out[i]: guidance for output position i + 1.
                self.g_out = g.to(wide(z).dtype).view(T - 1, 1)
            else:
                self.q_scale = None
            # Position (+ class) embedding for all rows, permuted order: (rows|1, T, W).
            self.emb = self.block.embedding(cond).detach()

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
            out = self.block.network(self._rows(x[:, : T - 1]), self.emb[:, : T - 1],
                                     q_scale=self.q_scale)
            rest = self._apply(out, 1, x.dtype)
            return torch.cat([self.z[:, :1].to(x.dtype), rest], dim=1)

    def init_state(self, x: Tensor) -> BlockInverseState:
        self._check(x)
        rows = 2 * self.batch if self.cfg else self.batch
        # Under autocast the keys come out in the autocast dtype: store them so.
        dev = x.device.type
        dtype = (
            torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev)
            else self.block.proj_in.weight.dtype
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
        end = min(max(hi - 1, lo), length - 1)
        return max(end - committed, 0)

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
        # Input T-1 feeds no output, so it is never needed.
        end = min(max(hi - 1, lo), T - 1)
        new = None
        if end > n:
            with torch.no_grad():
                out = self.block.network(
                    self._rows(x[:, n:end]), self.emb[:, n:end], q_scale=self.q_scale,
                    cache=cache, start=n,
                )
                new = self._apply(out, n + 1, x.dtype)  # F at positions n+1..end
        cache.length = lo
        if lo == n:
            parts = [state.frontier] if hi > lo else []
            if hi - 1 > n:
                parts.append(new[:, : hi - 1 - n])
            result = torch.cat(parts, dim=1) if parts else x[:, lo:lo].clone()
        elif new is None:  # lo == T: everything committed, nothing left to evaluate
            result = x[:, lo:lo].clone()
        else:
            result = new[:, lo - n - 1 : hi - n - 1]
            # A copy: the result is a view of `new` that the solver may own and modify.
            state.frontier = new[:, lo - n - 1 : lo - n].clone()
        return result

    def _check(self, x: Tensor) -> None:
        if x.shape != self.z.shape:
            raise ValueError(f"x must have shape {tuple(self.z.shape)}, got {tuple(x.shape)}")


# --------------------------------------------------------------------------------------
# sampling


@dataclass
class Sample:
    """Result of :func:`reverse`.

    ``x``: images ``(B, C, H, W)``.  ``blocks[k]``: the solver result of block ``k``
    (forward block order); its ``x`` is in block ``k``'s **permuted** token order.
    ``intermediates``: images for the sampling-trace figure: the scaled noise, then the
    image after each inverted block (blocks ``K-1 .. 0``), then the denoised image if
    ``denoise`` was on.  ``strategy``: the strategy the blocks were actually solved
    with (tolerances as raised by ``adjust_tolerance``, see :func:`reverse`).
    """

    x: Tensor
    blocks: list[fp.Result]
    intermediates: list[Tensor] = field(default_factory=list)
    strategy: Strategy | None = None


def _initial_guess(z: Tensor, init: InitialGuess) -> Tensor:
    if init is InitialGuess.NOISE:
        return z
    if init is InitialGuess.ZEROS_AFTER_FIRST:
        x0 = torch.zeros_like(z)
        x0[:, :1] = z[:, :1]  # position 0 is known exactly: x_0 = z_0
        return x0
    raise ValueError(f"unknown initial guess {init!r}")


def reverse(
    model: TarFlow,
    z: Tensor,
    y: Tensor | None = None,
    *,
    strategy: Strategy | None = None,
    guidance: float = 0.0,
    anneal_guidance: bool = False,
    uncond_temperature: float = 1.0,
    denoise: bool = False,
    reference: Sample | Sequence[Tensor] | None = None,
    trace: bool = False,
    adjust_tolerance: bool = True,
) -> Sample:
    """Invert the flow: standard normal noise ``z`` -> images.

    Args:
        z: standard normal noise, tokens ``(B, T, d)`` or images ``(B, C, H, W)``; it is
            scaled by ``sqrt(model.var)`` first.  Never modified.
        y: labels ``(B,)``, ``-1`` for "no label", or None.
        strategy: per-block solver and initial guess; None = sequential everywhere.
        guidance, anneal_guidance, uncond_temperature: classifier-free guidance, see
            :class:`BlockInverse`.
        denoise: finish with one score step ``x <- x + sigma^2 grad_x log p(x | y)``
            (``sigma = config.noise_std``; autograd through one forward pass).
        reference: per-block solutions to trace the error against: a previous
            :class:`Sample` (its ``blocks[k].x``, permuted order), or a sequence in
            forward block order of token tensors ``(B, T, d)`` in the **original**
            token order (permuted here before the comparison).
        trace: record per-iteration residuals (and errors, with ``reference``).
        adjust_tolerance: raise a block's ``tol`` / ``rtol`` that sits below the noise
            floor of the compute dtype (see below) to that floor.  False keeps the
            given tolerances (the warning is still emitted).

    Tolerances and precision: the map is computed in the coarser of ``z``'s dtype, the
    model's weight dtype and, under ``torch.autocast``, the autocast dtype (bfloat16:
    ``eps = 2**-7``).  A positive tolerance below :func:`fixedpoint.noise_floor` of that
    dtype (``4 eps``; the floor is taken at scale 1 since data and prior tokens are of
    unit scale) is never met: the iteration runs to its cap.  Such tolerances trigger
    **one** :class:`~fixedpoint.PrecisionWarning` per call, listing the blocks; with
    ``adjust_tolerance`` they are raised to the floor.  ``tol = 0`` (exact finite
    termination) is kept.  ``Sample.strategy`` records the methods actually used.
    """
    c = model.config
    K = c.blocks
    if z.ndim == 4:
        z = model.patchify(z)
    if z.ndim != 3 or z.shape[1:] != (c.seq_len, c.token_dim):
        raise ValueError(
            f"z must be tokens (B, {c.seq_len}, {c.token_dim}) or images, got {tuple(z.shape)}"
        )
    if strategy is None:
        strategy = Strategy.uniform(fp.Sequential(), K)
    if len(strategy.plans) != K:
        raise ValueError(f"the strategy has {len(strategy.plans)} block plans, the model {K}")
    refs = _reference_list(reference, K)

    x = z * model.var.sqrt().to(z.dtype)
    strategy, _ = _check_tolerances(model, x, strategy, adjust_tolerance)
    intermediates = [model.unpatchify(x)]
    results: list[fp.Result | None] = [None] * K
    for k in reversed(range(K)):
        block = model.blocks[k]
        zp = block.permute(x)
        fmap = BlockInverse(
            model, k, zp, y, guidance=guidance, anneal_guidance=anneal_guidance,
            uncond_temperature=uncond_temperature,
        )
        plan = strategy.plans[k]
        ref = refs[k]
        if ref is not None and not isinstance(reference, Sample):
            ref = block.permute(ref)  # a Sample's block solutions are already permuted
        # Tolerances were checked above, once for all blocks.
        res = fp.solve(fmap, _initial_guess(zp, plan.init), plan.method, trace=trace,
                       reference=ref, check_precision=False)
        results[k] = res
        x = block.permute(res.x)
        intermediates.append(model.unpatchify(x))

    img = model.unpatchify(x)
    if denoise:
        img = denoise_step(model, img, y)
        intermediates.append(img)
    return Sample(x=img, blocks=results, intermediates=intermediates,  # type: ignore[arg-type]
                  strategy=strategy)


def _check_tolerances(
    model: TarFlow, x: Tensor, strategy: Strategy, adjust: bool
) -> tuple[Strategy, bool]:
    """The strategy with tolerances below the noise floor raised (if ``adjust``).

    The floor is taken at the scale of the iterate (the largest token magnitude of the
    scaled noise) in the coarsest arithmetic involved (the iterate, the weights,
    autocast).  Emits at most one :class:`PrecisionWarning` for all blocks; returns
    whether it did.
    """
    eps = rounding_unit(x, model.blocks[0].proj_in.weight.dtype)
    scale = max(float(x.abs().max()), 1.0)
    plans, low_blocks = [], {}
    for k, plan in enumerate(strategy.plans):
        low = low_tolerances(plan.method, eps, scale)
        if low:
            text = ", ".join(f"{n}={v:g} < floor {f:g}" for n, (v, f) in low.items())
            low_blocks.setdefault(f"{type(plan.method).__name__} {text}", []).append(k)
            if adjust:
                plan = BlockPlan(raise_to_floor(plan.method, low), plan.init)
        plans.append(plan)
    if not low_blocks:
        return strategy, False
    subject = "; ".join(
        f"block{'s' if len(ks) > 1 else ''} {','.join(map(str, ks))}: {what}"
        for what, ks in low_blocks.items()
    )
    message = precision_message(f"reverse: {subject};", {}, eps, adjust, arithmetic_name(x))
    if adjust:
        message += " (adjust_tolerance=False keeps the given tolerances)"
    warnings.warn(message, PrecisionWarning, stacklevel=3)
    return (Strategy(tuple(plans)) if adjust else strategy), True


def _reference_list(
    reference: Sample | Sequence[Tensor] | None, blocks: int
) -> list[Tensor | None]:
    if reference is None:
        return [None] * blocks
    if isinstance(reference, Sample):
        refs = [r.x for r in reference.blocks]
    else:
        refs = list(reference)
    if len(refs) != blocks:
        raise ValueError(f"reference has {len(refs)} entries, the model {blocks} blocks")
    return refs


def denoise_step(model: TarFlow, img: Tensor, y: Tensor | None = None) -> Tensor:
    """One score step ``x + sigma^2 grad_x log p(x | y)`` (Tweedie for Gaussian noise)."""
    sigma = model.config.noise_std
    with torch.enable_grad():
        xg = img.detach().requires_grad_(True)
        logp = model.log_prob(xg, y).sum()  # samples are independent: sum gives each grad
        (grad,) = torch.autograd.grad(logp, xg)
    return (img + sigma**2 * grad.to(img.dtype)).detach()


# --------------------------------------------------------------------------------------
# naive reference


@torch.no_grad()
def sample_sequential_naive(
    model: TarFlow,
    z: Tensor,
    y: Tensor | None = None,
    guidance: float = 0.0,
    *,
    anneal_guidance: bool = False,
    uncond_temperature: float = 1.0,
) -> Tensor:
    """A deliberately naive sequential sampler: the reference loop, images out.

    One token per step; each layer's keys and values are kept in Python lists and
    re-concatenated with ``torch.cat`` at every step (quadratic copying); the conditional
    and unconditional passes run separately.  Shares no code with :class:`BlockInverse`
    beyond the modules' weights.  For tests and the benchmark only.
    """
    c = model.config
    if z.ndim == 4:
        z = model.patchify(z)
    x = (z * model.var.sqrt()).clone()
    T, d = c.seq_len, c.token_dim
    passes = [(y, 1.0)]
    if guidance != 0.0:
        passes.append((None, uncond_temperature))
    for k in reversed(range(c.blocks)):
        block = model.blocks[k]
        x = block.permute(x).clone()
        pos = block.permute(block.pos_embed, dim=0)
        caches = [
            [([], []) for _ in block.attn_blocks] for _ in passes
        ]
        for i in range(T - 1):
            outs = []
            for p, (labels, temp) in enumerate(passes):
                h = block.proj_in(x[:, i : i + 1]) + pos[i : i + 1]
                cls = block.class_vector(labels, x.shape[0])
                if cls is not None:
                    h = h + cls
                for layer, (keys, values) in zip(block.attn_blocks, caches[p]):
                    att = layer.attention
                    B = h.shape[0]
                    q, kk, v = (
                        att.qkv(att.norm(h)).reshape(B, 1, 3 * att.heads, att.head_dim)
                        .transpose(1, 2).chunk(3, dim=1)
                    )
                    keys.append(kk)
                    values.append(v)
                    kk = torch.cat(keys, dim=2)
                    v = torch.cat(values, dim=2)
                    o = torch.nn.functional.scaled_dot_product_attention(
                        q, kk, v, scale=att.head_dim**-0.5 / temp
                    )
                    h = h + att.proj(o.transpose(1, 2).reshape(B, 1, -1))
                    h = h + layer.mlp.main(layer.mlp.norm(h))
                outs.append(block.proj_out(h))
            a, mu = outs[0][..., :d], outs[0][..., d:]
            if guidance != 0.0:
                g = guidance * (i + 1) / (T - 1) if anneal_guidance else guidance
                a_u, mu_u = outs[1][..., :d], outs[1][..., d:]
                a = a + g * (a - a_u)
                mu = mu + g * (mu - mu_u)
            x[:, i + 1 : i + 2] = x[:, i + 1 : i + 2] * torch.exp(a) + mu
        x = block.permute(x)
    return model.unpatchify(x)

"""Sampling TarFlow: invert every block with the generic solvers, last block first.

:func:`reverse` scales standard normal noise by the prior's ``sqrt(var)`` and inverts the
blocks ``K-1 .. 0``, each as a :class:`~fixedpoint.tarflow.inverse.BlockInverse` solved
by the method its :class:`~fixedpoint.tarflow.strategy.BlockPlan` names (default:
sequential everywhere).

Token orders, named where they appear: block ``k`` works in its own *permuted* token
order, and the solver's iterates and solutions (``Sample.blocks[k].x``,
``Sample.permuted_solutions``, the ``reference_permuted`` argument) are in that order.
Images (``Sample.images``, ``Sample.intermediates``) are in the image layout.

Failure contract: a block whose solve ends NONFINITE (the map overflowed or produced
NaN) is never passed on silently.  By default :func:`reverse` raises
:class:`SamplingError` naming the block, the status and the cause; with
``throw=False`` it returns the :class:`Sample` with every block's status (a failed
sample keeps its last finite iterate, the core's contract, so later blocks still run on
finite values).  A capped method that stops at its cap (MAX_ITER, e.g. the paper's
``[Stack-GS-J-Else]`` strategies) is not a failure.

:func:`sample_sequential` (a :class:`SequentialDecoder`) is the fast sequential sampler:
the same samples as :func:`reverse` with the sequential strategy, without the solver's
bookkeeping, for when only the images and the wall-clock matter (the baseline of the
benchmarks).  :func:`sample_sequential_naive` is a deliberately naive reference loop
used only as a test oracle and as the benchmark's slowest baseline.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

import fixedpoint as fp
from fixedpoint.precision import (
    PrecisionWarning,
    arithmetic_name,
    iterate_scale,
    low_tolerances,
    precision_message,
    raise_to_floor,
    rounding_unit,
)

from .inverse import BlockInverse, check_guidance
from .model import DecodeCache, DecodeParams, MetaBlock, TarFlow, decode_step, wide
from .strategy import BlockPlan, Strategy

__all__ = [
    "NonFiniteSampleError",
    "Sample",
    "SamplingError",
    "SequentialDecoder",
    "denoise_step",
    "reverse",
    "sample_sequential",
    "sample_sequential_naive",
]


@dataclass
class Sample:
    """Result of :func:`reverse`.

    ``images``: ``(B, C, H, W)``.  ``blocks[k]``: the solver result of block ``k``
    (forward block order); its ``x`` is in block ``k``'s **permuted** token order (also
    available as :attr:`permuted_solutions`).  ``intermediates``: images for the
    sampling-trace figure: the scaled noise, then the image after each inverted block
    (blocks ``K-1 .. 0``), then the denoised image if ``denoise`` was on.
    ``strategy``: the strategy the blocks were actually solved with (tolerances as
    raised by ``adjust_tolerance``, see :func:`reverse`).
    """

    images: Tensor
    blocks: list[fp.Result]
    intermediates: list[Tensor] = field(default_factory=list)
    strategy: Strategy | None = None

    @property
    def x(self) -> Tensor:
        """Deprecated name of :attr:`images`, kept while callers migrate."""
        return self.images

    @property
    def permuted_solutions(self) -> list[Tensor]:
        """Per block (forward order), its solution in the block's permuted token order:
        what ``reverse(..., reference_permuted=...)`` reads."""
        return [r.x for r in self.blocks]

    @property
    def statuses(self) -> tuple[fp.Status, ...]:
        """The solver status of every block, forward block order."""
        return tuple(r.status for r in self.blocks)

    @property
    def failed_blocks(self) -> list[int]:
        """Blocks whose solve ended NONFINITE (forward order)."""
        return [k for k, r in enumerate(self.blocks) if r.status is fp.Status.NONFINITE]

    @property
    def failed_samples(self) -> list[int]:
        """Samples that ended NONFINITE in some block."""
        bad = {i for r in self.blocks for i, s in enumerate(r.sample_status)
               if s is fp.Status.NONFINITE}
        return sorted(bad)


class SamplingError(RuntimeError):
    """A block's solve failed (NONFINITE); raised by :func:`reverse` unless
    ``throw=False``.  ``block`` is the block index, ``result`` its solver result."""

    def __init__(self, block: int, result: fp.Result):
        self.block = block
        self.result = result
        status = result.status
        bad = [i for i, s in enumerate(result.sample_status) if s is status]
        shown = ", ".join(map(str, bad[:8])) + (" ..." if len(bad) > 8 else "")
        super().__init__(
            f"block {block}: {status.name}: {status.message} in {len(bad)} of "
            f"{len(result.sample_status)} samples ({shown}); lower the guidance or check "
            "the model's weights (throw=False returns the sample with every block's status)"
        )


class NonFiniteSampleError(SamplingError):
    """The fast sequential sampler (:class:`SequentialDecoder`) met a non-finite value;
    ``block`` is the block, ``samples`` the failed samples (it keeps no solver result:
    ``result`` is None)."""

    def __init__(self, block: int, samples: list[int], batch: int):
        self.block = block
        self.result = None
        self.samples = samples
        shown = ", ".join(map(str, samples[:8])) + (" ..." if len(samples) > 8 else "")
        RuntimeError.__init__(
            self,
            f"block {block}: NONFINITE: {fp.Status.NONFINITE.message} in {len(samples)} of "
            f"{batch} samples ({shown}); lower the guidance or check the model's weights",
        )


@dataclass(frozen=True)
class _Guidance:
    """The classifier-free guidance options of one :func:`reverse` call."""

    guidance: float
    anneal: bool
    uncond_temperature: float

    def block_map(self, model: TarFlow, k: int, zp: Tensor, y: Tensor | None) -> BlockInverse:
        return BlockInverse(model, k, zp, y, guidance=self.guidance, anneal_guidance=self.anneal,
                            uncond_temperature=self.uncond_temperature)


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
    reference_permuted: Sample | Sequence[Tensor] | None = None,
    trace: bool = False,
    adjust_tolerance: bool = True,
    throw: bool = True,
    reference: Sample | None = None,
) -> Sample:
    """Invert the flow: standard normal noise ``z`` -> images.

    Args:
        z: standard normal noise, tokens ``(B, T, d)`` or images ``(B, C, H, W)``,
            finite; it is scaled by ``sqrt(model.var)`` first.  Never modified.
        y: labels ``(B,)``, ``-1`` for "no label", or None.
        strategy: per-block solver and initial guess; None = sequential everywhere.
        guidance, anneal_guidance, uncond_temperature: classifier-free guidance, see
            :class:`~fixedpoint.tarflow.inverse.BlockInverse` (guidance must be finite).
        denoise: finish with one score step ``x <- x + sigma^2 grad_x log p(x | y)``
            (``sigma = config.noise_std``; autograd through one forward pass).
        reference_permuted: per-block solutions to trace the error against, in forward
            block order, each ``(B, T, d)`` in **the block's permuted token order**: a
            previous :class:`Sample` (read as its :attr:`Sample.permuted_solutions`) or
            a sequence of tensors.
        trace: record per-iteration residuals (and errors, with a reference).
        adjust_tolerance: raise a block's ``atol`` / ``rtol`` that sits below the noise
            floor of the compute dtype (see below) to that floor.  False keeps the
            given tolerances (the warning is still emitted).
        throw: raise :class:`SamplingError` when a block ends NONFINITE (default);
            False returns the :class:`Sample` with every block's status instead.
        reference: deprecated name for ``reference_permuted``, accepted for a
            :class:`Sample` only.

    Tolerances and precision: the map is computed in the coarser of ``z``'s dtype, the
    model's weight dtype and, under ``torch.autocast``, the autocast dtype (bfloat16:
    ``eps = 2**-7``).  The default tolerance (None) stops at that rounding level at the
    scale of the iterate.  An explicit positive tolerance below the noise floor (``4
    eps`` at the scale of the scaled noise) is never met: the iteration would run to its
    cap.  Such tolerances trigger **one** :class:`~fixedpoint.PrecisionWarning` per
    call, listing the blocks; with ``adjust_tolerance`` they are raised to the floor.
    ``atol = rtol = 0`` (exact finite termination) is kept.  ``Sample.strategy`` records
    the methods actually used.
    """
    tokens = _noise_tokens(model, z)
    strategy = _block_strategy(model, strategy)
    refs = _reference_list(_pick_reference(reference_permuted, reference), model.config.blocks)
    cfg = _Guidance(guidance, anneal_guidance, uncond_temperature)
    x = tokens * model.var.sqrt().to(tokens.dtype)
    strategy = _check_tolerances(model, x, strategy, adjust_tolerance)
    intermediates = [model.unpatchify(x)]
    results: list[fp.Result] = []
    for k in reversed(range(model.config.blocks)):
        res = _solve_block(model, k, x, y, strategy.plans[k], cfg, trace, refs[k])
        if throw and res.status is fp.Status.NONFINITE:
            raise SamplingError(k, res)
        results.insert(0, res)
        x = model.blocks[k].permute(res.x)
        intermediates.append(model.unpatchify(x))
    img = model.unpatchify(x)
    if denoise:
        img = denoise_step(model, img, y)
        intermediates.append(img)
    return Sample(images=img, blocks=results, intermediates=intermediates, strategy=strategy)


def _noise_tokens(model: TarFlow, z: Tensor) -> Tensor:
    """``z`` as tokens ``(B, T, d)``, checked: the right shape, floating point, finite."""
    c = model.config
    if not isinstance(z, Tensor):
        raise TypeError(f"z must be a torch.Tensor, got {type(z).__name__}")
    if z.ndim == 4:
        z = model.patchify(z)
    if z.ndim != 3 or z.shape[1:] != (c.seq_len, c.token_dim):
        raise ValueError(
            f"z must be tokens (B, {c.seq_len}, {c.token_dim}) or images, got {tuple(z.shape)}"
        )
    if not z.is_floating_point():
        raise TypeError(f"z must be a floating-point tensor, got {z.dtype}")
    bad = int((~torch.isfinite(z)).sum())
    if bad:
        raise ValueError(f"the noise z has {bad} non-finite entries; it must be finite")
    return z


def _block_strategy(model: TarFlow, strategy: Strategy | None) -> Strategy:
    K = model.config.blocks
    if strategy is None:
        return Strategy.uniform(fp.Sequential(), K)
    if not isinstance(strategy, Strategy):
        raise TypeError(f"strategy must be a Strategy or None, got {type(strategy).__name__}")
    if len(strategy.plans) != K:
        raise ValueError(f"the strategy has {len(strategy.plans)} block plans, the model {K}")
    return strategy


def _solve_block(model: TarFlow, k: int, x: Tensor, y: Tensor | None, plan: BlockPlan,
                 cfg: _Guidance, trace: bool, ref: Tensor | None) -> fp.Result:
    """Invert block ``k`` given its output ``x`` (original token order)."""
    zp = model.blocks[k].permute(x)
    fmap = cfg.block_map(model, k, zp, y)
    # Tolerances were checked by reverse, once for all blocks.
    return fp.solve(fmap, plan.init.start(zp), plan.method, trace=trace, reference=ref,
                    check_precision=False)


def _check_tolerances(model: TarFlow, x: Tensor, strategy: Strategy, adjust: bool) -> Strategy:
    """The strategy with tolerances below the noise floor raised (if ``adjust``).

    The floor is taken at the scale of the iterate (fixedpoint.precision.iterate_scale of the
    scaled noise) in the coarsest arithmetic involved (the iterate, the weights,
    autocast).  Emits at most one :class:`PrecisionWarning` for all blocks, pointing at
    the caller of :func:`reverse` (an explicit stack level: reverse calls this directly).
    """
    eps = rounding_unit(x, model.blocks[0].proj_in.weight.dtype)
    scale = iterate_scale(x)
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
        return strategy
    subject = "; ".join(
        f"block{'s' if len(ks) > 1 else ''} {','.join(map(str, ks))}: {what}"
        for what, ks in low_blocks.items()
    )
    # precision_message without a list of its own starts with " : "; keep its wording.
    why = precision_message("", {}, eps, adjust, arithmetic_name(x)).lstrip(" :")
    message = f"reverse: {subject}: {why}"
    if adjust:
        message += " (adjust_tolerance=False keeps the given tolerances)"
    warnings.warn(message, PrecisionWarning, stacklevel=3)
    return Strategy(tuple(plans)) if adjust else strategy


def _pick_reference(
    reference_permuted: Sample | Sequence[Tensor] | None, reference: Sample | None
) -> Sample | Sequence[Tensor] | None:
    if reference is None:
        return reference_permuted
    if reference_permuted is not None:
        raise TypeError("pass reference_permuted only (reference is its deprecated name)")
    if not isinstance(reference, Sample):
        raise TypeError(
            "reference= accepts a Sample only; pass per-block solutions in the permuted "
            "token order as reference_permuted="
        )
    return reference


def _reference_list(
    reference: Sample | Sequence[Tensor] | None, blocks: int
) -> list[Tensor | None]:
    if reference is None:
        return [None] * blocks
    refs = reference.permuted_solutions if isinstance(reference, Sample) else list(reference)
    if len(refs) != blocks:
        raise ValueError(f"the reference has {len(refs)} entries, the model {blocks} blocks")
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
# the fast sequential sampler


class SequentialDecoder:
    """Fast sequential sampling of one TarFlow model: images, no solver bookkeeping.

    Inverts the blocks by forward substitution, one token per step, as
    ``reverse(model, z, y, ...)`` does with its default (sequential) strategy, and gives
    the same images up to float32 rounding.  What makes it fast (measured in
    ``studies/bench_tarflow.py``):

    * ``torch.inference_mode`` and plain functional calls on the weights
      (:func:`~fixedpoint.tarflow.model.decode_step`): no module dispatch, no autograd bookkeeping;
    * preallocated key/value caches written in place (keys and values of a layer in one
      copy), token-major buffers, so no per-token concatenation or clone;
    * classifier-free guidance as one batched call: the input projection runs once
      for both halves, the two rows of a sample differ only by their embedding, and the
      halves are combined with one ``torch.lerp``.

    ``fixed_shape=True`` makes every step have the same shapes (each query reads the
    whole cache under the causal mask row of its position, positions are tensors): what
    ``torch.compile`` and CUDA graphs need; it is slower in eager mode.
    ``compile_options`` (implies ``fixed_shape``) passes the step through
    ``torch.compile(**compile_options)``, e.g. ``{}`` or ``{"mode": "reduce-overhead"}``
    for CUDA graphs; the buffers are then allocated once per batch shape and reused, with
    static addresses.  Compilation is not tested on a GPU (there is none here) and not in
    the unit tests (compiling takes minutes on this CPU); it was checked by hand on the
    CPU once (see the README).
    """

    def __init__(
        self,
        model: TarFlow,
        *,
        fixed_shape: bool = False,
        compile_options: Mapping[str, Any] | None = None,
    ):
        self.model = model
        self.fixed_shape = bool(fixed_shape) or compile_options is not None
        self._step: Callable[..., None] = _decode_token
        if compile_options is not None:
            self._step = torch.compile(_decode_token, **dict(compile_options))
        self._persistent = compile_options is not None
        self._buffers: dict[tuple[Any, ...], tuple[Tensor, DecodeCache]] = {}

    def __call__(
        self,
        z: Tensor,
        y: Tensor | None = None,
        *,
        guidance: float = 0.0,
        anneal_guidance: bool = False,
        uncond_temperature: float = 1.0,
    ) -> Tensor:
        """Images ``(B, C, H, W)`` from standard normal noise ``z`` (tokens or images),
        as :func:`reverse` (same arguments, same checks); ``z`` is never modified.  A block
        that produces a non-finite value raises :class:`NonFiniteSampleError` (a
        :class:`SamplingError`) naming the block and the samples."""
        model = self.model
        tokens = _noise_tokens(model, z)
        check_guidance(guidance, uncond_temperature)
        with torch.inference_mode():
            x = tokens * model.var.sqrt().to(tokens.dtype)
            for k in reversed(range(model.config.blocks)):
                x = self._block(k, x, y, float(guidance), anneal_guidance,
                                float(uncond_temperature))
                bad = ~torch.isfinite(x).flatten(1).all(1)
                if bool(bad.any()):
                    raise NonFiniteSampleError(k, bad.nonzero().flatten().tolist(), len(bad))
            img = model.unpatchify(x)
        # Outside inference mode: a normal tensor (autograd may use it, e.g. denoise_step).
        return img.clone()

    def _block(self, k: int, x: Tensor, y: Tensor | None, guidance: float, anneal: bool,
               uncond_temperature: float) -> Tensor:
        """Invert block ``k`` given its output ``x`` (original order); original order out."""
        block = self.model.blocks[k]
        B, T, _ = x.shape
        cfg = guidance != 0.0
        emb, q_scale = _decode_embedding(block, y, B, cfg, uncond_temperature)
        rows = emb.shape[1] * B
        zs = block.permute(x).transpose(0, 1).contiguous()  # (T, B, d), token-major
        xs, cache = self._buffers_for(k, zs, rows)
        xs.copy_(zs)  # x_0 = z_0; every later token is overwritten by its step
        t = torch.arange(1, T, device=x.device, dtype=torch.float64)
        g = guidance * (t / max(T - 1, 1) if anneal else torch.ones_like(t))
        # torch.lerp(u, c, 1 + g) = c + g (c - u): the guided combination in one op.
        weight = (1 + g).to(wide(zs).dtype)
        positions = torch.arange(T, device=x.device)
        params = block.decode_params()
        for i in range(T - 1):
            self._step(params, xs, zs, emb, cache, positions[i : i + 1],
                       positions[i + 1 : i + 2], weight[i : i + 1], cfg, q_scale,
                       None if self.fixed_shape else i + 1)
        return block.permute(xs.transpose(0, 1))

    def _buffers_for(self, k: int, zs: Tensor, rows: int) -> tuple[Tensor, DecodeCache]:
        dev = zs.device.type
        # Under autocast the keys come out in the autocast dtype: store them so.
        kv_dtype = (torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev)
                    else self.model.blocks[k].proj_in.weight.dtype)
        key = (k, tuple(zs.shape), zs.dtype, zs.device, rows, kv_dtype)
        if key in self._buffers:
            xs, cache = self._buffers[key]
            cache.kv.zero_()
            return xs, cache
        xs = torch.empty_like(zs)
        cache = DecodeCache.allocate(self.model.config, rows, device=zs.device, dtype=kv_dtype)
        if self._persistent:
            # Same memory at every call: CUDA graphs replay on fixed addresses.
            torch._dynamo.mark_static_address(xs)
            torch._dynamo.mark_static_address(cache.kv)
            self._buffers[key] = (xs, cache)
        return xs, cache


def _decode_embedding(block: MetaBlock, y: Tensor | None, batch: int, cfg: bool,
                      uncond_temperature: float) -> tuple[Tensor, Tensor | None]:
    """Token-major embeddings ``(T, G, B or 1, width)`` of the ``G`` row groups (1, or
    2 with guidance: conditional, unconditional) and the per-row query scale."""
    pos = block.permute(block.pos_embed, dim=0)[:, None]  # (T, 1, W)
    groups = [block.class_vector(y, batch)]
    if cfg:
        groups.append(block.class_vector(None, batch))
    embs = [pos if c is None else pos + c.transpose(0, 1) for c in groups]
    width = max(e.shape[1] for e in embs)
    emb = torch.stack([e.expand(-1, width, -1) for e in embs], dim=1).contiguous()
    q_scale = None
    if cfg and uncond_temperature != 1.0:
        q_scale = torch.ones(2 * batch, 1, 1, 1, device=emb.device)
        q_scale[batch:] = 1.0 / uncond_temperature
    return emb, q_scale


def _decode_token(p: DecodeParams, xs: Tensor, zs: Tensor, emb: Tensor, cache: DecodeCache,
                  position: Tensor, following: Tensor, weight: Tensor, cfg: bool,
                  q_scale: Tensor | None, length: int | None) -> None:
    """One sequential step: token ``position`` in, token ``following`` written into
    ``xs``.  Fixed shapes when ``length`` is None (see :func:`decode_step`)."""
    x_t = xs.index_select(0, position)[0]
    out = decode_step(p, x_t, emb.index_select(0, position)[0], cache, position,
                      length=length, q_scale=q_scale)
    out = wide(out)
    if cfg:
        B = xs.shape[1]
        out = torch.lerp(out[B:], out[:B], weight)
    a, mu = out.split(zs.shape[-1], dim=-1)
    z_next = zs.index_select(0, following)[0]
    new = torch.addcmul(mu, z_next, torch.exp(a)).to(xs.dtype)
    xs.index_copy_(0, following, new.unsqueeze(0))


def sample_sequential(
    model: TarFlow,
    z: Tensor,
    y: Tensor | None = None,
    *,
    guidance: float = 0.0,
    anneal_guidance: bool = False,
    uncond_temperature: float = 1.0,
) -> Tensor:
    """Images from noise by the fast sequential sampler (:class:`SequentialDecoder`):
    ``reverse(model, z, y, ...).images`` with the sequential strategy, up to float32
    rounding, in less time and without per-block solver results."""
    return SequentialDecoder(model)(z, y, guidance=guidance, anneal_guidance=anneal_guidance,
                                    uncond_temperature=uncond_temperature)


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

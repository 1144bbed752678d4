"""TarFlow: a transformer autoregressive normalizing flow (Zhai et al. 2024).

One readable file.  An image of shape ``(B, C, H, W)`` is cut into ``p x p`` patches,
giving ``T = (H/p)(W/p)`` tokens of dimension ``d = C p^2``.  The flow is ``K`` blocks.
Block ``k`` works in its own token order (identity for even ``k``, reversed for odd
``k``) and, in that order, computes for every position ``t`` a log-scale ``a_t`` and a
shift ``mu_t`` from the tokens *before* ``t`` with a causal transformer:

    z_t = (x_t - mu_t(x_<t)) * exp(-a_t(x_<t)),      a_0 = mu_0 = 0.

Inverting a block is the strictly triangular system ``x_t = z_t exp(a_t) + mu_t``;
:mod:`fixedpoint.tarflow.inverse` states it as a triangular map and
:mod:`fixedpoint.tarflow.sampling` solves it with the generic solvers.  This module is
the network only: it imports nothing from the rest of the package.

Parameter and buffer names (and shapes) follow the published TarFlow state-dict layout,
so a published checkpoint loads with ``load_state_dict`` directly (or, with shape
inference and validation, through :meth:`TarFlow.from_published_state_dict`):

    blocks.{k}.proj_in.{weight,bias}
    blocks.{k}.pos_embed                       (T, width)
    blocks.{k}.class_embed                     (num_classes, 1, width), conditional only
    blocks.{k}.attn_blocks.{l}.attention.{norm,qkv,proj}.{weight,bias}
    blocks.{k}.attn_blocks.{l}.mlp.{norm,main.0,main.2}.{weight,bias}
    blocks.{k}.proj_out.{weight,bias}          (2d, width): rows [:d] -> a, [d:] -> mu
    blocks.{k}.attn_mask                       (T, T) lower-triangular ones (a constant)
    var                                        (T, d) prior variance

Two facts of that layout matter for loading published weights exactly: the position
embedding is indexed by the token's *original* position (it is permuted together with
the tokens), and the class embedding carries a singleton middle axis.  There is no final
LayerNorm before ``proj_out``.

Incremental evaluation (for sequential and block solvers) goes through an explicit
:class:`KVCache` object owned by the caller; no module stores caches or mode flags.

Mixed precision: under ``torch.autocast`` the linear layers run in the low precision,
while LayerNorm, the attention softmax (inside ``scaled_dot_product_attention``) and
``exp`` are computed in float32.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Attention",
    "AttentionBlock",
    "BlockTrace",
    "DecodeCache",
    "DecodeParams",
    "KVCache",
    "MLP",
    "MetaBlock",
    "TarFlow",
    "TarFlowConfig",
    "decode_step",
]


# --------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class TarFlowConfig:
    """Shape of a TarFlow model.  ``num_classes=0`` means unconditional."""

    image_size: int = 8
    channels: int = 1
    patch_size: int = 2
    width: int = 64
    blocks: int = 4
    layers: int = 2
    head_dim: int = 64
    num_classes: int = 10
    noise_std: float = 0.1

    def __post_init__(self) -> None:
        for name in ("image_size", "channels", "patch_size", "width", "blocks", "layers",
                     "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TarFlowConfig.{name} must be a positive int, got {value!r}")
        nc = self.num_classes
        if not isinstance(nc, int) or isinstance(nc, bool) or nc < 0:
            raise ValueError(f"TarFlowConfig.num_classes must be an int >= 0, got {nc!r}")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size={self.image_size} is not divisible by patch_size={self.patch_size}"
            )
        if self.head_dim > self.width:
            raise ValueError(
                f"head_dim={self.head_dim} exceeds width={self.width}: there must be at "
                "least one attention head"
            )
        if self.width % self.head_dim:
            raise ValueError(
                f"width={self.width} is not divisible by head_dim={self.head_dim}"
            )
        sigma = self.noise_std
        if not isinstance(sigma, (int, float)) or isinstance(sigma, bool) or not (
            0 <= sigma < math.inf
        ):
            raise ValueError(f"TarFlowConfig.noise_std must be a finite number >= 0, got {sigma!r}")

    @property
    def heads(self) -> int:
        return self.width // self.head_dim

    @property
    def seq_len(self) -> int:
        """Number of tokens ``T``."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def token_dim(self) -> int:
        """Dimension of one token, ``C p^2``."""
        return self.channels * self.patch_size**2

    @property
    def data_dim(self) -> int:
        """Dimension of one image, ``C H W`` (= ``seq_len * token_dim``)."""
        return self.channels * self.image_size**2

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TarFlowConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown TarFlowConfig field(s): {', '.join(unknown)}")
        return cls(**dict(data))


# --------------------------------------------------------------------------------------
# incremental evaluation state


@dataclass
class KVCache:
    """Keys and values of one flow block for incremental (window by window) evaluation.

    ``keys`` / ``values`` have shape ``(layers, batch, heads, T, head_dim)`` and are
    allocated once; writing a window costs O(window).  Entries ``[..., :length, :]`` are
    committed (final).  Entries past ``length`` may hold keys of a *provisional* window:
    they are overwritten by the next write and never read by a query that precedes them.
    """

    keys: Tensor
    values: Tensor
    length: int = 0

    @classmethod
    def allocate(
        cls, config: TarFlowConfig, batch: int, *, device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> KVCache:
        shape = (config.layers, batch, config.heads, config.seq_len, config.head_dim)
        keys = torch.empty(shape, device=device, dtype=dtype)
        return cls(keys=keys, values=torch.empty_like(keys), length=0)

    @property
    def batch(self) -> int:
        return self.keys.shape[1]


@dataclass
class DecodeCache:
    """Keys and values of one flow block for one-token-at-a-time decoding.

    ``kv`` has shape ``(layers, 2, rows, heads, T, head_dim)`` (index 0 keys, 1 values),
    so one copy writes a token's keys and values together.  It is allocated once and
    zero-filled: the fixed-shape step (:meth:`MetaBlock.decode_step` with ``length=None``)
    reads every entry under a mask, and a masked entry must be finite (``0 * NaN`` is
    NaN in the attention product).
    """

    kv: Tensor

    @classmethod
    def allocate(
        cls, config: TarFlowConfig, rows: int, *, device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> DecodeCache:
        shape = (config.layers, 2, rows, config.heads, config.seq_len, config.head_dim)
        return cls(torch.zeros(shape, device=device, dtype=dtype))


def wide(t: Tensor) -> Tensor:
    """``t`` in at least float32 (float64 stays float64): for exp, norms and sums."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _layer_norm(norm: nn.LayerNorm, h: Tensor) -> Tensor:
    # Always in (at least) float32: bfloat16 statistics over the width are too coarse.
    out = F.layer_norm(wide(h), norm.normalized_shape, norm.weight, norm.bias, norm.eps)
    return out.to(h.dtype)


# --------------------------------------------------------------------------------------
# transformer pieces (names follow the published layout)


class Attention(nn.Module):
    """Pre-LayerNorm causal multi-head self-attention."""

    def __init__(self, width: int, head_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.heads = width // head_dim
        self.head_dim = head_dim

    def forward(
        self,
        h: Tensor,
        *,
        q_scale: Tensor | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
        start: int = 0,
        mask: Tensor | None = None,
    ) -> Tensor:
        """Attention output for the residual stream ``h`` of shape ``(B, L, width)``.

        Without ``cache``: ``h`` holds positions ``0..L-1`` and attention is causal.
        With ``cache``: ``h`` holds positions ``start..start+L-1``; their keys and values
        are written into ``cache`` (layer ``layer``) and the queries attend to cached
        positions ``0..start-1`` plus the causal part of the window, which for
        ``start > 0`` and ``L > 1`` is the boolean ``mask`` ``(L, start + L)`` the
        caller built once for all layers (:meth:`MetaBlock.window_mask`).

        ``q_scale`` (broadcastable to ``(B, 1, 1, 1)``) multiplies the queries: a
        per-sample inverse attention temperature (used for the unconditional half of a
        classifier-free-guidance batch).
        """
        B, L, W = h.shape
        qkv = self.qkv(_layer_norm(self.norm, h))
        # (B, L, 3, heads, hd) -> 3 x (B, heads, L, hd); q heads first, then k, then v.
        q, k, v = qkv.view(B, L, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        # SDPA's is_causal aligns top-left: right for a window starting at 0, wrong for
        # one past the cache, which needs the explicit mask.
        causal = L > 1 and start == 0
        if cache is not None:
            end = start + L
            cache.keys[layer, :, :, start:end].copy_(k)
            cache.values[layer, :, :, start:end].copy_(v)
            k = cache.keys[layer, :, :, :end]
            v = cache.values[layer, :, :, :end]
            if q.dtype != k.dtype:  # autocast output vs. cache dtype
                q = q.to(k.dtype)
            if L > 1 and start > 0 and mask is None:
                raise ValueError("a window past the cache start needs its attention mask")
        if q_scale is not None:
            q = q * q_scale.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        return self.proj(out.transpose(1, 2).reshape(B, L, W))


class MLP(nn.Module):
    """Pre-LayerNorm two-layer GELU MLP with 4x expansion."""

    def __init__(self, width: int, expansion: int = 4):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.main = nn.Sequential(
            nn.Linear(width, expansion * width), nn.GELU(), nn.Linear(expansion * width, width)
        )

    def forward(self, h: Tensor) -> Tensor:
        return self.main(_layer_norm(self.norm, h))


class AttentionBlock(nn.Module):
    """One transformer layer: ``h + attn(h)`` then ``h + mlp(h)``."""

    def __init__(self, width: int, head_dim: int):
        super().__init__()
        self.attention = Attention(width, head_dim)
        self.mlp = MLP(width)

    def forward(self, h: Tensor, **attention_kwargs: Any) -> Tensor:
        h = h + self.attention(h, **attention_kwargs)
        return h + self.mlp(h)


class BlockTrace(NamedTuple):
    """What one flow block computed in the forward direction, in its permuted order."""

    x: Tensor  # (B, T, d) input tokens, permuted
    a: Tensor  # (B, T, d) log-scales (a[:, 0] = 0)
    mu: Tensor  # (B, T, d) shifts (mu[:, 0] = 0)
    z: Tensor  # (B, T, d) output tokens, permuted


class MetaBlock(nn.Module):
    """One flow block: a causal transformer predicting ``(a_t, mu_t)`` from ``x_<t``."""

    attn_mask: Tensor

    def __init__(self, config: TarFlowConfig, flip: bool):
        super().__init__()
        T, d, W = config.seq_len, config.token_dim, config.width
        self.flip = flip
        self.token_dim = d
        self.proj_in = nn.Linear(d, W)
        self.pos_embed = nn.Parameter(torch.randn(T, W) * 0.01)
        if config.num_classes:
            self.class_embed = nn.Parameter(torch.randn(config.num_classes, 1, W) * 0.01)
        else:
            self.register_parameter("class_embed", None)
        self.attn_blocks = nn.ModuleList(
            AttentionBlock(W, config.head_dim) for _ in range(config.layers)
        )
        self.proj_out = nn.Linear(W, 2 * d)
        # Zero output projection: a fresh block is the identity map (a = mu = 0).
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)
        # The causal mask, in the published layout (float ones on and below the
        # diagonal).  A window past the cache start reads its slice (window_mask); a
        # window from position 0 uses SDPA's causal mode, the same mask.
        self.register_buffer("attn_mask", torch.ones(T, T).tril())

    def permute(self, x: Tensor, dim: int = 1) -> Tensor:
        """Into this block's order (the reversal is its own inverse)."""
        return x.flip(dim) if self.flip else x

    def class_vector(self, y: Tensor | None, batch: int) -> Tensor | None:
        """Per-sample class embedding ``(B or 1, 1, width)``; ``None`` if unconditional.

        A missing label (``y is None``) or a dropped one (``y == -1``) gets the mean of
        the class embeddings, as in training with label dropout.
        """
        if self.class_embed is None:
            if y is not None:
                raise ValueError("this TarFlow is unconditional (num_classes=0): pass y=None")
            return None
        mean = self.class_embed.mean(0, keepdim=True)  # (1, 1, W)
        if y is None:
            return mean
        y = _check_labels(y, self.class_embed.shape[0], batch)
        dropped = (y < 0).view(-1, 1, 1)
        return torch.where(dropped, mean, self.class_embed[y.clamp(min=0)])

    def embedding(self, cls: Tensor | None) -> Tensor:
        """Position (+ class) embedding in this block's order: ``(B or 1, T, width)``."""
        emb = self.permute(self.pos_embed, dim=0)[None]
        return emb if cls is None else emb + cls

    def network(
        self,
        x: Tensor,
        emb: Tensor,
        *,
        q_scale: Tensor | None = None,
        cache: KVCache | None = None,
        start: int = 0,
    ) -> Tensor:
        """Raw ``proj_out`` outputs ``(B, L, 2d)`` for permuted input tokens ``x``.

        Output row ``i`` (input position ``start + i``) holds ``(a, mu)`` for position
        ``start + i + 1``: callers apply the shift.  ``emb`` is the embedding slice for
        these positions.
        """
        h = self.proj_in(x) + emb
        mask = self.window_mask(start, x.shape[1]) if cache is not None else None
        for layer, block in enumerate(self.attn_blocks):
            h = block(h, q_scale=q_scale, cache=cache, layer=layer, start=start, mask=mask)
        return self.proj_out(h)

    def decode_params(self) -> DecodeParams:
        """This block's weights arranged for :func:`decode_step` (views, no copies: the
        transposed matrices share the parameters' storage).  Make it once per sampling
        call; it is not stored on the module."""
        layers = []
        for block in self.attn_blocks:
            att, mlp = block.attention, block.mlp
            layers.append(_DecodeLayer(
                (att.norm.weight, att.norm.bias, att.norm.eps), att.qkv.weight.t(),
                att.qkv.bias, att.proj.weight.t(), att.proj.bias,
                (mlp.norm.weight, mlp.norm.bias, mlp.norm.eps), mlp.main[0].weight.t(),
                mlp.main[0].bias, mlp.main[2].weight.t(), mlp.main[2].bias,
            ))
        a = self.attn_blocks[0].attention if len(self.attn_blocks) else None
        return DecodeParams(
            self.proj_in.weight.t(), self.proj_in.bias, tuple(layers),
            self.proj_out.weight.t(), self.proj_out.bias, self.attn_mask > 0,
            a.heads if a is not None else 1, a.head_dim if a is not None else 1,
        )

    def window_mask(self, start: int, length: int) -> Tensor | None:
        """Which keys the queries of positions ``start .. start + length - 1`` see, as a
        boolean ``(length, start + length)`` slice of ``attn_mask``; None when SDPA
        needs no mask (one query sees every key so far; a window at 0 is plain causal)."""
        if length < 2 or start == 0:
            return None
        return self.attn_mask[start : start + length, : start + length] > 0

    def shifted_params(self, x: Tensor, cls: Tensor | None) -> tuple[Tensor, Tensor]:
        """``(a, mu)`` for every position of permuted tokens ``x``, shift applied."""
        out = self.network(x, self.embedding(cls))
        out = torch.cat([torch.zeros_like(out[:, :1]), out[:, :-1]], dim=1)
        a, mu = out.split(self.token_dim, dim=-1)
        return a, mu

    def trace(self, x: Tensor, cls: Tensor | None) -> BlockTrace:
        """Forward pass on original-order tokens, everything in the permuted order."""
        xp = self.permute(x)
        a, mu = self.shifted_params(xp, cls)
        z = (xp - mu) * torch.exp(-wide(a))
        return BlockTrace(xp, a, mu, z.to(x.dtype))

    def forward(self, x: Tensor, cls: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(z, logdet)``: ``z`` in the original token order, ``logdet`` of shape (B,)."""
        t = self.trace(x, cls)
        return self.permute(t.z), -wide(t.a).sum(dim=(1, 2))


# --------------------------------------------------------------------------------------
# one-token decoding (the fast sequential sampler's inner loop)


class _DecodeLayer(NamedTuple):
    norm1: tuple[Tensor, Tensor, float]
    qkv_t: Tensor
    qkv_b: Tensor
    proj_t: Tensor
    proj_b: Tensor
    norm2: tuple[Tensor, Tensor, float]
    fc1_t: Tensor
    fc1_b: Tensor
    fc2_t: Tensor
    fc2_b: Tensor


class DecodeParams(NamedTuple):
    """One flow block's weights for :func:`decode_step` (see
    :meth:`MetaBlock.decode_params`): linear weights transposed, for ``addmm``."""

    proj_in_t: Tensor
    proj_in_b: Tensor
    layers: tuple[_DecodeLayer, ...]
    proj_out_t: Tensor
    proj_out_b: Tensor
    causal: Tensor  # (T, T) bool, True on and below the diagonal
    heads: int
    head_dim: int


def _norm(h: Tensor, p: tuple[Tensor, Tensor, float]) -> Tensor:
    # _layer_norm without its conversions when h is float32 already (the common case).
    if h.dtype == torch.float32:
        return F.layer_norm(h, (h.shape[-1],), p[0], p[1], p[2])
    return F.layer_norm(wide(h), (h.shape[-1],), p[0], p[1], p[2]).to(h.dtype)


def decode_step(
    p: DecodeParams,
    x_t: Tensor,
    emb_t: Tensor,
    cache: DecodeCache,
    position: Tensor,
    *,
    length: int | None,
    q_scale: Tensor | None = None,
) -> Tensor:
    """Raw ``proj_out`` outputs ``(G * B, 2d)`` of a flow block for the one token at
    ``position``: :meth:`MetaBlock.network` on a one-token window, written for the
    sequential decoder's inner loop (functional calls on prepared weights ``p``, no
    module dispatch, one cache write per layer, 2-D activations).

    ``x_t``: the permuted input token ``(B, d)``.  ``emb_t``: its embedding for ``G``
    groups of rows ``(G, B or 1, width)``; every group reads the same token
    (classifier-free guidance: ``G = 2``, conditional then unconditional), so the input
    projection runs on ``B`` rows only.  ``position``: a one-element int64 tensor; the
    token's keys and values go into ``cache`` there.  ``length``: how many cached
    positions the query reads (``position + 1`` as a Python int, so the shapes change
    every step: the cheapest form in eager mode) or ``None``: all ``T`` positions under
    the causal mask row of ``position``, so every tensor has the same shape at every
    step (what ``torch.compile`` and CUDA graphs need).  ``q_scale``
    ``(G * B, 1, 1, 1)``: per-row inverse attention temperature.
    """
    h = (torch.addmm(p.proj_in_b, x_t, p.proj_in_t) + emb_t).reshape(-1, emb_t.shape[-1])
    rows, width = h.shape
    mask = None if length is not None else p.causal.index_select(0, position)
    for layer, w in enumerate(p.layers):
        qkv = torch.addmm(w.qkv_b, _norm(h, w.norm1), w.qkv_t)
        # (rows, 3, heads, hd): q, then k and v together into the cache in one copy.
        qkv = qkv.view(rows, 3, p.heads, p.head_dim)
        kv = cache.kv[layer]
        new = qkv[:, 1:].permute(1, 0, 2, 3).unsqueeze(3)  # (2, rows, heads, 1, hd)
        if length is None:
            kv.index_copy_(3, position, new.to(kv.dtype))
        else:  # a plain slice copy: index_copy_ along this axis is twice as slow
            kv[..., length - 1 : length, :].copy_(new)
            kv = kv[..., :length, :]
        q = qkv[:, 0].unsqueeze(2)  # (rows, heads, 1, hd)
        if q.dtype != kv.dtype:  # autocast output vs. cache dtype
            q = q.to(kv.dtype)
        if q_scale is not None:
            q = q * q_scale.to(q.dtype)
        out = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=mask)
        h = h + torch.addmm(w.proj_b, out.reshape(rows, width), w.proj_t)
        u = F.gelu(torch.addmm(w.fc1_b, _norm(h, w.norm2), w.fc1_t))
        h = h + torch.addmm(w.fc2_b, u, w.fc2_t)
    return torch.addmm(p.proj_out_b, h, p.proj_out_t)


def _check_labels(y: Tensor, num_classes: int, batch: int) -> Tensor:
    if not isinstance(y, Tensor) or y.dtype not in (torch.int64, torch.int32, torch.int16,
                                                     torch.int8, torch.uint8):
        raise TypeError(f"labels must be an integer tensor, got {type(y).__name__}"
                        f"{'' if not isinstance(y, Tensor) else ' of ' + str(y.dtype)}")
    if y.shape != (batch,):
        raise ValueError(f"labels must have shape ({batch},), got {tuple(y.shape)}")
    bad = (y < -1) | (y >= num_classes)
    if bool(bad.any()):
        raise ValueError(
            f"labels must be in [0, {num_classes}) or -1 (dropped); got {y[bad][0].item()}"
        )
    return y.long()


# --------------------------------------------------------------------------------------
# the flow


_PUBLISHED_KEY = re.compile(
    r"^blocks\.(\d+)\.(proj_in\.(weight|bias)|pos_embed|class_embed|attn_mask|"
    r"proj_out\.(weight|bias)|attn_blocks\.(\d+)\.(attention\.(norm|qkv|proj)|"
    r"mlp\.(norm|main\.0|main\.2))\.(weight|bias))$|^var$"
)


class TarFlow(nn.Module):
    """The TarFlow model.  ``model(x, y)`` maps images to ``(z_tokens, logdet)``."""

    var: Tensor

    def __init__(self, config: TarFlowConfig | None = None):
        super().__init__()
        self.config = config if config is not None else TarFlowConfig()
        c = self.config
        self.blocks = nn.ModuleList(MetaBlock(c, flip=bool(k % 2)) for k in range(c.blocks))
        # Prior variance per token entry: sampling draws z * sqrt(var).
        self.register_buffer("var", torch.ones(c.seq_len, c.token_dim))

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> TarFlow:
        """(Re)initialise every parameter and buffer as the constructor does, drawing from
        ``generator`` (a local stream: the global RNG is neither read nor advanced).

        Linear layers get torch's default (Kaiming-uniform weights, uniform biases in
        ``+-1/sqrt(fan_in)``), LayerNorms ones and zeros, the embeddings ``N(0, 0.01^2)``,
        the out-projections zeros (a fresh flow is the identity), ``var`` ones.  Works on
        a model made with ``to_empty`` (e.g. built on the meta device).  The parameters
        must live on the generator's device.
        """
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
                bound = 1.0 / math.sqrt(module.in_features)
                nn.init.uniform_(module.bias, -bound, bound, generator=generator)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for block in self.blocks:
            nn.init.normal_(block.pos_embed, 0.0, 0.01, generator=generator)
            if block.class_embed is not None:
                nn.init.normal_(block.class_embed, 0.0, 0.01, generator=generator)
            nn.init.zeros_(block.proj_out.weight)
            nn.init.zeros_(block.proj_out.bias)
            block.attn_mask.copy_(torch.ones_like(block.attn_mask).tril())
        self.var.fill_(1.0)
        return self

    # ---- tokens <-> images -----------------------------------------------------------

    def patchify(self, img: Tensor) -> Tensor:
        """``(B, C, H, W)`` -> ``(B, T, C p^2)``; row-major patches, features (c, i, j)."""
        c = self.config
        if img.ndim != 4 or img.shape[1:] != (c.channels, c.image_size, c.image_size):
            raise ValueError(
                f"expected images of shape (B, {c.channels}, {c.image_size}, {c.image_size}), "
                f"got {tuple(img.shape)}"
            )
        B, n, p = img.shape[0], c.image_size // c.patch_size, c.patch_size
        x = img.reshape(B, c.channels, n, p, n, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(B, n * n, c.token_dim)

    def unpatchify(self, tokens: Tensor) -> Tensor:
        """Inverse of :meth:`patchify`."""
        c = self.config
        if tokens.ndim != 3 or tokens.shape[1:] != (c.seq_len, c.token_dim):
            raise ValueError(
                f"expected tokens of shape (B, {c.seq_len}, {c.token_dim}), "
                f"got {tuple(tokens.shape)}"
            )
        B, n, p = tokens.shape[0], c.image_size // c.patch_size, c.patch_size
        x = tokens.reshape(B, n, n, c.channels, p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(B, c.channels, c.image_size, c.image_size)

    # ---- density ---------------------------------------------------------------------

    def forward(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Images ``(B, C, H, W)`` -> ``(z, logdet)``.

        ``z`` has shape ``(B, T, d)`` in the original token order; ``logdet`` ``(B,)`` is
        ``log |det dz/dx|`` summed over all dimensions and blocks.
        """
        h = self.patchify(x)
        logdet = wide(h.new_zeros(h.shape[0]))
        for block in self.blocks:
            h, ld = block(h, block.class_vector(y, h.shape[0]))
            logdet = logdet + ld
        return h, logdet

    def block_traces(self, x: Tensor, y: Tensor | None = None) -> list[BlockTrace]:
        """Per-block inputs, ``(a, mu)`` and outputs of a forward pass, in forward order."""
        h = self.patchify(x)
        traces = []
        for block in self.blocks:
            t = block.trace(h, block.class_vector(y, h.shape[0]))
            traces.append(t)
            h = block.permute(t.z)
        return traces

    def log_prob(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """Per-sample log-density in nats, shape (B,).

        ``log p(x) = log N(z; 0, diag(var)) + logdet``: the continuous density of the
        *noisy* data (data scaled to [-1, 1] plus Gaussian noise of std ``noise_std``).
        """
        z, logdet = self(x, y)
        var = wide(self.var)
        z = wide(z)
        log_normal = -0.5 * (z.pow(2) / var).sum((1, 2)) - 0.5 * torch.log(
            2 * math.pi * var
        ).sum()
        return log_normal + logdet

    def nll_bits_per_dim(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """Mean over the batch of ``-log p(x) / (D ln 2)`` with ``D = C H W``.

        Equals ``[0.5 sum(z^2/var) + 0.5 sum(log(2 pi var)) - logdet] / (D ln 2)``, the
        continuous density of the noisy data in bits per dimension (not a discrete
        likelihood of 8-bit images: no dequantisation correction is applied).
        """
        return -self.log_prob(x, y).mean() / (self.config.data_dim * math.log(2))

    # ---- sampling --------------------------------------------------------------------

    def sample_noise(
        self, batch: int, *, generator: torch.Generator | None = None
    ) -> Tensor:
        """Standard normal tokens ``(batch, T, d)`` (``reverse`` scales by ``sqrt(var)``)."""
        c = self.config
        return torch.randn(
            batch, c.seq_len, c.token_dim, generator=generator,
            device=self.var.device, dtype=self.var.dtype,
        )

    # ---- published checkpoints -------------------------------------------------------

    @classmethod
    def from_published_state_dict(
        cls,
        state_dict: Mapping[str, Tensor],
        *,
        channels: int = 3,
        head_dim: int = 64,
        noise_std: float = 0.1,
        config: TarFlowConfig | None = None,
    ) -> TarFlow:
        """Build a model from a state dict in the published TarFlow layout.

        Shapes give ``blocks``, ``layers``, ``width``, ``num_classes``, ``seq_len`` and
        ``token_dim``; the split of ``token_dim = channels * patch^2`` needs ``channels``,
        and the head count and noise level are not stored, so ``head_dim`` and
        ``noise_std`` are arguments.  Alternatively pass the full ``config``; it is then
        checked against the shapes.  Raises ``ValueError`` naming missing, unexpected or
        mis-shaped entries, or an ``attn_mask`` that is not the causal mask.
        """
        sd = dict(state_dict)
        unexpected = sorted(k for k in sd if not _PUBLISHED_KEY.match(k))
        if unexpected:
            raise ValueError(f"unexpected key(s) in the state dict: {_show(unexpected)}"
                             f"{_prefix_hint(unexpected)}")
        if config is None:
            config = _infer_config(sd, channels=channels, head_dim=head_dim, noise_std=noise_std)
        model = cls(config)
        expected = model.state_dict()
        missing = sorted(set(expected) - set(sd))
        extra = sorted(set(sd) - set(expected))
        if missing:
            raise ValueError(f"missing key(s) in the state dict: {_show(missing)}")
        if extra:
            raise ValueError(f"unexpected key(s) for {config}: {_show(extra)}")
        wrong = [
            f"{k}: expected {tuple(v.shape)}, got {tuple(sd[k].shape)}"
            for k, v in expected.items()
            if tuple(sd[k].shape) != tuple(v.shape)
        ]
        if wrong:
            raise ValueError("shape mismatch: " + "; ".join(wrong[:5]))
        _check_finite(sd)
        for k in range(config.blocks):
            mask = sd[f"blocks.{k}.attn_mask"]
            if not torch.equal(mask.float().cpu(), expected[f"blocks.{k}.attn_mask"]):
                raise ValueError(f"blocks.{k}.attn_mask is not the lower-triangular causal mask")
        model.load_state_dict(sd)
        return model


def _show(keys: list[str]) -> str:
    return ", ".join(keys[:8]) + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "")


def _prefix_hint(unexpected: list[str]) -> str:
    """A hint for keys saved with a wrapper's prefix (``module.`` from DataParallel /
    DistributedDataParallel, ``_orig_mod.`` from torch.compile)."""
    for prefix in ("module.", "_orig_mod."):
        if all(k.startswith(prefix) for k in unexpected):
            return (f"; every key starts with '{prefix}' (saved from a wrapped model): "
                    f"strip it first, {{k.removeprefix('{prefix}'): v for k, v in sd.items()}}")
    return ""


def _check_finite(sd: Mapping[str, Tensor]) -> None:
    """Refuse NaN / inf weights: they would only surface later as NONFINITE samples."""
    bad = [(k, int((~torch.isfinite(v)).sum())) for k, v in sd.items()
           if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        shown = ", ".join(f"{k} ({n})" for k, n in bad[:4]) + (" ..." if len(bad) > 4 else "")
        raise ValueError(f"non-finite weights (NaN or inf) in {len(bad)} tensor(s): {shown}; "
                         "the checkpoint is damaged or came from a diverged run")


def _infer_config(
    sd: Mapping[str, Tensor], *, channels: int, head_dim: int, noise_std: float
) -> TarFlowConfig:
    block_ids = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    if not block_ids:
        raise ValueError("no 'blocks.{k}.' entries: not a TarFlow state dict")
    layer_ids = {
        int(m.group(1)) for k in sd if (m := re.match(r"blocks\.0\.attn_blocks\.(\d+)\.", k))
    }
    for name in ("blocks.0.proj_in.weight", "blocks.0.pos_embed"):
        if name not in sd:
            raise ValueError(f"missing key in the state dict: {name}")
    width, token_dim = sd["blocks.0.proj_in.weight"].shape
    seq_len = sd["blocks.0.pos_embed"].shape[0]
    ce = sd.get("blocks.0.class_embed")
    num_classes = 0 if ce is None else ce.shape[0]
    patch = math.isqrt(token_dim // channels) if token_dim % channels == 0 else 0
    side = math.isqrt(seq_len)
    if patch < 1 or channels * patch * patch != token_dim:
        raise ValueError(
            f"token dimension {token_dim} is not channels * patch^2 with channels={channels}"
        )
    if side * side != seq_len:
        raise ValueError(f"sequence length {seq_len} is not a square number of patches")
    return TarFlowConfig(
        image_size=side * patch, channels=channels, patch_size=patch, width=width,
        blocks=max(block_ids) + 1, layers=max(layer_ids, default=-1) + 1,
        head_dim=head_dim, num_classes=num_classes, noise_std=noise_std,
    )

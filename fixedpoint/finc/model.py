"""FInC Flow: a multi-scale normalizing flow built on invertible k x k convolutions.

One readable file, following the architecture of Kallappa et al. (2023) at small size.
Data flow for an image with ``bins`` intensity levels:

    v in {0..bins-1}  --dequantize-->  u = (v + U[0,1)) / bins  --logit-->  s
    s --> for each level: squeeze (C, H, W) -> (4C, H/2, W/2);
                          ``steps`` x [FInC unit, ActNorm, 1x1 conv, affine coupling];
                          split half the channels off (all levels but the last),
                          modelled by a Gaussian conditioned on the other half
      --> standard normal prior on what is left.

The FInC convolution (:class:`FInCConv`) pads on one corner only and its centre tap is
unit lower triangular across channels, so it is a unit lower-triangular linear map in the
matching raster order: log-determinant exactly 0, inverse a triangular system
(:mod:`fixedpoint.finc.inverse`).  A FInC unit (:class:`FInCUnit`) splits the channels
into four groups, one per corner orientation.  Each orientation is handled by flipping the
image into the canonical top-left frame, so one kernel convention serves all four.

Inverting a FInC layer goes through a caller-supplied ``inverter``: a function that takes
the layer's triangular system and returns its solution.  :mod:`fixedpoint.finc.sampling`
provides inverters for every solver of the core; the model itself holds no solver state.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from enum import Enum
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .inverse import ChannelSystem, FInCSystem, PixelSystem

__all__ = [
    "ActNorm",
    "AffineCoupling",
    "Conv1x1",
    "FInCConv",
    "FInCFlow",
    "FInCFlowConfig",
    "FInCUnit",
    "Inverter",
    "Layout",
    "Orientation",
    "SplitPrior",
    "squeeze",
    "unsqueeze",
]

Inverter = Callable[[FInCSystem], Tensor]
"""Solves one FInC layer's triangular system; returns the solution, shape ``(B, T, d)``."""


# --------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class FInCFlowConfig:
    """Shape of a FInC Flow.  ``bins`` is the number of intensity levels of the data."""

    image_size: int = 8
    channels: int = 1
    levels: int = 2
    steps: int = 4
    kernel_size: int = 3
    hidden: int = 32
    bins: int = 17
    logit_alpha: float = 1e-6

    def __post_init__(self) -> None:
        for name in ("image_size", "channels", "levels", "steps", "kernel_size", "hidden"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.image_size % (2**self.levels):
            raise ValueError(
                f"image_size {self.image_size} must be divisible by 2**levels = "
                f"{2**self.levels} (one squeeze per level)"
            )
        if not isinstance(self.bins, int) or self.bins < 2:
            raise ValueError(f"bins must be an int >= 2, got {self.bins!r}")
        if not 0 <= self.logit_alpha < 0.5:
            raise ValueError(f"logit_alpha must be in [0, 0.5), got {self.logit_alpha!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FInCFlowConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown FInCFlowConfig fields: {', '.join(sorted(unknown))}")
        return cls(**d)

    @property
    def dims(self) -> int:
        return self.channels * self.image_size**2


# --------------------------------------------------------------------------------------
# the FInC convolution


class Orientation(Enum):
    """The padded corner; the value says which image axes to flip to reach top-left."""

    TOP_LEFT = ()
    TOP_RIGHT = (3,)
    BOTTOM_LEFT = (2,)
    BOTTOM_RIGHT = (2, 3)

    def flip(self, x: Tensor) -> Tensor:
        """To and from the canonical frame (a flip is its own inverse)."""
        return torch.flip(x, self.value) if self.value else x


class Layout(Enum):
    """How an inverse is cut into positions (see :mod:`fixedpoint.finc.inverse`)."""

    PIXEL = PixelSystem
    CHANNEL = ChannelSystem


def _centre_mask(channels: int, k: int) -> tuple[Tensor, Tensor]:
    """(learnable-entry mask, fixed unit diagonal) for a canonical FInC kernel."""
    mask = torch.ones(channels, channels, k, k)
    mask[:, :, -1, -1] = torch.tril(torch.ones(channels, channels), -1)
    unit = torch.zeros(channels, channels, k, k)
    unit[:, :, -1, -1] = torch.eye(channels)
    return mask, unit


class FInCConv(nn.Module):
    """A ``k x k`` convolution padded on one corner, unit lower-triangular centre tap.

    The learnable ``weight`` is stored in the canonical (top-left) frame; entries on and
    above the centre's diagonal are masked out and the diagonal is fixed to one, so the
    layer is invertible with log-determinant 0 whatever the weights.
    """

    def __init__(self, channels: int, k: int, orientation: Orientation = Orientation.TOP_LEFT):
        super().__init__()
        self.channels, self.k, self.orientation = channels, k, orientation
        self.weight = nn.Parameter(0.05 * torch.randn(channels, channels, k, k))
        self.bias = nn.Parameter(torch.zeros(channels))
        mask, unit = _centre_mask(channels, k)
        self.register_buffer("mask", mask, persistent=False)
        self.register_buffer("unit", unit, persistent=False)

    def kernel(self) -> Tensor:
        """The effective kernel in the canonical frame."""
        return self.weight * self.mask + self.unit

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        canon = self.orientation.flip(x)
        out = F.conv2d(F.pad(canon, (self.k - 1, 0, self.k - 1, 0)), self.kernel(), self.bias)
        return self.orientation.flip(out), x.new_zeros(x.shape[0])

    def system(self, y: Tensor, layout: Layout = Layout.PIXEL) -> FInCSystem:
        """The triangular system whose solution is ``self.inverse(y)``."""
        with torch.no_grad():
            return layout.value(self.kernel().detach(), self.bias.detach(),
                                self.orientation.flip(y))

    def reverse(self, y: Tensor, inverter: Inverter, layout: Layout = Layout.PIXEL) -> Tensor:
        sys = self.system(y, layout)
        return self.orientation.flip(sys.to_image(inverter(sys)))


class FInCUnit(nn.Module):
    """Four FInC convolutions, one per corner, each on a quarter of the channels.

    The four are independent, so their inverses are solved as one system: in each group's
    own canonical frame every group is top-left padded, and stacking the groups gives one
    canonical system with a block-diagonal kernel (same positions, same levels).
    """

    def __init__(self, channels: int, k: int):
        super().__init__()
        if channels % 4:
            raise ValueError(f"a FInC unit needs a multiple of 4 channels, got {channels}")
        self.convs = nn.ModuleList(FInCConv(channels // 4, k, o) for o in Orientation)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        outs = [conv(part)[0] for conv, part in zip(self.convs, x.chunk(4, dim=1))]
        return torch.cat(outs, dim=1), x.new_zeros(x.shape[0])

    def system(self, y: Tensor, layout: Layout = Layout.PIXEL) -> FInCSystem:
        with torch.no_grad():
            kernel = _block_diagonal([c.kernel().detach() for c in self.convs])
            bias = torch.cat([c.bias.detach() for c in self.convs])
            canon = torch.cat(
                [c.orientation.flip(part) for c, part in zip(self.convs, y.chunk(4, dim=1))],
                dim=1,
            )
            return layout.value(kernel, bias, canon)

    def reverse(self, y: Tensor, inverter: Inverter, layout: Layout = Layout.PIXEL) -> Tensor:
        sys = self.system(y, layout)
        canon = sys.to_image(inverter(sys))
        parts = canon.chunk(4, dim=1)
        return torch.cat([c.orientation.flip(p) for c, p in zip(self.convs, parts)], dim=1)


def _block_diagonal(kernels: list[Tensor]) -> Tensor:
    sizes = [k.shape[0] for k in kernels]
    C, k = sum(sizes), kernels[0].shape[-1]
    out = kernels[0].new_zeros(C, C, k, k)
    start = 0
    for kern, n in zip(kernels, sizes):
        out[start : start + n, start : start + n] = kern
        start += n
    return out


# --------------------------------------------------------------------------------------
# the other layers


class ActNorm(nn.Module):
    """Per-channel affine map, initialised from the first training batch (Glow)."""

    def __init__(self, channels: int):
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.shift = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def _initialize(self, x: Tensor) -> None:
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        std = x.std(dim=(0, 2, 3), keepdim=True)
        self.shift.copy_(-mean)
        self.log_scale.copy_(-torch.log(std + 1e-6))
        self.initialized.fill_(True)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.training and not bool(self.initialized):
            self._initialize(x)
        y = (x + self.shift) * torch.exp(self.log_scale)
        logdet = self.log_scale.sum() * x.shape[2] * x.shape[3]
        return y, logdet.expand(x.shape[0])

    def reverse(self, y: Tensor) -> Tensor:
        return y * torch.exp(-self.log_scale) - self.shift


class Conv1x1(nn.Module):
    """Invertible 1x1 convolution (Glow), initialised to a random rotation."""

    def __init__(self, channels: int):
        super().__init__()
        q, _ = torch.linalg.qr(torch.randn(channels, channels))
        self.weight = nn.Parameter(q)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y = torch.einsum("oi,bihw->bohw", self.weight, x)
        logdet = torch.linalg.slogdet(self.weight)[1] * x.shape[2] * x.shape[3]
        return y, logdet.expand(x.shape[0])

    def reverse(self, y: Tensor) -> Tensor:
        return torch.einsum("oi,bihw->bohw", torch.linalg.inv(self.weight), y)


class ZeroConv(nn.Conv2d):
    """A 3x3 convolution initialised to zero, so a new layer starts as the identity."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__(c_in, c_out, 3, padding=1)
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)


class AffineCoupling(nn.Module):
    """Glow's affine coupling: the second half moves by a scale and shift of the first."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.half = channels // 2
        self.net = nn.Sequential(
            nn.Conv2d(self.half, hidden, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, 1),
            nn.ReLU(),
            ZeroConv(hidden, 2 * (channels - self.half)),
        )

    def _scale_shift(self, xa: Tensor) -> tuple[Tensor, Tensor]:
        raw, shift = self.net(xa).chunk(2, dim=1)
        # sigmoid(raw + 2) is in (0, 1) and starts near 0.88: a bounded, stable scale.
        return torch.sigmoid(raw + 2.0), shift

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        xa, xb = x[:, : self.half], x[:, self.half :]
        scale, shift = self._scale_shift(xa)
        yb = (xb + shift) * scale
        return torch.cat([xa, yb], 1), torch.log(scale).flatten(1).sum(1)

    def reverse(self, y: Tensor) -> Tensor:
        ya, yb = y[:, : self.half], y[:, self.half :]
        scale, shift = self._scale_shift(ya)
        return torch.cat([ya, yb / scale - shift], 1)


class SplitPrior(nn.Module):
    """Factor out half the channels with a Gaussian conditioned on the other half."""

    def __init__(self, channels: int):
        super().__init__()
        self.keep = channels // 2
        self.prior = ZeroConv(self.keep, 2 * (channels - self.keep))

    def _gaussian(self, kept: Tensor) -> tuple[Tensor, Tensor]:
        mean, log_std = self.prior(kept).chunk(2, dim=1)
        return mean, log_std

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(kept, eps, log p(split | kept))``: eps is the split part standardised."""
        kept, split = x[:, : self.keep], x[:, self.keep :]
        mean, log_std = self._gaussian(kept)
        eps = (split - mean) * torch.exp(-log_std)
        logp = (-0.5 * eps**2 - log_std - 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)
        return kept, eps, logp

    def reverse(self, kept: Tensor, eps: Tensor) -> Tensor:
        mean, log_std = self._gaussian(kept)
        return torch.cat([kept, mean + torch.exp(log_std) * eps], 1)


def squeeze(x: Tensor) -> Tensor:
    """``(B, C, H, W) -> (B, 4C, H/2, W/2)``: each 2x2 block becomes 4 channels."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // 2, 2, W // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(B, 4 * C, H // 2, W // 2)


def unsqueeze(x: Tensor) -> Tensor:
    B, C, H, W = x.shape
    x = x.reshape(B, C // 4, 2, 2, H, W).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(B, C // 4, 2 * H, 2 * W)


class FlowStep(nn.Module):
    """FInC unit -> ActNorm -> 1x1 convolution -> affine coupling (the paper's order)."""

    def __init__(self, channels: int, k: int, hidden: int):
        super().__init__()
        self.finc = FInCUnit(channels, k)
        self.actnorm = ActNorm(channels)
        self.conv1x1 = Conv1x1(channels)
        self.coupling = AffineCoupling(channels, hidden)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        total = x.new_zeros(x.shape[0])
        for layer in (self.finc, self.actnorm, self.conv1x1, self.coupling):
            x, logdet = layer(x)
            total = total + logdet
        return x, total

    def reverse(self, y: Tensor, inverter: Inverter, layout: Layout) -> Tensor:
        x = self.coupling.reverse(y)
        x = self.conv1x1.reverse(x)
        x = self.actnorm.reverse(x)
        return self.finc.reverse(x, inverter, layout)


# --------------------------------------------------------------------------------------
# the flow


class FInCFlow(nn.Module):
    """The multi-scale flow.  ``forward(u)`` maps dequantized data in (0,1) to latents."""

    def __init__(self, config: FInCFlowConfig):
        super().__init__()
        self.config = config
        c = config.channels
        self.levels = nn.ModuleList()
        self.splits = nn.ModuleList()
        for level in range(config.levels):
            c *= 4
            self.levels.append(
                nn.ModuleList(FlowStep(c, config.kernel_size, config.hidden)
                              for _ in range(config.steps))
            )
            if level < config.levels - 1:
                self.splits.append(SplitPrior(c))
                c -= c // 2
        self.latent_channels = c

    # ------------------------------------------------------------------- shapes
    def latent_shapes(self) -> list[tuple[int, int, int]]:
        """Shapes (C, H, W) of the split latents, then the final one."""
        shapes = []
        c, s = self.config.channels, self.config.image_size
        for level in range(self.config.levels):
            c, s = 4 * c, s // 2
            if level < self.config.levels - 1:
                shapes.append((c - c // 2, s, s))
                c = c // 2
        shapes.append((c, s, s))
        return shapes

    def finc_units(self) -> list[FInCUnit]:
        return [step.finc for steps in self.levels for step in steps]

    # ------------------------------------------------------------ preprocessing
    def _logit(self, u: Tensor) -> tuple[Tensor, Tensor]:
        a = self.config.logit_alpha
        s = a + (1 - 2 * a) * u
        x = torch.log(s) - torch.log1p(-s)
        logdet = (math.log(1 - 2 * a) - torch.log(s) - torch.log1p(-s)).flatten(1).sum(1)
        return x, logdet

    def _sigmoid(self, x: Tensor) -> Tensor:
        a = self.config.logit_alpha
        return (torch.sigmoid(x) - a) / (1 - 2 * a)

    def dequantize(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Images in [-1, 1] on the data's grid of ``bins`` levels -> u in (0, 1)."""
        bins = self.config.bins
        v = torch.round((images + 1) / 2 * (bins - 1))
        noise = torch.rand(images.shape, generator=generator, dtype=images.dtype)
        return (v + noise.to(images.device)) / bins

    def quantize(self, u: Tensor) -> Tensor:
        """u in (0, 1) -> images in [-1, 1] on the data grid."""
        bins = self.config.bins
        v = torch.clamp(torch.floor(u * bins), 0, bins - 1)
        return v / (bins - 1) * 2 - 1

    # --------------------------------------------------------------- directions
    def forward(self, u: Tensor) -> tuple[list[Tensor], Tensor]:
        """``(latents, log p(u))``; latents are standard normal under the model."""
        x, logp = self._logit(u)
        latents = []
        for level, steps in enumerate(self.levels):
            x = squeeze(x)
            for step in steps:
                x, logdet = step(x)
                logp = logp + logdet
            if level < len(self.splits):
                x, eps, lp = self.splits[level](x)
                latents.append(eps)
                logp = logp + lp
        latents.append(x)
        prior = (-0.5 * x**2 - 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)
        return latents, logp + prior

    def reverse(
        self, latents: list[Tensor], inverter: Inverter, layout: Layout = Layout.PIXEL
    ) -> Tensor:
        """Latents -> u in (0, 1); every FInC unit is inverted by ``inverter``."""
        x = latents[-1]
        for level in reversed(range(len(self.levels))):
            if level < len(self.splits):
                x = self.splits[level].reverse(x, latents[level])
            for step in reversed(self.levels[level]):
                x = step.reverse(x, inverter, layout)
            x = unsqueeze(x)
        return self._sigmoid(x)

    def sample_latents(
        self, n: int, generator: torch.Generator | None = None, temperature: float = 1.0
    ) -> list[Tensor]:
        device = next(self.parameters()).device
        return [
            temperature * torch.randn((n, *shape), generator=generator).to(device)
            for shape in self.latent_shapes()
        ]

    def bits_per_dim(self, u: Tensor) -> Tensor:
        """Per-sample bits/dim of the discrete data whose dequantization is ``u``."""
        _, logp = self(u)
        dims = self.config.dims
        return (-logp / dims + math.log(self.config.bins)) / math.log(2)

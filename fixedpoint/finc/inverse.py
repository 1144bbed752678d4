"""The inverse of a FInC convolution as a strictly triangular system.

A FInC convolution (Kallappa et al. 2023) in its canonical orientation pads the image on
the top and the left only, so output pixel ``(h, w)`` reads the ``k x k`` input window
ending at ``(h, w)``; its kernel's centre tap (the window's bottom-right corner, index
``[k-1, k-1]``) is unit lower triangular across channels.  With ``W = I + N`` at the
centre,

    y = conv(x) + b   <=>   x = y - b - conv_strict(x)

where ``conv_strict`` uses the kernel with the centre's unit diagonal removed.  Every
output reads only inputs that come earlier in raster order, so this is a strictly causal
fixed-point system and every solver of :mod:`fixedpoint` inverts the convolution.

Two ways to cut it into positions, both exact:

* :class:`ChannelSystem`: positions are ``(pixel, channel)`` pairs in raster order,
  ``T = H W C``, ``d = 1``.  The centre tap's strictly lower part makes channel ``c`` of a
  pixel depend on its channels ``< c``: strictly causal as it stands.  Sequential
  substitution takes ``H W C`` dependent steps.
* :class:`PixelSystem`: positions are pixels, ``T = H W``, ``d = C``.  The centre tap
  restricted to one pixel is the unit lower-triangular ``C x C`` matrix ``L0``; moving it
  to the left-hand side gives ``x_p = L0^{-1} (y_p - b - sum_{taps != centre} W x)``,
  which reads only earlier pixels.  ``L0^{-1}`` is applied by forward substitution
  (``torch.linalg.solve_triangular`` with a unit diagonal), so the in-pixel solve is exact
  up to rounding and ``x = F(x)`` holds exactly when ``conv(x) + b = y``.  Sequential
  substitution takes ``H W`` steps.  This is the layout the sampler uses by default.

Dependency levels (``level(t) = 1 + max level of the positions t reads``; declared by
:meth:`FInCSystem.levels`): for ``k >= 2`` pixel ``(h, w)`` is on anti-diagonal
``h + w``, so the pixel layout has ``H + W - 1`` levels and the channel layout
``(H + W - 1) m`` where ``m`` is the longest chain of the centre tap's channel pattern
(``C`` for a dense lower triangle, the group size for a FInC unit's block-diagonal
kernel).  Levels are structural (from the kernel's zero pattern): a valid schedule for
any weights, and equal to the true levels for generic weights.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fixedpoint.maps import IncrementalMap

__all__ = ["ChannelSystem", "FInCSystem", "PixelSystem", "check_finc_kernel"]


def check_finc_kernel(kernel: Tensor) -> None:
    """Raise ValueError unless ``kernel`` is a FInC kernel in canonical orientation."""
    if not isinstance(kernel, Tensor) or kernel.ndim != 4:
        raise ValueError("kernel must be a tensor of shape (C, C, k, k)")
    c_out, c_in, kh, kw = kernel.shape
    if c_out != c_in or kh != kw or kh < 1:
        raise ValueError(f"kernel must have shape (C, C, k, k), got {tuple(kernel.shape)}")
    centre = kernel[:, :, -1, -1]
    if not bool((centre.diagonal() == 1).all()):
        raise ValueError("the kernel's centre tap must have a unit diagonal")
    if bool((torch.triu(centre, 1) != 0).any()):
        raise ValueError("the kernel's centre tap must be lower triangular across channels")


def _chain_lengths(centre: Tensor) -> Tensor:
    """Longest dependency chain ending at each channel of the centre tap's pattern."""
    C = centre.shape[0]
    pattern = (torch.tril(centre, -1) != 0).cpu()
    chain = torch.ones(C, dtype=torch.long)
    for c in range(1, C):
        reads = pattern[c, :c]
        if bool(reads.any()):
            chain[c] = 1 + int(chain[:c][reads].max())
    return chain


class FInCSystem(IncrementalMap):
    """Shared geometry and arithmetic of the two position layouts.

    Args:
        kernel: the effective kernel ``(C, C, k, k)`` in canonical (top-left padded)
            orientation, centre tap unit lower triangular (see :func:`check_finc_kernel`).
        bias: ``(C,)``.
        y: the convolution's output ``(B, C, H, W)``, canonical orientation.

    The map reads committed inputs straight from the iterate it is given (a convolution
    has nothing worth caching), so its state only records the committed length.
    """

    def __init__(self, kernel: Tensor, bias: Tensor, y: Tensor):
        check_finc_kernel(kernel)
        if not isinstance(y, Tensor) or y.ndim != 4 or y.shape[1] != kernel.shape[0]:
            raise ValueError(
                f"y must have shape (B, {kernel.shape[0]}, H, W), got "
                f"{tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__}"
            )
        if not isinstance(bias, Tensor) or bias.shape != (kernel.shape[0],):
            raise ValueError(f"bias must have shape ({kernel.shape[0]},)")
        kernel = kernel.to(y.dtype)
        self.kernel = kernel
        self.bias = bias.to(y.dtype)
        self.y = y
        self.batch, self.channels, self.height, self.width = y.shape
        self.k = kernel.shape[-1]
        self.centre = kernel[:, :, -1, -1]
        # The kernel without the centre's unit diagonal (channel layout) and without the
        # centre tap altogether (pixel layout, where L0 is solved in place).
        strict = kernel.clone()
        strict[:, :, -1, -1] = torch.tril(self.centre, -1)
        self.strict_kernel = strict
        off = kernel.clone()
        off[:, :, -1, -1] = 0
        self.off_kernel = off
        self.chain = _chain_lengths(self.centre)
        # y - b per pixel, (B, HW, C): the right-hand side in pixel order.
        self.rhs_pixels = (y - self.bias[:, None, None]).permute(0, 2, 3, 1).reshape(
            self.batch, self.height * self.width, self.channels
        )
        taps = torch.arange(self.k, device=y.device) - (self.k - 1)
        self._taps = taps

    # ------------------------------------------------------------------ layout-specific
    length: int
    dim: int

    def levels(self, length: int) -> Tensor:  # pragma: no cover - overridden
        raise NotImplementedError

    # ---------------------------------------------------------------------- geometry
    @property
    def pixels(self) -> int:
        return self.height * self.width

    def as_pixels(self, x: Tensor) -> Tensor:
        """``(B, T, d)`` iterate of this layout -> ``(B, HW, C)``."""
        return x.reshape(x.shape[0], self.pixels, self.channels)

    def to_image(self, x: Tensor) -> Tensor:
        """A solution of this layout as a canonical-orientation image ``(B, C, H, W)``."""
        return self.as_pixels(x).reshape(
            x.shape[0], self.height, self.width, self.channels
        ).permute(0, 3, 1, 2)

    def from_image(self, image: Tensor) -> Tensor:
        """Inverse of :meth:`to_image`."""
        seq = image.permute(0, 2, 3, 1).reshape(image.shape[0], self.pixels, self.channels)
        return seq.reshape(image.shape[0], self.length, self.dim)

    def initial_guess(self) -> Tensor:
        """Zeros shaped like the unknown."""
        return self.y.new_zeros(self.batch, self.length, self.dim)

    # -------------------------------------------------------------------- arithmetic
    def window_sum(self, xp: Tensor, pixels: Tensor, weight: Tensor) -> Tensor:
        """``sum_taps weight * x`` at ``pixels`` by gathering their windows: ``(B, n, C)``.

        Costs ``n k^2 C^2``: the right tool for a handful of pixels (one level, one step).
        """
        h = pixels // self.width
        w = pixels % self.width
        hh = h[:, None, None] + self._taps[None, :, None]
        ww = w[:, None, None] + self._taps[None, None, :]
        valid = (hh >= 0) & (ww >= 0)
        index = hh.clamp(min=0) * self.width + ww.clamp(min=0)
        patch = xp[:, index].masked_fill(~valid[None, ..., None], 0.0)  # (B, n, k, k, C)
        return torch.einsum("bnuvi,oiuv->bno", patch, weight)

    def _band(self, xp: Tensor, row0: int, row1: int, weight: Tensor) -> Tensor:
        """The same sum at every pixel of rows ``row0..row1-1``, by one convolution."""
        B = xp.shape[0]
        image = xp.reshape(B, self.height, self.width, self.channels).permute(0, 3, 1, 2)
        first = max(row0 - (self.k - 1), 0)
        top = (self.k - 1) - (row0 - first)
        band = F.pad(image[:, :, first:row1], (self.k - 1, 0, top, 0))
        out = F.conv2d(band, weight)
        return out.permute(0, 2, 3, 1).reshape(B, (row1 - row0) * self.width, self.channels)

    def _pixel_term(self, xp: Tensor, p0: int, p1: int, weight: Tensor) -> Tensor:
        """Window sums at pixels ``p0..p1-1``: gathered below a row's worth, else by rows."""
        if p1 - p0 < self.width:
            pixels = torch.arange(p0, p1, device=xp.device)
            return self.window_sum(xp, pixels, weight)
        row0, row1 = p0 // self.width, (p1 - 1) // self.width + 1
        band = self._band(xp, row0, row1, weight)
        offset = p0 - row0 * self.width
        return band[:, offset : offset + (p1 - p0)]

    def _pixels_computed(self, p0: int, p1: int) -> int:
        if p1 - p0 < self.width:
            return p1 - p0
        return ((p1 - 1) // self.width + 1 - p0 // self.width) * self.width

    def solve_centre(self, r: Tensor) -> Tensor:
        """``L0^{-1} r`` for ``r`` of shape ``(..., C)``: in-pixel forward substitution."""
        flat = r.reshape(-1, self.channels).T
        out = torch.linalg.solve_triangular(self.centre, flat, upper=False, unitriangular=True)
        return out.T.reshape(r.shape)

    # --------------------------------------------------------- IncrementalMap plumbing
    def init_state(self, x: Tensor) -> list[int]:
        return [0]

    def committed(self, state: list[int]) -> int:
        return state[0]

    def _check(self, x: Tensor) -> None:
        if x.shape != (self.batch, self.length, self.dim):
            raise ValueError(
                f"expected an iterate of shape {(self.batch, self.length, self.dim)}, "
                f"got {tuple(x.shape)}"
            )

    # -------------------------------------------------------- the baselines' matrices
    def matrix_entries(self) -> tuple[Tensor, Tensor, Tensor]:
        """COO ``(rows, cols, values)`` of ``M`` with ``conv(x) + b = M x + b``.

        Unknowns in ``(pixel, channel)`` raster order (the channel layout), ``N = H W C``.
        ``M`` is unit lower triangular; only structurally non-zero kernel entries appear.
        """
        H, W, C, k = self.height, self.width, self.channels, self.k
        dev = self.kernel.device
        p = torch.arange(H * W, device=dev)
        hh = (p // W)[:, None, None] + self._taps[None, :, None]
        ww = (p % W)[:, None, None] + self._taps[None, None, :]
        valid = (hh >= 0) & (ww >= 0)  # (HW, k, k)
        q = hh.clamp(min=0) * W + ww.clamp(min=0)
        o = torch.arange(C, device=dev)
        rows = (p[:, None, None, None, None] * C + o[None, None, None, :, None]).expand(
            H * W, k, k, C, C
        )
        cols = (q[..., None, None] * C + o[None, None, None, None, :]).expand(H * W, k, k, C, C)
        vals = self.kernel.permute(2, 3, 0, 1)[None].expand(H * W, k, k, C, C)
        keep = valid[..., None, None] & (vals != 0)
        return rows[keep], cols[keep], vals[keep]

    def dense_matrix(self) -> Tensor:
        """``M`` as a dense ``(H W C, H W C)`` tensor (memory grows as ``(H W C)^2``)."""
        n = self.pixels * self.channels
        rows, cols, vals = self.matrix_entries()
        M = torch.zeros(n, n, dtype=self.kernel.dtype, device=self.kernel.device)
        M.index_put_((rows, cols), vals, accumulate=True)
        return M

    def sparse_matrix(self) -> Any:
        """``M`` as a ``scipy.sparse.csr_matrix`` (float64)."""
        import scipy.sparse

        n = self.pixels * self.channels
        rows, cols, vals = self.matrix_entries()
        coo = scipy.sparse.coo_matrix(
            (vals.double().cpu().numpy(), (rows.cpu().numpy(), cols.cpu().numpy())),
            shape=(n, n),
        )
        return coo.tocsr()

    def rhs(self) -> Tensor:
        """``y - b`` flattened in ``(pixel, channel)`` order: ``(B, H W C)``."""
        return self.rhs_pixels.reshape(self.batch, -1)


class PixelSystem(FInCSystem):
    """Positions are pixels (``T = H W``, ``d = C``); see the module docstring."""

    def __init__(self, kernel: Tensor, bias: Tensor, y: Tensor):
        super().__init__(kernel, bias, y)
        self.length, self.dim = self.pixels, self.channels

    def __call__(self, x: Tensor) -> Tensor:
        self._check(x)
        term = self._band(self.as_pixels(x), 0, self.height, self.off_kernel)
        return self.solve_centre(self.rhs_pixels - term)

    def advance(self, state: list[int], x: Tensor, lo: int, hi: int) -> Tensor:
        state[0] = lo
        term = self._pixel_term(self.as_pixels(x), lo, hi, self.off_kernel)
        return self.solve_centre(self.rhs_pixels[:, lo:hi] - term)

    def positions_read(self, committed: int, lo: int, hi: int, length: int) -> int:
        return self._pixels_computed(lo, hi)

    def evaluate_at(self, x: Tensor, positions: Tensor) -> Tensor:
        """``F(x)[:, positions]`` for any set of positions, at ``n k^2 C^2`` cost."""
        term = self.window_sum(self.as_pixels(x), positions, self.off_kernel)
        return self.solve_centre(self.rhs_pixels[:, positions] - term)

    def levels(self, length: int) -> Tensor:
        if length != self.length:
            raise ValueError(f"this system has {self.length} positions, not {length}")
        p = torch.arange(self.pixels)
        if self.k == 1:
            return torch.ones(self.pixels, dtype=torch.long)
        return p // self.width + p % self.width + 1


class ChannelSystem(FInCSystem):
    """Positions are ``(pixel, channel)`` pairs (``T = H W C``, ``d = 1``)."""

    def __init__(self, kernel: Tensor, bias: Tensor, y: Tensor):
        super().__init__(kernel, bias, y)
        self.length, self.dim = self.pixels * self.channels, 1

    def __call__(self, x: Tensor) -> Tensor:
        self._check(x)
        term = self._band(self.as_pixels(x), 0, self.height, self.strict_kernel)
        return (self.rhs_pixels - term).reshape(self.batch, self.length, 1)

    def advance(self, state: list[int], x: Tensor, lo: int, hi: int) -> Tensor:
        state[0] = lo
        C = self.channels
        p0, p1 = lo // C, (hi - 1) // C + 1
        term = self._pixel_term(self.as_pixels(x), p0, p1, self.strict_kernel)
        f = (self.rhs_pixels[:, p0:p1] - term).reshape(self.batch, -1, 1)
        return f[:, lo - p0 * C : hi - p0 * C]

    def positions_read(self, committed: int, lo: int, hi: int, length: int) -> int:
        C = self.channels
        return self._pixels_computed(lo // C, (hi - 1) // C + 1) * C

    def evaluate_at(self, x: Tensor, positions: Tensor) -> Tensor:
        """``F(x)[:, positions]`` for any set of positions."""
        C = self.channels
        pixels, channel = positions // C, positions % C
        xp = self.as_pixels(x)
        h = pixels // self.width
        w = pixels % self.width
        hh = h[:, None, None] + self._taps[None, :, None]
        ww = w[:, None, None] + self._taps[None, None, :]
        valid = (hh >= 0) & (ww >= 0)
        index = hh.clamp(min=0) * self.width + ww.clamp(min=0)
        patch = xp[:, index].masked_fill(~valid[None, ..., None], 0.0)
        term = torch.einsum("bnuvi,niuv->bn", patch, self.strict_kernel[channel])
        return (self.rhs_pixels[:, pixels, channel] - term)[..., None]

    def levels(self, length: int) -> Tensor:
        if length != self.length:
            raise ValueError(f"this system has {self.length} positions, not {length}")
        m = int(self.chain.max())
        p = torch.arange(self.pixels)[:, None]
        diagonal = 0 if self.k == 1 else p // self.width + p % self.width
        return (diagonal * m + self.chain[None, :]).reshape(-1)

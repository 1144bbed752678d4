"""What a user would reach for to invert a FInC convolution without the solver core.

* :func:`solve_dense`: ``torch.linalg.solve_triangular`` on the dense ``(H W C)^2``
  matrix (memory and time grow as ``(H W C)^2``; refuses sizes above ``max_bytes``);
* :func:`solve_sparse`: ``scipy.sparse.linalg.spsolve_triangular`` on the CSR matrix;
* :func:`solve_loop`: a plain Python loop over pixels in raster order, each pixel's
  channels by forward substitution.

Each returns the solution as a canonical-orientation image ``(B, C, H, W)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .inverse import FInCSystem

__all__ = ["dense_bytes", "solve_dense", "solve_loop", "solve_sparse"]


def dense_bytes(system: FInCSystem) -> int:
    n = system.pixels * system.channels
    return n * n * system.kernel.element_size()


def _image(system: FInCSystem, flat: Tensor) -> Tensor:
    """``(B, H W C)`` in (pixel, channel) order -> ``(B, C, H, W)``."""
    B = flat.shape[0]
    return flat.reshape(B, system.height, system.width, system.channels).permute(0, 3, 1, 2)


def solve_dense(system: FInCSystem, matrix: Tensor | None = None,
                max_bytes: int = 2**30) -> Tensor:
    """Forward substitution by LAPACK/BLAS on the dense matrix (built if not given)."""
    if matrix is None:
        if dense_bytes(system) > max_bytes:
            raise MemoryError(
                f"the dense matrix would take {dense_bytes(system) / 2**20:.0f} MiB "
                f"(limit {max_bytes / 2**20:.0f} MiB)"
            )
        matrix = system.dense_matrix()
    x = torch.linalg.solve_triangular(matrix, system.rhs().T, upper=False, unitriangular=True)
    return _image(system, x.T)


def solve_sparse(system: FInCSystem, matrix=None) -> Tensor:
    """``scipy.sparse.linalg.spsolve_triangular`` on the CSR matrix (float64)."""
    from scipy.sparse.linalg import spsolve_triangular

    if matrix is None:
        matrix = system.sparse_matrix()
    rhs = system.rhs().double().cpu().numpy().T
    x = spsolve_triangular(matrix, rhs, lower=True, unit_diagonal=True)
    out = torch.from_numpy(x.T.copy()).to(system.y.dtype)
    return _image(system, out)


def solve_loop(system: FInCSystem) -> Tensor:
    """Pixel by pixel in raster order, each from its ``k x k`` window (no solver core)."""
    xp = system.y.new_zeros(system.batch, system.pixels, system.channels)
    for p in range(system.pixels):
        pixel = torch.tensor([p], device=xp.device)
        r = system.rhs_pixels[:, p : p + 1] - system.window_sum(xp, pixel, system.off_kernel)
        xp[:, p : p + 1] = system.solve_centre(r)
    return _image(system, xp.reshape(system.batch, -1))

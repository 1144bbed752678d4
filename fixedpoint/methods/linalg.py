"""Small numerical helpers shared by the Anderson-type methods."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

__all__ = ["check_history", "own_precision", "relative_ridge", "ridge_solve"]


def check_history(memory: int, ridge: float) -> None:
    """Validate an Anderson-type method's history length and ridge."""
    if not isinstance(memory, int) or isinstance(memory, bool) or memory < 1:
        raise ValueError(f"memory must be a positive int, got {memory!r}")
    if not ridge >= 0:
        raise ValueError(f"ridge must be >= 0, got {ridge!r}")


def relative_ridge(ridge: float, dtype: torch.dtype) -> float:
    """The relative ridge, never below what the dtype can resolve."""
    return max(ridge, 16 * torch.finfo(dtype).eps)


def ridge_solve(gram: Tensor, rhs: Tensor, used: Tensor, ridge: float) -> tuple[Tensor, Tensor]:
    """Solve ``(gram + ridge * scale * I) gamma = rhs`` over the used history slots.

    ``gram``: ``(..., m, m)``; ``rhs``: ``(..., m)``; ``used``: ``(..., m)`` bool or
    broadcastable.  ``scale`` is the mean diagonal of ``gram``, so the ridge is relative.
    Unused slots get an identity row and a zero right-hand side, hence ``gamma = 0``
    there.  Returns ``(gamma, info)``; ``info != 0`` marks singular systems.
    """
    m = gram.shape[-1]
    eye = torch.eye(m, dtype=gram.dtype, device=gram.device)
    scale = gram.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None] / m
    shift = relative_ridge(ridge, gram.dtype) * scale + torch.finfo(gram.dtype).tiny
    regular = gram + shift * eye
    unused = ~used
    regular = torch.where(unused[..., :, None] | unused[..., None, :], eye, regular)
    rhs = torch.where(unused, 0.0, rhs)
    return torch.linalg.solve_ex(regular, rhs)


def own_precision(x: Tensor) -> contextlib.AbstractContextManager[None]:
    """Autocast off for the solver's own least squares: they run in the iterate dtype.

    Autocast is meant for the map ``F``; under it the history products would come out in
    bfloat16/float16, losing the precision the mixing needs, and ``linalg.solve`` rejects
    the mixed dtypes outright.
    """
    device = x.device.type
    try:
        enabled = torch.is_autocast_enabled(device)
    except RuntimeError:  # device types without autocast
        return contextlib.nullcontext()
    return torch.autocast(device, enabled=False) if enabled else contextlib.nullcontext()

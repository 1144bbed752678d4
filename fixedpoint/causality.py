"""Detecting maps that are not strictly causal."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from .result import NonCausalError


def check_causal(
    F: Callable[[Tensor], Tensor], x: Tensor, positions: Iterable[int] | None = None
) -> None:
    """Raise :class:`NonCausalError` unless ``F(x)[:, t]`` ignores ``x[:, s]`` for ``s >= t``.

    Each probed input position ``s`` is perturbed on its own and the outputs at
    positions ``<= s`` must not move.  ``positions=None`` probes all ``T`` positions
    (``T + 1`` evaluations of ``F``), which finds every dependence that the perturbation
    reaches; a subset gives a cheaper spot check.  The error names the smallest
    offending output position and an input position it depends on.

    Outputs are compared exactly: a strictly causal map computes position ``t`` without
    touching later inputs, so even a rounding-level change reveals a dependence.
    """
    if not isinstance(x, Tensor) or x.ndim != 3:
        raise ValueError("check_causal needs a tensor x of shape (B, T, d)")
    length = x.shape[1]
    probe = range(length) if positions is None else sorted(set(positions))
    with torch.no_grad():
        base = F(x)
        if base.shape != x.shape:
            raise ValueError(f"F returned shape {tuple(base.shape)}, expected {tuple(x.shape)}")
        worst: tuple[int, int] | None = None
        for s in probe:
            if not 0 <= s < length:
                raise ValueError(f"probe position {s} is outside 0..{length - 1}")
            bumped = x.clone()
            bumped[:, s] += 0.5 + 0.5 * bumped[:, s].abs()
            moved = (F(bumped)[:, : s + 1] != base[:, : s + 1]).flatten(2).any(-1).any(0)
            if moved.any():
                t = int(moved.nonzero()[0])
                if worst is None or t < worst[0]:
                    worst = (t, s)
    if worst is not None:
        raise NonCausalError(*worst)

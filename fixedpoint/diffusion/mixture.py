"""Gaussian-mixture targets with an exact noise prediction in any dimension.

If the data are a mixture of isotropic Gaussians ``sum_k w_k N(mu_k, s_k^2 I)``, the
diffusion marginal at noise level ``abar`` (``x = sqrt(abar) x0 + sqrt(1 - abar) eps``)
is again such a mixture, ``N(sqrt(abar) mu_k, (abar s_k^2 + 1 - abar) I)``.  Its score,
and hence the ideal noise prediction ``eps = -sqrt(1 - abar) * score``, is available in
closed form.  That makes the mixture an oracle: sampler chains built on it need no
training, run in any dimension, and are the ground truth for property tests and for the
dimension study.

The oracle also answers class-conditional queries: label ``k`` means "component ``k``",
and the label :attr:`MixtureDenoiser.null_label` (= number of components) means the whole
mixture, so classifier-free guidance can be exercised exactly as on a trained model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["GaussianMixture", "MixtureDenoiser"]


@dataclass(frozen=True)
class GaussianMixture:
    """``sum_k weights[k] * N(means[k], stds[k]^2 I)`` in dimension ``means.shape[1]``."""

    means: Tensor  # (K, d)
    stds: Tensor  # (K,)
    weights: Tensor  # (K,), sums to one

    def __post_init__(self) -> None:
        if self.means.ndim != 2:
            raise ValueError(f"means must have shape (K, d), got {tuple(self.means.shape)}")
        k = self.means.shape[0]
        for name, value in (("stds", self.stds), ("weights", self.weights)):
            if tuple(value.shape) != (k,):
                raise ValueError(f"{name} must have shape ({k},), got {tuple(value.shape)}")
        if not bool((self.stds > 0).all()):
            raise ValueError("stds must be positive")
        if not bool((self.weights > 0).all()) or abs(float(self.weights.sum()) - 1) > 1e-6:
            raise ValueError("weights must be positive and sum to one")

    @classmethod
    def random(
        cls,
        dim: int,
        components: int = 8,
        *,
        spread: float = 0.5,
        std: float = 0.2,
        seed: int = 0,
        dtype: torch.dtype = torch.float64,
    ) -> GaussianMixture:
        """Components at random corners ``+-spread`` of a cube, all of width ``std``.

        Every coordinate of a mean is ``+-spread``, so the data live at the scale of
        images in ``[-1, 1]`` whatever the dimension; weights are random but bounded
        away from zero.
        """
        if dim < 1 or components < 1:
            raise ValueError(f"dim and components must be >= 1, got {dim}, {components}")
        g = torch.Generator().manual_seed(seed)
        signs = torch.randint(0, 2, (components, dim), generator=g).to(dtype) * 2 - 1
        weights = 1 + torch.rand(components, generator=g, dtype=dtype)
        return cls(
            means=spread * signs,
            stds=torch.full((components,), std, dtype=dtype),
            weights=weights / weights.sum(),
        )

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def components(self) -> int:
        return self.means.shape[0]

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``n`` draws and the component each came from."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=self.means.dtype)
        return self.means[k] + self.stds[k, None] * z, k

    def eps(self, x: Tensor, abar: Tensor, component: Tensor | None = None) -> Tensor:
        """The exact noise prediction ``E[eps | x]`` at noise level ``abar`` (per row).

        ``x`` is ``(R, d)``, ``abar`` is ``(R,)``; ``component`` (``(R,)``, optional)
        conditions row ``r`` on component ``component[r]``, where the value
        ``self.components`` means no condition.  Computed in float64, returned in
        ``x.dtype``.
        """
        dtype = x.dtype
        x = x.double()
        abar = abar.double().to(x.device)[:, None]  # (R, 1)
        means, stds = self.means.double().to(x.device), self.stds.double().to(x.device)
        var = abar * stds[None, :] ** 2 + (1 - abar)  # (R, K)
        centred = x[:, None, :] - abar.sqrt()[:, :, None] * means[None]  # (R, K, d)
        sq = (centred**2).sum(-1)  # (R, K)
        logw = self.weights.double().to(x.device).log()[None, :]
        logp = logw - 0.5 * sq / var - 0.5 * self.dim * var.log()
        if component is not None:
            component = component.to(x.device)
            pick = torch.arange(self.components, device=x.device)[None, :] == component[:, None]
            conditioned = (component < self.components)[:, None]
            logp = torch.where(conditioned & ~pick, -math.inf, logp)
        resp = torch.softmax(logp, dim=1)  # posterior over components
        score = -(resp[:, :, None] * centred / var[:, :, None]).sum(1)
        return (-(1 - abar).sqrt() * score).to(dtype)


class MixtureDenoiser:
    """A :class:`GaussianMixture` behind the same interface as a trained noise predictor.

    ``denoiser(x, timesteps, labels)`` returns ``eps`` for ``x`` of shape ``(R, d)`` at
    the discrete training timesteps ``timesteps`` (``(R,)``) of the schedule
    ``alphas_cumprod``; labels select components (see the module docstring).
    """

    def __init__(self, mixture: GaussianMixture, alphas_cumprod: Tensor):
        self.mixture = mixture
        self.alphas_cumprod = alphas_cumprod.double()
        self.sample_shape: tuple[int, ...] = (mixture.dim,)
        self.num_classes: int | None = mixture.components
        self.null_label = mixture.components

    def __call__(self, x: Tensor, timesteps: Tensor, labels: Tensor | None = None) -> Tensor:
        abar = self.alphas_cumprod[timesteps.long().cpu()]
        return self.mixture.eps(x.flatten(1), abar, labels).reshape(x.shape)

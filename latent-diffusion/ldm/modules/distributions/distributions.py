"""The KL autoencoder's posterior over latents."""

from __future__ import annotations

import torch


class DiagonalGaussianDistribution:
    """A diagonal Gaussian whose mean and log-variance are stacked along dim 1.

    The log-variance is clamped to [-30, 20] as in CompVis' original so that
    `exp` stays finite for released checkpoints.
    """

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = torch.chunk(moments, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw mean + std * noise; pass `generator` for reproducible latents."""
        noise = torch.randn(self.mean.shape, generator=generator,
                            device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL divergence to the standard normal prior, one value per example (summed over
        its latent): the autoencoder's regulariser, 0 for a posterior that is N(0, 1)."""
        terms = self.mean.pow(2) + self.var - 1.0 - self.logvar
        return 0.5 * terms.sum(dim=list(range(1, terms.ndim)))

"""Moving between images in [0, 1] and the diffusion model's scaled latent space."""

import torch


@torch.no_grad()
def encode(autoencoder, images, scale, generator=None):
    """Images [n, 3, H, W] in [0, 1] -> a sample of the posterior, divided by `scale`.

    The scale brings the latents to roughly unit variance, as the noise schedule assumes.
    """
    return autoencoder.encode(images * 2 - 1).sample(generator=generator) / scale


@torch.no_grad()
def posterior(autoencoder, images):
    """Images [n, 3, H, W] in [0, 1] -> the mean and std of the autoencoder's posterior
    N(mean, std^2), unscaled: what a latent cache stores and the scale is computed from."""
    moments = autoencoder.encode(images * 2 - 1)
    return moments.mean, moments.std


@torch.no_grad()
def decode(autoencoder, latents, scale):
    """Scaled latents -> images [n, 3, H, W] in [0, 1]."""
    images = autoencoder.decode(latents * scale)
    return ((images.float() + 1) / 2).clamp(0, 1)


def posterior_sample(mean, std, scale):
    """A latent drawn from the autoencoder's posterior N(mean, std^2), divided by `scale`.

    Used for images encoded on the fly and for cached means and stds alike, so both draw
    the same random numbers in the same order.
    """
    return (mean + std * torch.randn_like(mean)) / scale

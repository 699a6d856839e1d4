"""CLOOB-conditioned latent diffusion: training and sampling library."""

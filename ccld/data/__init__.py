"""Training data, from image files to latents: loading and preprocessing images, path lists
and tar shards, the latent cache and its precompute, and the autoencoder scale estimate.

May import `models` and `diffusion`; never `sample` or `train`.
"""

"""Training data, from image files to latents: loading and preprocessing images; path
lists, tar shards, parquet files and Hugging Face datasets, split across ranks and loader
workers; the latent cache and its precompute; and the autoencoder scale estimate.

May import `models` and `diffusion`; never `sample` or `train`.
"""

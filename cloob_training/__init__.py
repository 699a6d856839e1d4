"""CLOOB encoders (a PyTorch port of the released JAX models) that condition the diffusion model."""

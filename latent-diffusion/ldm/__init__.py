"""The slice of CompVis' `ldm` package that CLOOB-conditioned latent diffusion needs.

It keeps the original module paths so that the `target:` entries of CompVis config
files (e.g. `ldm.models.autoencoder.AutoencoderKL`) name real classes.
"""

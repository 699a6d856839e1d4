"""Training losses, at the paths CompVis configs name them (`lossconfig.target`)."""

from ldm.modules.losses.contperceptual import LPIPSWithDiscriminator

__all__ = ['LPIPSWithDiscriminator']

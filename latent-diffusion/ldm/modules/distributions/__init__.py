"""Probability distributions produced by `ldm` encoders."""

"""Building blocks shared by the `ldm` models."""

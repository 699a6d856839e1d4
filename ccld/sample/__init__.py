"""Prompts in, images out, and how good they are: prompts and prompt files, the sampler
every tool builds its models through, the generation pipeline, PNG files with their
settings as metadata, CLOOB scores, and the comparison of checkpoints (feature networks,
Frechet distance and KID, reference-set features, grids and gallery, reports).

May import `data`, `models` and `diffusion`; never `train`.
"""

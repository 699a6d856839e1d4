"""Prompts in, images out: prompts and prompt files, the generation pipeline, PNG files
with their settings as metadata, and CLOOB scores.

May import `data`, `models` and `diffusion`; never `train`.
"""

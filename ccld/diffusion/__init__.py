"""The diffusion maths: the cosine noise schedule and the sampling timesteps, the samplers,
classifier-free guidance and the training objective.

Pure functions of tensors and of a model given as a callable: no Lightning, no files.
Imports nothing from the other groups.
"""

"""The networks and the files they come in: the v-objective U-Net, the KL autoencoder and
CLOOB loaders, latents and their scale, LPIPS and its weights, and the kinds of diffusion
checkpoint users own.

Imports nothing from the other groups (`diffusion` included): a model is a module, its
maths is elsewhere.
"""

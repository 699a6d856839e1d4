"""Training runs on Lightning: the LightningModules (the diffusion model, and the
autoencoder finetune), the runs' set-up from the flags, checkpoint saving, stop signals,
throughput, EMA, demo grids, reconstruction grids, and the --demo pipeline check.

The top of the library: may import every other group.
"""

"""Training runs on Lightning: the LightningModule, the run's set-up from the flags,
checkpoint saving, stop signals, throughput, EMA, demo grids, and the --demo pipeline check.

The top of the library: may import every other group.
"""

"""CLOOB-conditioned latent diffusion: the library behind the command-line tools.

It is grouped by the stage data flows through, each group a package that imports only
the groups below it (tests/test_layout.py checks this):

    diffusion, models   the maths (schedules, samplers, guidance, the objective) and the
                        networks and their files (U-Net, autoencoder, CLOOB, checkpoints)
    data                images, path lists, tar shards and the latent cache
    sample              prompts in, images out: generation, PNG files, scores
    train               Lightning runs: the modules, saving, signals, demo grids

The modules at this level are shared by every group: `errors`, `cli` (what every
command-line tool does with its flags and errors), `files` and `processes`.
`ccld.unet`, `ccld.schedule` and `ccld.sampling` are the first release's public names
of modules that now live in `models` and `diffusion`; they still import.
"""


def software_version():
    """The installed ccld's version, recorded in the files it writes."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version('ccld')
    except PackageNotFoundError:
        return 'unknown'

#!/usr/bin/env python3
"""Trains a CLOOB-conditioned latent diffusion model from a list of image paths.

    python3 train_latent_diffusion.py --train-set train.txt --vqgan-model kl_f8 \\
        --autoencoder-scale 8.0779 --demo-prompts demo_prompts.txt --num-gpus 8

`python3 train_latent_diffusion.py --demo` runs the whole pipeline on a tiny model on
the CPU, with everything it needs generated locally.
"""

from ccld import cli
from ccld.train.flags import PROG, parser


def __getattr__(name):
    """The model classes are importable from here, as from the original script, but are
    imported on first use, so that --help and usage errors need not wait for torch."""
    if name == 'DiffusionModel':
        from ccld.models.unet import DiffusionModel
        return DiffusionModel
    if name == 'LightningDiffusion':
        from ccld.train.diffusion_module import LightningDiffusion
        return LightningDiffusion
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def main(argv=None):
    args = parser().parse_args(argv)
    if args.demo:
        from ccld.train import quickstart
        quickstart.check_demo_flags(args, parser().parse_args([]))
        quickstart.run(args.output_dir if args.output_dir != 'outputs' else 'demo_output')
        return
    from ccld.train import run
    run.run(run.validate(args))


if __name__ == '__main__':
    cli.run(main, PROG)

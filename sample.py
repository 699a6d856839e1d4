#!/usr/bin/env python3
"""Samples images from a CLOOB-conditioned latent diffusion model, guided by text and
image prompts.

    python3 sample.py "a watercolor of a lighthouse" "storm:1.5" --images ref.jpg:2 \\
        --checkpoint yfcc_cfg.pth --autoencoder kl_f8 -n 8
    python3 sample.py --prompts-file prompts.txt --checkpoint yfcc_cfg.pth -n 4

Writes out_00000.png, ... and out_grid.png; with --prompts-file, LINE_SLUG_00000.png, ...
and LINE_SLUG_grid.png for each line. Each PNG records its prompts and settings.
"""

from ccld import cli
from ccld.sample.flags import PROG, parser


def main(argv=None):
    args = parser().parse_args(argv)
    from ccld.sample.run import run
    run(args)


if __name__ == '__main__':
    cli.run(main, PROG)

#!/usr/bin/env python3
"""Finetunes a KL f=8 autoencoder on your own images, with latent-diffusion's loss.

    python3 train_autoencoder.py --train-set my_art.txt --vqgan-model kl_f8 \\
        --output-name my_art_kl_f8 --val-set my_art_val.txt --num-gpus 1 --fprecision bf16

Decoder-only by default: the encoder stays bit-identical, so every U-Net and latent cache
made with --vqgan-model stays valid with the finetuned autoencoder.
"""

from ccld import cli
from ccld.train.autoencoder_flags import PROG, parser


def main(argv=None):
    args = parser().parse_args(argv)
    from ccld.train import autoencoder_run
    autoencoder_run.run(autoencoder_run.validate(args))


if __name__ == '__main__':
    cli.run(main, PROG)

#!/usr/bin/env python3
"""Distils a trained model into a student that samples in a few U-Net calls: guidance
distillation (one call a step instead of two), then progressive distillation (half the
steps each round), from a latent cache of the training images.

    python3 distill.py --teacher yfcc-latent-diffusion-f8-e2-s250k.ckpt \\
        --train-latents latents/ --vqgan-model kl_f8 \\
        --cloob-checkpoint cloob_laion_400m_vit_b_16_16_epochs --output-dir distilled/ \\
        --start-steps 64 --target-steps 4 --num-gpus 8 --fprecision bf16

Writes distilled/student.ckpt, which sample.py --checkpoint samples in --target-steps
calls, and each stage's student beside it. After any interruption, run the same command
with --resume-from auto.
"""

from ccld import cli
from ccld.train.distill_flags import PROG, parser


def main(argv=None):
    args = parser().parse_args(argv)
    from ccld.train import distill_run
    distill_run.run(distill_run.validate(args))


if __name__ == '__main__':
    cli.run(main, PROG)

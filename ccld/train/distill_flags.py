"""The flags of distill.py: its own, and the training groups of flags.py where they apply,
so that a flag it shares with training (--batch-size, --resume-from, --num-gpus, ...)
means the same. Imports no torch, so --help is quick."""

import argparse

from .. import cli
from . import flags

PROG = 'distill.py'
DESCRIPTION = ('Distils a trained model into a student that samples in a few U-Net calls: '
               'guidance distillation (one call a step instead of two, for any guidance '
               'scale of a range), then progressive distillation (half the steps each round).')
EPILOG = ('Writes OUTPUT_DIR/student.ckpt (the final student) and each stage\'s student '
          'beside it (student-guidance.ckpt, student-32-steps.ckpt, ...); each stage is a '
          'training run in OUTPUT_DIR/STAGE (checkpoints, demo grids, logs). Demo grids need '
          '--demo-prompts.')
WEIGHTINGS = ('snr+1', 'truncated-snr')  # ccld.diffusion.distillation.WEIGHTINGS, without torch
ROUND_STEPS = 5000
RESUME_HELP = ('"auto": continue an interrupted distillation in --output-dir where it '
               'stopped, in its stage, round and step (a fresh start when there is nothing '
               'to continue)')


def guidance_range(text):
    """'1,8' -> (1.0, 8.0): two finite numbers, the first below the second."""
    try:
        low, high = (cli.finite_float(part) for part in text.split(','))
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(f'expected two numbers like 1,8, got {text!r}') from None
    if not low < high:
        raise argparse.ArgumentTypeError(f'the first number must be below the second, got '
                                         f'{text!r}')
    return low, high


def parser():
    p = cli.ArgumentParser(prog=PROG, description=DESCRIPTION, epilog=EPILOG)
    d = p.add_argument_group('distillation')
    d.add_argument('--teacher', metavar='CHECKPOINT',
                   help='the model to distil: any file sample.py takes (a released state dict, '
                   'a ccld or original training checkpoint, an export)' + cli.HUB_FILE_HELP)
    d.add_argument('--train-latents', metavar='DIR',
                   help='latent cache of the training images (precompute_latents.py), made with '
                   '--vqgan-model and --cloob-checkpoint')
    d.add_argument('--guidance-range', type=guidance_range, default='1,8',
                   metavar='LOW,HIGH',
                   help='guidance scales w the student learns, drawn uniformly (sample.py\'s '
                   '--cond-scale is 3 by default)')
    d.add_argument('--start-steps', type=cli.positive_int, default=64,
                   help='DDIM steps of the teacher of the first progressive round (its '
                   'student takes half as many)')
    d.add_argument('--target-steps', type=cli.positive_int, default=4,
                   help='steps of the final student; --start-steps divided by a power of 2')
    d.add_argument('--round-steps', type=cli.positive_int, default=ROUND_STEPS,
                   help='optimizer steps of the guidance stage and of each progressive round')
    d.add_argument('--loss-weighting', default='snr+1', choices=WEIGHTINGS,
                   help="Salimans & Ho's weightings of the x0 error: snr+1 is the v error "
                   'training uses, truncated-snr weighs mid-noise half as much')
    d.add_argument('--autoencoder-scale', type=cli.positive_float,
                   help='override the latent scale the teacher records')
    flags.add_frozen_model_flags(p)
    flags.add_image_flags(p, train_set_help=None)
    flags.add_caption_flags(p, train_set=False, default=None,
                            default_help='default: the --text-prob the teacher was trained with')
    flags.add_optimizer_flags(p)
    flags.add_run_flags(p, resume_help=RESUME_HELP, output_dir='distilled',
                        output_help='the students, and each stage\'s checkpoints, demo grids '
                        'and logs', max_steps=False)
    flags.add_device_flags(p)
    flags.add_demo_flags(p)
    flags.add_speed_flags(p)
    # Each stage is a run of --round-steps: the LR decays to --lr-min over each.
    p.set_defaults(lr_schedule='cosine')
    return p

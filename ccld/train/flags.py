"""The flags of train_latent_diffusion.py: the original script's, with the same names and
defaults, and those added since. Here rather than in the script so that the --demo
pipeline check runs a training from flags without importing the script."""

import argparse

from .. import cli

DESCRIPTION = 'Trains a CLOOB-conditioned latent diffusion model from a list of image paths.'
PROG = 'train_latent_diffusion.py'
SIGNALS = ('SIGHUP', 'SIGINT', 'SIGTERM', 'SIGUSR1', 'SIGUSR2')
PRECISIONS = {'16': '16-mixed', '32': '32-true', 'bf16': 'bf16-mixed', '64': '64-true'}
LIGHTNING_PRECISIONS = {'16-mixed', 'bf16-mixed', '32-true', '64-true', '16-true',
                        'bf16-true', 'transformer-engine', 'transformer-engine-float16'}


def precision(text):
    if text in PRECISIONS or text in LIGHTNING_PRECISIONS:
        return PRECISIONS.get(text, text)
    raise argparse.ArgumentTypeError(f'expected 16, 32, bf16 or a Lightning precision such as '
                                     f'bf16-mixed, got {text!r}')


def parser():
    p = cli.ArgumentParser(prog=PROG, description=DESCRIPTION)
    p.add_argument('--demo', action='store_true',
                   help='run the tiny CPU pipeline check (generates its own data and models)')
    # The original script's flags, same names and defaults.
    p.add_argument('--cloob-checkpoint', default='cloob_laion_400m_vit_b_16_16_epochs',
                   help='pretrained CLOOB name, or a .pkl file')
    p.add_argument('--vqgan-model', help='autoencoder NAME, for NAME.yaml + NAME.ckpt')
    p.add_argument('--autoencoder-scale', type=cli.positive_float,
                   help='latent scale of the autoencoder (see compute_ae_scale.py)')
    p.add_argument('--train-set', help='text file with one image path per line, or webdataset '
                   'tar shards (data/{00000..01023}.tar, or a directory of .tar files)')
    p.add_argument('--checkpoint-every', type=cli.positive_int, default=50000,
                   help='write checkpoints/step=N.ckpt (and last.ckpt) every this many steps')
    p.add_argument('--resume-from', help='a ccld checkpoint, a checkpoint of the original '
                   'script, a released model state dict to finetune, or "auto": the newest good '
                   'checkpoint in --output-dir (a fresh start when there is none)')
    p.add_argument('--demo-prompts', help='text file with one demo prompt per line')
    p.add_argument('--demo-every', type=cli.positive_int, default=2000,
                   help='render a demo grid every this many steps (and on the first)')
    p.add_argument('--wandb-project', help='log to this wandb project (else log locally)')
    p.add_argument('--fprecision', type=precision, default='32',
                   help='16, 32, bf16, or a Lightning precision string')
    p.add_argument('--num-gpus', '--devices', dest='devices', type=cli.positive_int, default=1,
                   help='devices (processes) per node')
    p.add_argument('--num-workers', type=cli.non_negative_int, default=12,
                   help='data loading processes per device')
    p.add_argument('--batch-size', type=cli.positive_int, default=64, help='per device')
    p.add_argument('--base-channels', type=cli.positive_int, default=128,
                   help='U-Net width unit (danbooru_cfg: 128; yfcc_cfg: 192)')
    p.add_argument('--channel-multipliers', type=cli.multipliers, default=[4, 4, 8, 8],
                   help='widths of the four U-Net levels, as multiples of --base-channels')
    p.add_argument('--ema-decay-at', type=cli.positive_int, default=200000,
                   help='the EMA decay goes from 0.999 to 0.9999 at this step')
    # Added.
    p.add_argument('--train-latents', metavar='DIR',
                   help='train from a latent cache made by precompute_latents.py, instead of '
                   '--train-set')
    p.add_argument('--num-nodes', type=cli.positive_int, default=1,
                   help='machines (start the same command on each, under torchrun or SLURM)')
    p.add_argument('--accelerator', default='auto', choices=['auto', 'cpu', 'gpu', 'cuda', 'mps'],
                   help='where to train; auto is the GPU when there is one')
    p.add_argument('--strategy', default='auto',
                   help="auto (ddp with more than one device), ddp, fsdp, deepspeed, ...")
    p.add_argument('--lr', type=cli.positive_float, default=3e-5,
                   help='learning rate, also applied when resuming')
    p.add_argument('--lr-warmup-steps', type=cli.non_negative_int, default=0,
                   help='raise the LR linearly from 0 over this many steps')
    p.add_argument('--lr-schedule', default='constant',
                   choices=['constant', 'cosine', 'inverse-sqrt'],
                   help='after the warmup: keep --lr, decay it to --lr-min by --max-steps '
                   '(cosine), or as 1/sqrt(step)')
    p.add_argument('--lr-min', type=cli.non_negative_float, default=0.0,
                   help='the LR the cosine and inverse-sqrt schedules end at')
    p.add_argument('--random-flip', action='store_true',
                   help='mirror each training image left to right half of the time (for small '
                   'finetunes; off, as in the original)')
    p.add_argument('--max-steps', type=cli.positive_int, help='stop after this many steps')
    p.add_argument('--output-dir', default='outputs',
                   help='checkpoints, demo grids and local logs go here')
    p.add_argument('--seed', type=cli.training_seed, default=None,
                   help='random seed (default: random)')
    p.add_argument('--accumulate-grad-batches', type=cli.positive_int, default=1,
                   help='batches whose gradients add up to one optimizer step')
    p.add_argument('--grad-clip', type=cli.positive_float, help='clip the gradient norm')
    p.add_argument('--image-size', type=cli.positive_int, default=256,
                   help='training image size in pixels (latents are 1/8 of it)')
    p.add_argument('--demo-steps', type=cli.positive_int, default=50,
                   help='sampling steps of the demo grids')
    p.add_argument('--demo-method', default='plms', choices=cli.SAMPLING_METHODS,
                   help='sampler of the demo grids (plms2 with --demo-steps 25 --demo-schedule '
                   'karras: half the model calls, see BENCHMARKS.md)')
    p.add_argument('--demo-schedule', default='spliced', choices=cli.SCHEDULES,
                   help='timesteps of the demo grids')
    p.add_argument('--checkpoint-minutes', type=cli.positive_float, default=30,
                   help='also write last.ckpt this often, so a kill -9 loses at most this much')
    p.add_argument('--keep-last', type=cli.positive_int,
                   help='keep only the newest N step checkpoints (default: keep all)')
    p.add_argument('--signal', default='SIGUSR1', choices=sorted(SIGNALS),
                   help='a warning signal that, like SIGTERM and SIGINT, saves a checkpoint and '
                   'stops the run (SLURM: sbatch --signal=USR1@120)')
    p.add_argument('--peak-tflops', type=cli.positive_float,
                   help='the device\'s peak TFLOP/s at the training precision, for the FLOP '
                   'utilisation in the logs (default: known for A100, H100, H200, L40S, 4090...)')
    # Speed; none changes what a checkpoint holds.
    p.add_argument('--compile', action='store_true',
                   help='torch.compile the U-Net (minutes of compiling at the start)')
    p.add_argument('--channels-last', action='store_true',
                   help='keep the U-Net\'s activations channels-last (NHWC)')
    p.add_argument('--tf32', action=argparse.BooleanOptionalAction,
                   help='TF32 matrix maths on Ampere and later GPUs (default: torch\'s, for '
                   'convolutions only)')
    p.add_argument('--gradient-checkpointing', action='store_true',
                   help='recompute each U-Net block\'s activations in the backward pass: less '
                   'memory (bigger batches), about a third more compute')
    p.add_argument('--prefetch-factor', type=cli.positive_int, default=2,
                   help='batches each loader worker prepares ahead')
    p.add_argument('--max-bad-steps', type=cli.positive_int, default=50,
                   help='stop after this many steps in a row with a non-finite loss or gradient')
    return p

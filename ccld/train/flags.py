"""The flags of the training tools, in groups that every tool which trains something takes
from here, so that a flag they share (--batch-size, --resume-from, --num-gpus, ...) means
the same in each. train_latent_diffusion.py's keep the original script's names and
defaults. The parsers live here rather than in the scripts so that the --demo pipeline
check runs a training from flags without importing a script."""

import argparse

from .. import cli
from ..errors import UserError

DESCRIPTION = 'Trains a CLOOB-conditioned latent diffusion model from a list of image paths.'
PROG = 'train_latent_diffusion.py'
SIGNALS = ('SIGHUP', 'SIGINT', 'SIGTERM', 'SIGUSR1', 'SIGUSR2')
PRECISIONS = {'16': '16-mixed', '32': '32-true', 'bf16': 'bf16-mixed', '64': '64-true'}
LIGHTNING_PRECISIONS = {'16-mixed', 'bf16-mixed', '32-true', '64-true', '16-true',
                        'bf16-true', 'transformer-engine', 'transformer-engine-float16'}
TRAIN_SET_HELP = cli.IMAGES_HELP
RESUME_HELP = ('a ccld checkpoint, a checkpoint of the original script, a released model state '
               'dict to finetune, or "auto": the newest good checkpoint in --output-dir (a fresh '
               'start when there is none)' + cli.HUB_FILE_HELP)


def precision(text):
    if text in PRECISIONS or text in LIGHTNING_PRECISIONS:
        return PRECISIONS.get(text, text)
    raise argparse.ArgumentTypeError(f'expected 16, 32, bf16 or a Lightning precision such as '
                                     f'bf16-mixed, got {text!r}')


def add_frozen_model_flags(p):
    g = p.add_argument_group('frozen models')
    g.add_argument('--vqgan-model', help=cli.AUTOENCODER_HELP)
    g.add_argument('--cloob-checkpoint', default='cloob_laion_400m_vit_b_16_16_epochs',
                   help=cli.CLOOB_HELP)
    return g


def add_image_flags(p, train_set_help=TRAIN_SET_HELP):
    """Training images and how they are loaded (without --train-set when its help is
    None: a tool that trains from a latent cache only)."""
    g = p.add_argument_group('training images')
    if train_set_help is not None:
        g.add_argument('--train-set', help=train_set_help)
        cli.add_table_flags(g)
    g.add_argument('--image-size', type=cli.positive_int, default=256,
                   help='training image size in pixels (latents are 1/8 of it)')
    g.add_argument('--batch-size', type=cli.positive_int, default=64, help='per device')
    g.add_argument('--num-workers', type=cli.non_negative_int, default=cli.default_workers(),
                   help='data loading processes per device (by default one per usable CPU, at '
                   'most 8)')
    g.add_argument('--prefetch-factor', type=cli.positive_int, default=2,
                   help='batches each loader worker prepares ahead')
    return g


TEXT_PROB_DEFAULT = 'default 0: image embeddings only, as the original'


def add_caption_flags(p, train_set=True, default=0.0, default_help=TEXT_PROB_DEFAULT):
    """Captions, where the data has them: which column holds them (with --train-set), and
    how often training conditions on their CLOOB text embedding (data/captions.py)."""
    g = p.add_argument_group('captions')
    if train_set:
        cli.add_caption_flag(g)
    g.add_argument('--text-prob', type=cli.probability, default=default, metavar='P',
                   help='condition each example that has a caption on its caption\'s CLOOB text '
                   f'embedding with probability P, on its image embedding otherwise ({default_help})')
    return g


def add_optimizer_flags(p, lr=3e-5):
    g = p.add_argument_group('optimisation')
    g.add_argument('--lr', type=cli.positive_float, default=lr,
                   help='learning rate, also applied when resuming')
    g.add_argument('--lr-warmup-steps', type=cli.non_negative_int, default=0,
                   help='raise the LR linearly from 0 over this many steps')
    g.add_argument('--lr-schedule', default='constant',
                   choices=['constant', 'cosine', 'inverse-sqrt'],
                   help='after the warmup: keep --lr, decay it to --lr-min by --max-steps '
                   '(cosine), or as 1/sqrt(step)')
    g.add_argument('--lr-min', type=cli.non_negative_float, default=0.0,
                   help='the LR the cosine and inverse-sqrt schedules end at')
    g.add_argument('--accumulate-grad-batches', type=cli.positive_int, default=1,
                   help='batches whose gradients add up to one optimizer step')
    g.add_argument('--grad-clip', type=cli.positive_float, help='clip the gradient norm')
    g.add_argument('--max-bad-steps', type=cli.positive_int, default=50,
                   help='stop after this many steps in a row with a non-finite loss or gradient')
    return g


def add_run_flags(p, resume_help=RESUME_HELP, output_dir='outputs',
                  output_help='checkpoints, demo grids and local logs go here', max_steps=True):
    """Where a run writes, how long it runs (--max-steps, unless the tool counts its
    steps otherwise), how it saves, resumes and stops."""
    g = p.add_argument_group('the run')
    g.add_argument('--output-dir', default=output_dir, help=output_help)
    g.add_argument('--resume-from', help=resume_help)
    if max_steps:
        g.add_argument('--max-steps', type=cli.positive_int, help='stop after this many steps')
    g.add_argument('--seed', type=cli.training_seed, default=None,
                   help='random seed (default: random)')
    g.add_argument('--checkpoint-every', type=cli.positive_int, default=50000,
                   help='write checkpoints/step=N.ckpt (and last.ckpt) every this many steps')
    g.add_argument('--checkpoint-minutes', type=cli.positive_float, default=30,
                   help='also write last.ckpt this often, so a kill -9 loses at most this much')
    g.add_argument('--keep-last', type=cli.positive_int,
                   help='keep only the newest N step checkpoints (default: keep all)')
    g.add_argument('--signal', default='SIGUSR1', choices=sorted(SIGNALS),
                   help='a warning signal that, like SIGTERM and SIGINT, saves a checkpoint and '
                   'stops the run (SLURM: sbatch --signal=USR1@120)')
    g.add_argument('--wandb-project', help='log to this wandb project (else log locally)')
    return g


def add_device_flags(p, peak_tflops=True):
    """Devices, processes and precision; --peak-tflops for tools that count their FLOPs."""
    g = p.add_argument_group('devices and precision')
    g.add_argument('--num-gpus', '--devices', dest='devices', type=cli.positive_int, default=1,
                   help='devices (processes) per node')
    g.add_argument('--num-nodes', type=cli.positive_int, default=1,
                   help='machines (start the same command on each, under torchrun or SLURM)')
    g.add_argument('--accelerator', default='auto',
                   choices=['auto', 'cpu', 'gpu', 'cuda', 'mps'],
                   help='where to train; auto is the GPU when there is one')
    g.add_argument('--strategy', default='auto',
                   help="auto (ddp with more than one device), ddp, fsdp, deepspeed, ...")
    g.add_argument('--fprecision', type=precision, default='32',
                   help='16, 32, bf16, or a Lightning precision string')
    if peak_tflops:
        g.add_argument('--peak-tflops', type=cli.positive_float,
                       help='the device\'s peak TFLOP/s at the training precision, for the FLOP '
                       'utilisation in the logs (default: known for A100, H100, H200, L40S, '
                       '4090...)')
    return g


def add_demo_flags(p):
    """The demo grids a run draws as it trains."""
    g = p.add_argument_group('demo grids')
    g.add_argument('--demo-prompts', help='text file with one demo prompt per line')
    g.add_argument('--demo-every', type=cli.positive_int, default=2000,
                   help='render a demo grid every this many steps (and on the first)')
    g.add_argument('--demo-steps', type=cli.positive_int, default=50,
                   help='sampling steps of the demo grids')
    g.add_argument('--demo-method', default='plms', choices=cli.SAMPLING_METHODS,
                   help='sampler of the demo grids (plms2 with --demo-steps 25 --demo-schedule '
                   'karras: half the model calls, see BENCHMARKS.md)')
    g.add_argument('--demo-schedule', default='spliced', choices=cli.SCHEDULES,
                   help='timesteps of the demo grids')
    g.add_argument('--demo-size', type=cli.image_size, metavar='WxH',
                   help='size of the demo images, WIDTHxHEIGHT (384x256) or one number for a '
                   f'square, each side a multiple of {cli.SIZE_MULTIPLE} (default: --image-size)')
    return g


def add_lora_flags(p):
    """LoRA finetuning of the --resume-from model (models/lora.py)."""
    g = p.add_argument_group('LoRA finetuning (of the --resume-from model, which stays frozen)')
    g.add_argument('--lora-rank', type=cli.positive_int,
                   help='train LoRA adapters of this rank on the --resume-from model instead of '
                   'all its weights; checkpoints then hold the adapters and name the base')
    g.add_argument('--lora-alpha', type=cli.positive_float,
                   help='the adapters\' scale is alpha / rank (default: alpha = rank)')
    g.add_argument('--lora-targets', type=cli.lora_targets, metavar='GROUPS',
                   help=f'the layers to adapt, of {",".join(cli.LORA_TARGETS)}: the residual '
                   'blocks\' 3x3 convolutions, the attention projections, the mapping network\'s '
                   'linears, the modulation linears, the 1x1 skip convolutions (default: '
                   f'{",".join(cli.DEFAULT_LORA_TARGETS)})')
    return g


def add_speed_flags(p):
    """Speed options; none changes what a checkpoint holds."""
    g = p.add_argument_group('speed (none changes what a checkpoint holds)')
    g.add_argument('--compile', action='store_true',
                   help='torch.compile the U-Net (minutes of compiling at the start)')
    g.add_argument('--channels-last', action='store_true',
                   help='keep the U-Net\'s activations channels-last (NHWC)')
    g.add_argument('--tf32', action=argparse.BooleanOptionalAction,
                   help='TF32 matrix maths on Ampere and later GPUs (default: torch\'s, for '
                   'convolutions only)')
    g.add_argument('--gradient-checkpointing', action='store_true',
                   help='recompute each U-Net block\'s activations in the backward pass: less '
                   'memory (bigger batches), about a third more compute')
    return g


def add_memory_flags(p):
    """What the model states take: the optimizer's state and where the EMA lives (the
    diffusion trainer's; the run prints what each takes at its start)."""
    g = p.add_argument_group('memory (the run prints what the model states take)')
    g.add_argument('--optimizer', default='adamw', choices=['adamw', 'adamw8bit'],
                   help='AdamW, or bitsandbytes\' 8-bit AdamW: its two moments take 2 bytes a '
                   'parameter instead of 8')
    g.add_argument('--ema-device', default='model', choices=['model', 'cpu'],
                   help='keep the EMA copy with the model, or in (pinned) CPU memory, averaged '
                   'there while the next step runs: 4 bytes a parameter off the GPU, 8 on the '
                   'CPU')
    return g


def add_bucket_flags(p):
    """Aspect-ratio buckets (data/buckets.py) instead of the original's square centre crop:
    training's, and precompute_latents.py's (a cache made with them keeps them)."""
    g = p.add_argument_group('aspect-ratio buckets')
    g.add_argument('--aspect-buckets', action='store_true',
                   help='train each image (or cache its latents) at the bucket (width x height, '
                   'about --image-size squared pixels) of its nearest aspect ratio, resized to '
                   'cover it, every batch from one bucket; off: the original\'s square centre '
                   'crop. Images beyond --max-aspect go to the most extreme bucket and lose more '
                   'to the crop. A latent cache made with it trains on its buckets')
    g.add_argument('--bucket-step', type=cli.positive_int, default=64,
                   help='bucket sides are multiples of this (of 64: the autoencoder and the U-Net '
                   'need multiples of 64 px)')
    g.add_argument('--max-aspect', type=cli.positive_float, default=2.0,
                   help='the most elongated bucket, long side to short')
    g.add_argument('--bucket-crop', choices=['random', 'center'], default='random',
                   help='where the sliver that sticks out of the bucket is cut: at random (each '
                   'epoch anew; in a latent cache once, drawn from the image\'s name), or evenly '
                   'from both ends')
    return g


def bucket_table_of(args):
    """The bucket table the --aspect-buckets flags give (None without the flag); UserError
    for a step or an aspect that makes no sense."""
    from ..data.buckets import bucket_table
    if not args.aspect_buckets:
        return None
    if args.bucket_step % 64:
        raise UserError(f'--bucket-step {args.bucket_step} must be a multiple of 64 (the '
                        'autoencoder and the U-Net need sides of multiples of 64 px).')
    if args.max_aspect < 1:
        raise UserError(f'--max-aspect {args.max_aspect:g} is the long side over the short: '
                        'use 1 (squares only) or more.')
    return bucket_table(args.image_size, args.bucket_step, args.max_aspect)


def parser():
    p = cli.ArgumentParser(prog=PROG, description=DESCRIPTION)
    p.add_argument('--demo', action='store_true',
                   help='run the tiny CPU pipeline check (generates its own data and models)')
    add_frozen_model_flags(p)
    images = add_image_flags(p)
    images.add_argument('--train-latents', metavar='DIR',
                        help='train from a latent cache made by precompute_latents.py, instead '
                        'of --train-set')
    images.add_argument('--random-flip', action='store_true',
                        help='mirror each training image left to right half of the time (for '
                        'small finetunes; off, as in the original)')
    add_bucket_flags(p)
    add_caption_flags(p)
    model = p.add_argument_group('the diffusion model')
    model.add_argument('--autoencoder-scale', type=cli.positive_float,
                       help='latent scale of the autoencoder (see compute_ae_scale.py)')
    model.add_argument('--base-channels', type=cli.positive_int, default=128,
                       help='U-Net width unit (danbooru_cfg: 128; yfcc_cfg: 192)')
    model.add_argument('--channel-multipliers', type=cli.multipliers, default=[4, 4, 8, 8],
                       help='widths of the four U-Net levels, as multiples of --base-channels')
    model.add_argument('--ema-decay-at', type=cli.positive_int, default=200000,
                       help='the EMA decay goes from 0.999 to 0.9999 at this step')
    add_optimizer_flags(p)
    add_run_flags(p)
    add_device_flags(p)
    add_demo_flags(p)
    add_lora_flags(p)
    add_speed_flags(p)
    add_memory_flags(p)
    return p

#!/usr/bin/env python3
"""Encodes a training set once into a latent cache, so that training skips the frozen
autoencoder and CLOOB: train with --train-latents DIR instead of --train-set.

    python3 precompute_latents.py --train-set train.txt --vqgan-model kl_f8 \\
        --cloob-checkpoint cloob_laion_400m_vit_b_16_16_epochs --output latents/

Rerun the same command after an interruption: finished parts are kept. It prints the
autoencoder scale of the whole set and the --autoencoder-scale flag to train with, and,
where the images have captions, how close CLOOB puts each image to its caption (the gap
report, ccld/data/captions.py): what tells whether training with --text-prob is worth it.
"""

import json
import sys

from ccld import cli
from ccld.train.flags import add_bucket_flags, bucket_table_of

PROG = 'precompute_latents.py'


def parser():
    p = cli.ArgumentParser(prog=PROG, description=__doc__.split('\n\n')[0])
    p.add_argument('--train-set', required=True, help=cli.IMAGES_HELP)
    cli.add_caption_flag(cli.add_table_flags(p))
    p.add_argument('--vqgan-model', required=True,
                   help=cli.AUTOENCODER_HELP)
    p.add_argument('--cloob-checkpoint', default='cloob_laion_400m_vit_b_16_16_epochs',
                   help=cli.CLOOB_HELP)
    p.add_argument('--output', required=True, help='the cache directory')
    p.add_argument('--image-size', type=cli.positive_int, default=256,
                   help='the size training will use')
    p.add_argument('--batch-size', type=cli.positive_int, default=64, help='per process')
    p.add_argument('--num-workers', type=cli.non_negative_int, default=cli.default_workers(),
                   help='image loading processes per process (by default one per usable CPU, at '
                   'most 8)')
    p.add_argument('--device', type=cli.device, help='default: cuda if available, else cpu')
    p.add_argument('--num-gpus', '--devices', dest='num_gpus', type=cli.positive_int, default=1,
                   help='processes per node (GPUs, or CPU processes with --device cpu)')
    p.add_argument('--num-nodes', type=cli.positive_int, default=1,
                   help='nodes, each running --num-gpus processes (start the same command on each)')
    p.add_argument('--shard-size', type=cli.positive_int, default=10_000,
                   help='images per cache part, from a path list, a saved dataset or parquet '
                   'files (whole row groups); tar and hub shards make one part each')
    p.add_argument('--json', action='store_true', help='print the manifest as JSON at the end')
    add_bucket_flags(p)
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    from pathlib import Path

    from ccld.data import precompute
    from ccld.errors import UserError
    from ccld.data.sources import Source
    from ccld.models import hub

    args.device = args.device or cli.default_device()
    cli.check_image_size(args.image_size)
    args.buckets = bucket_table_of(args)
    hub.resolve_frozen_models(args)
    cli.check_frozen_model_files(args.vqgan_model, args.cloob_checkpoint)
    if args.device.type == 'cuda':
        cli.check_devices('gpu', args.num_gpus)
    try:
        source = Source(args.train_set, args.shard_size, args.image_column, args.dataset_split,
                        args.caption_column)
    except UserError as e:
        raise UserError(f'--train-set: {e}') from None
    manifest = precompute.run(args, source)
    if manifest is None:  # not rank zero
        return
    from ccld.data.gap import describe_gap
    if manifest.get('caption_gap'):
        print(f'{manifest["captions"]} of the images have a caption. '
              f'{describe_gap(manifest["caption_gap"])}', file=sys.stderr)
    flag = f'--autoencoder-scale {manifest["autoencoder_scale"]:.6g}'
    print(f'{manifest["images"]} images cached in {Path(args.output)}, {manifest["skipped"]} '
          f'unreadable skipped. Their autoencoder scale; train with:\n  {flag} '
          f'--train-latents {args.output}', file=sys.stderr)
    print(json.dumps(manifest, indent=1) if args.json else f'{manifest["autoencoder_scale"]:.6g}')


if __name__ == '__main__':
    cli.run(main, PROG)

#!/usr/bin/env python3
"""Computes the autoencoder scale of a training set: pass it to training with
--autoencoder-scale.

    python3 compute_ae_scale.py kl_f8 train.txt

Prints the scale; progress and the flag to paste go to stderr (--json for machines).
With --captions it also reports how close CLOOB puts each captioned image to its caption
(the gap report that precompute_latents.py prints too): whether --text-prob is worth it.
"""

import json
import sys

from ccld import cli

PROG = 'compute_ae_scale.py'


def parser():
    p = cli.ArgumentParser(prog=PROG, description=__doc__.split('\n\n')[0])
    # The original script's arguments.
    p.add_argument('vqgan_model', metavar='VQGAN_MODEL',
                   help=cli.AUTOENCODER_HELP)
    p.add_argument('train_set', metavar='TRAIN_PATHS', help=cli.IMAGES_HELP)
    # Added.
    p.add_argument('--batches', type=cli.positive_int, default=32, help='batches to encode')
    p.add_argument('--batch-size', type=cli.positive_int, default=64, help='images per batch')
    p.add_argument('--image-size', type=cli.positive_int, default=256,
                   help='the size training will use')
    p.add_argument('--num-workers', type=cli.non_negative_int, default=cli.default_workers(),
                   help='image loading processes (by default one per usable CPU, at most 8)')
    cli.add_caption_flag(cli.add_table_flags(p))
    p.add_argument('--captions', action='store_true',
                   help='also report the CLOOB cosine similarity of the first --batches x '
                   '--batch-size captioned images with their captions, and with others\' '
                   'captions as the baseline')
    p.add_argument('--cloob-checkpoint', default='cloob_laion_400m_vit_b_16_16_epochs',
                   help=cli.CLOOB_HELP + ' (with --captions)')
    p.add_argument('--device', type=cli.device, help='default: cuda if available, else cpu')
    p.add_argument('--seed', type=cli.seed, default=0, help='picks the images (when there are more than --batches x --batch-size)')
    p.add_argument('--json', action='store_true', help='print one JSON object instead')
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    from ccld.models.autoencoder import load_autoencoder
    from ccld.data.scale import estimate_scale
    from ccld.data.sources import Source
    from ccld.models import hub

    cli.check_image_size(args.image_size)  # one training takes: the scale is for it
    source = Source(args.train_set, image_column=args.image_column, split=args.dataset_split,
                    caption_column=args.caption_column)
    args.vqgan_model = hub.resolve_autoencoder(args.vqgan_model, 'VQGAN_MODEL')
    if args.captions:  # (checked before the long part, the scale, starts)
        hub.resolve_cloob(args.cloob_checkpoint)
        cli.check_frozen_model_files(args.vqgan_model, args.cloob_checkpoint)
    device = args.device or cli.default_device()
    autoencoder = load_autoencoder(args.vqgan_model, device=device)
    wanted, known = args.batches * args.batch_size, source.known_images
    if known is not None and known < wanted:
        print(f'{args.train_set} holds {known} images, fewer than {args.batches} batches '
              f'x {args.batch_size} = {wanted}; using all of them.', file=sys.stderr)
    result = estimate_scale(autoencoder, source, args.batches, args.batch_size, args.image_size,
                            args.num_workers, device, args.seed)
    flag = f'--autoencoder-scale {result.scale:.6g}'
    if result.skipped:
        print(f'skipped {cli.count(result.skipped, "unreadable image")}.', file=sys.stderr)
    print(f'{cli.count(result.images, "image")} in {cli.count(result.batches, "batch", "batches")}'
          f'; train with:\n  {flag}', file=sys.stderr)
    gap = caption_gap(args, source, device) if args.captions else None
    if args.json:
        print(json.dumps({'autoencoder_scale': result.scale, 'images': result.images,
                          'batches': result.batches, 'skipped': result.skipped,
                          'argument': flag, **({'caption_gap': gap} if args.captions else {})}))
    else:
        print(f'{result.scale:.6g}')


def caption_gap(args, source, device):
    """The --captions report, printed to stderr; None when no image has a caption."""
    from ccld.data.gap import describe_gap, measure_gap
    from ccld.models.cloob import load_cloob
    gap = measure_gap(source, load_cloob(args.cloob_checkpoint, device), args.image_size,
                      args.batches * args.batch_size, args.batch_size, device)
    print(describe_gap(gap) if gap else f'--captions: none of the images of {args.train_set} '
          'has a caption.', file=sys.stderr)
    return gap


if __name__ == '__main__':
    cli.run(main, PROG)

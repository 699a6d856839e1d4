#!/usr/bin/env python3
"""Samples images from a CLOOB-conditioned latent diffusion model, guided by text and
image prompts.

    python3 sample.py "a watercolor of a lighthouse" "storm:1.5" --images ref.jpg:2 \\
        --checkpoint yfcc_cfg.pth --autoencoder kl_f8 -n 8

Writes out_00000.png, ... and out_grid.png; each PNG records its prompts and settings.
"""

import json
import sys
import warnings
from pathlib import Path

from ccld import cli, generate
from ccld.autoencoder import load_autoencoder
from ccld.cloob import load_cloob
from ccld.data import image_transform
from ccld.errors import UserError

PROG = 'sample.py'
DEFAULT_SIZE = 256
DEFAULT_STRENGTH = 0.9


def parser():
    p = cli.ArgumentParser(prog=PROG, description=__doc__.split('\n\n')[0])
    # The original script's flags, same names and defaults.
    p.add_argument('prompts', nargs='*', default=[],
                   help='text prompts, "text" or "text:weight" (default weight: --cond-scale)')
    p.add_argument('--images', nargs='*', default=[], metavar='IMAGE',
                   help='image prompts, "path" or "path:weight"; http(s) URLs work too')
    p.add_argument('--cloob-checkpoint', default='cloob_laion_400m_vit_b_16_16_epochs',
                   help='pretrained CLOOB name, or a .pkl file')
    p.add_argument('--autoencoder', default='kl_f8',
                   help='autoencoder NAME, for NAME.yaml + NAME.ckpt')
    p.add_argument('--checkpoint', required=True,
                   help='released model state dict, ccld training checkpoint or checkpoint of '
                   'the original training script (training checkpoints use the EMA weights)')
    p.add_argument('--base-channels', type=cli.positive_int,
                   help='override the width read from the weights (yfcc_cfg: 192)')
    p.add_argument('--channel-multipliers', type=cli.multipliers,
                   help='override the multipliers read from the weights (yfcc_cfg: 4,4,8,8)')
    p.add_argument('--cond-scale', type=cli.finite_float, default=3.0,
                   help='guidance scale of prompts without a weight')
    p.add_argument('--device', type=cli.device, help='default: cuda if available, else cpu')
    p.add_argument('--eta', type=cli.finite_float, default=0.0,
                   help='noise added at each step of ddim, in [0, 1]')
    p.add_argument('--method', default='plms', choices=generate.METHODS, help='sampler')
    p.add_argument('-n', type=cli.positive_int, default=4, help='number of images')
    p.add_argument('--seed', type=cli.seed, default=0, help='random seed')
    p.add_argument('--steps', type=cli.positive_int, default=50,
                   help='sampling steps, one model call each (prk: 4; pie: 2; plms: 4 for '
                   'the first 3)')
    # Added.
    p.add_argument('--schedule', default='spliced', choices=list(generate.SCHEDULES),
                   help="timesteps: the original's spliced DDPM/cosine, or Karras et al.'s "
                   "(sigma 80 to 0.03, rho 7)")
    p.add_argument('--autoencoder-scale', type=cli.positive_float,
                   help='override the latent scale stored in the checkpoint')
    p.add_argument('--size', type=cli.positive_int,
                   help=f'output image size (default: the training size a ccld checkpoint '
                   f'records, else {DEFAULT_SIZE})')
    p.add_argument('--batch-size', type=cli.positive_int, help='images per batch (default: n)')
    p.add_argument('--output-dir', default='.', help='where the PNGs go')
    p.add_argument('--prefix', default='out', help='file names are PREFIX_00000.png, ...')
    p.add_argument('--grid-cols', type=cli.positive_int,
                   help='columns of PREFIX_grid.png (default: near-square)')
    p.add_argument('--init', metavar='IMAGE', help='start from this image (path or URL)')
    p.add_argument('--strength', type=cli.positive_float,
                   help=f'how far --init is noised, in (0, 1]: 1 keeps nothing of it '
                   f'(default {DEFAULT_STRENGTH})')
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    if args.strength is not None and args.init is None:
        raise UserError('--strength needs --init IMAGE.')
    strength = (args.strength or DEFAULT_STRENGTH) if args.init else 1.0
    generate.check_settings(args.method, args.eta, strength, args.schedule)
    if args.eta and args.method != 'ddim':
        warnings.warn(f'--eta applies to --method ddim only; {args.method} ignores it.')
    device = args.device or cli.default_device()

    # Image files first: they are the likeliest mistakes and the cheapest to check.
    texts = [generate.parse_prompt(p, args.cond_scale) for p in args.prompts]
    image_prompts = [generate.parse_prompt(p, args.cond_scale) for p in args.images]
    images = [(generate.read_image(path, 'image prompt'), w) for path, w in image_prompts]
    init = generate.read_image(args.init, 'init image') if args.init else None

    model, ckpt = generate.load_model(args.checkpoint, args.base_channels,
                                      args.channel_multipliers, device)
    scale = args.autoencoder_scale or ckpt.autoencoder_scale
    if scale is None:
        raise UserError(f'{args.checkpoint} records no autoencoder scale; pass the one it was '
                        'trained with as --autoencoder-scale.')
    size = args.size or ckpt.record.get('image_size', DEFAULT_SIZE)
    autoencoder = load_autoencoder(args.autoencoder, device=device)
    generate.latent_shape(autoencoder, size)
    embeds, weights = None, []
    if texts or images:
        cloob = load_cloob(args.cloob_checkpoint, device)
        embeds, weights = generate.embed_prompts(cloob, texts, images)

    metadata = {
        'prompts': json.dumps(texts), 'image_prompts': json.dumps(image_prompts),
        'seed': args.seed, 'n': args.n, 'method': args.method, 'steps': args.steps,
        'schedule': args.schedule, 'eta': args.eta, 'cond_scale': args.cond_scale,
        'autoencoder_scale': scale, 'size': size, 'checkpoint': Path(args.checkpoint).name,
        **({'init': args.init, 'strength': strength} if init is not None else {}),
    }
    batches = generate.generate(
        generate.guided_model_fn(model, embeds, weights), autoencoder, scale, args.n, size,
        method=args.method, steps=args.steps, schedule=args.schedule, eta=args.eta,
        seed=args.seed, batch_size=args.batch_size,
        init=image_transform(size)(init) if init is not None else None,
        strength=strength, device=device)
    paths = generate.write_samples(batches, args.output_dir, args.prefix, metadata,
                                   args.grid_cols)
    print(f'wrote {len(paths) - 1} sample(s) and the grid {paths[-1]}', file=sys.stderr)


if __name__ == '__main__':
    cli.run(main, PROG)

#!/usr/bin/env python3
"""Samples images from a CLOOB-conditioned latent diffusion model, guided by text and
image prompts.

    python3 sample.py "a watercolor of a lighthouse" "storm:1.5" --images ref.jpg:2 \\
        --checkpoint yfcc_cfg.pth --autoencoder kl_f8 -n 8
    python3 sample.py --prompts-file prompts.txt --checkpoint yfcc_cfg.pth -n 4

Writes out_00000.png, ... and out_grid.png; with --prompts-file, LINE_SLUG_00000.png, ...
and LINE_SLUG_grid.png for each line. Each PNG records its prompts and settings.
"""

import json
import sys
import warnings
from pathlib import Path

from ccld import cli
from ccld.errors import UserError

PROG = 'sample.py'
DEFAULT_SIZE = 256
DEFAULT_STRENGTH = 0.9
DEFAULT_BATCH_SIZE = 16


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
                   help='released model state dict, model export (export_model.py), ccld '
                   'training checkpoint or checkpoint of the original training script '
                   '(training checkpoints use the EMA weights)')
    p.add_argument('--base-channels', type=cli.positive_int,
                   help='override the width read from the weights (yfcc_cfg: 192)')
    p.add_argument('--channel-multipliers', type=cli.multipliers,
                   help='override the multipliers read from the weights (yfcc_cfg: 4,4,8,8)')
    p.add_argument('--cond-scale', type=cli.finite_float, default=3.0,
                   help='guidance scale of prompts without a weight')
    p.add_argument('--device', type=cli.device, help='default: cuda if available, else cpu')
    p.add_argument('--eta', type=cli.finite_float, default=0.0,
                   help='noise added at each step of ddim, in [0, 1]')
    p.add_argument('--method', default='plms', choices=cli.SAMPLING_METHODS, help='sampler')
    p.add_argument('-n', type=cli.positive_int, default=4,
                   help='number of images (of each prompt of --prompts-file)')
    p.add_argument('--seed', type=cli.seed, default=0,
                   help='random seed (each line of --prompts-file starts from the same noise)')
    p.add_argument('--steps', type=cli.positive_int, default=50,
                   help='sampling steps, one model call each (prk: 4; pie: 2; plms: 4 for '
                   'the first 3)')
    # Added.
    p.add_argument('--prompts-file', metavar='FILE',
                   help='sample -n images of each line of FILE, one prompt a line ("text" or '
                   '"text:weight"; blank lines and # comments skipped); instead of PROMPTS')
    p.add_argument('--schedule', default='spliced', choices=cli.SCHEDULES,
                   help="timesteps: the original's spliced DDPM/cosine, or Karras et al.'s "
                   "(sigma 80 to 0.03, rho 7)")
    p.add_argument('--autoencoder-scale', type=cli.positive_float,
                   help='override the latent scale stored in the checkpoint')
    p.add_argument('--size', type=cli.positive_int,
                   help=f'output image size (default: the training size a ccld checkpoint '
                   f'or export records, else {DEFAULT_SIZE})')
    p.add_argument('--batch-size', type=cli.positive_int,
                   help=f'images per batch (default {DEFAULT_BATCH_SIZE}); the images do not '
                   'depend on it')
    p.add_argument('--output-dir', default='.', help='where the PNGs go')
    p.add_argument('--prefix',
                   help='file names are PREFIX_00000.png, ... (default: out); with '
                   '--prompts-file, PREFIX_LINE_SLUG_00000.png, ...')
    p.add_argument('--grid-cols', type=cli.positive_int,
                   help='columns of the grid (default: near-square)')
    which = p.add_mutually_exclusive_group()
    which.add_argument('--grid-only', action='store_true', help='write the grids only')
    which.add_argument('--no-grid', action='store_true', help='write the single images only')
    p.add_argument('--score', action='store_true',
                   help="print each image's CLOOB score (cosine similarity to its text "
                   'prompts) and record it in its PNG as cloob_score')
    p.add_argument('--init', metavar='IMAGE', help='start from this image (path or URL)')
    p.add_argument('--strength', type=cli.positive_float,
                   help=f'how far --init is noised, in (0, 1]: 1 keeps nothing of it '
                   f'(default {DEFAULT_STRENGTH})')
    return p


def jobs(args):
    """(file name prefix, text prompts, metadata) of each set of images to sample: one
    for the command line's prompts, or one per line of --prompts-file."""
    from ccld.prompts import parse_prompt, read_prompts_file, slug
    if not args.prompts_file:
        return [(args.prefix or 'out', [parse_prompt(p, args.cond_scale) for p in args.prompts],
                 {})]
    if args.prompts:
        raise UserError('pass prompts on the command line or in --prompts-file, not both.')
    lead = f'{args.prefix}_' if args.prefix else ''
    return [(f'{lead}{line:05}_{slug(text)}', [(text, weight)],
             {'prompts_file': Path(args.prompts_file).name, 'line': line})
            for line, text, weight in read_prompts_file(args.prompts_file, args.cond_scale)]


def main(argv=None):
    args = parser().parse_args(argv)
    from tqdm.auto import tqdm

    from ccld import generate
    from ccld.autoencoder import load_autoencoder
    from ccld.cloob import load_cloob
    from ccld.data import image_transform
    from ccld.files import check_writable_dir
    from ccld.prompts import parse_prompt

    if args.strength is not None and args.init is None:
        raise UserError('--strength needs --init IMAGE.')
    strength = (args.strength or DEFAULT_STRENGTH) if args.init else 1.0
    generate.check_settings(args.method, args.eta, strength, args.schedule)
    if args.eta and args.method != 'ddim':
        warnings.warn(f'--eta applies to --method ddim only; {args.method} ignores it.')
    device = args.device or cli.default_device()
    batch_size = args.batch_size or DEFAULT_BATCH_SIZE
    if args.batch_size is None and args.n > DEFAULT_BATCH_SIZE:
        warnings.warn(f'sampling -n {args.n} in batches of {DEFAULT_BATCH_SIZE}; pass '
                      '--batch-size to change that (the images stay the same).')

    # Everything the user wrote is checked before any model loads.
    todo = jobs(args)
    has_text = any(texts for _, texts, _ in todo)
    if args.score and not has_text:
        warnings.warn('--score: there is no text prompt to score the images against; they '
                      'are written unscored.')
    check_writable_dir(args.output_dir, '--output-dir')
    image_prompts = [parse_prompt(p, args.cond_scale) for p in args.images]
    images = [(generate.read_image(path, 'image prompt'), w) for path, w in image_prompts]
    init = generate.read_image(args.init, 'init image') if args.init else None

    model, ckpt = generate.load_model(args.checkpoint, args.base_channels,
                                      args.channel_multipliers, device)
    generate.check_frozen_models(ckpt.record, args.autoencoder, args.cloob_checkpoint,
                                 args.checkpoint)
    scale = args.autoencoder_scale or ckpt.autoencoder_scale
    if scale is None:
        raise UserError(f'{args.checkpoint} records no autoencoder scale; pass the one it was '
                        'trained with as --autoencoder-scale.')
    size = args.size or ckpt.record.get('image_size', DEFAULT_SIZE)
    autoencoder = load_autoencoder(args.autoencoder, device=device)
    generate.latent_shape(autoencoder, size)
    cloob = load_cloob(args.cloob_checkpoint, device) if has_text or images else None

    settings = {
        'image_prompts': json.dumps(image_prompts), 'seed': args.seed, 'n': args.n,
        'method': args.method, 'steps': args.steps, 'schedule': args.schedule,
        'eta': args.eta, 'cond_scale': args.cond_scale, 'autoencoder_scale': scale,
        'size': size, 'checkpoint': Path(args.checkpoint).name,
        **({'init': args.init, 'strength': strength} if init is not None else {}),
    }
    init = image_transform(size)(init) if init is not None else None
    written = 0
    for prefix, texts, about in tqdm(todo, unit='prompt', disable=args.prompts_file is None):
        embeds, weights = None, []
        if texts or images:
            embeds, weights = generate.embed_prompts(cloob, texts, images)
        scores = []
        annotate = scorer(cloob, embeds[:len(texts)], weights[:len(texts)], scores) \
            if args.score and texts else None
        batches = generate.generate(
            generate.guided_model_fn(model, embeds, weights), autoencoder, scale, args.n,
            size, method=args.method, steps=args.steps, schedule=args.schedule, eta=args.eta,
            seed=args.seed, batch_size=batch_size, init=init, strength=strength,
            device=device, progress=args.prompts_file is None)
        metadata = {'prompts': json.dumps(texts), **about, **settings}
        paths = generate.write_samples(batches, args.output_dir, prefix, metadata,
                                       args.grid_cols, singles=not args.grid_only,
                                       grid_too=not args.no_grid, annotate=annotate)
        written += len(paths)
        for i, score in enumerate(scores):  # the grid's i-th image when there is no file
            name = f'{prefix}_grid.png[{i}]' if args.grid_only else \
                generate.sample_path('', prefix, i).name
            tqdm.write(f'{name}\tcloob_score {score:.4f}')
    print(f'wrote {written} PNG file(s) to {args.output_dir}', file=sys.stderr)


def scorer(cloob, text_embeds, weights, scores):
    """annotate() for generate.write_samples: each image's CLOOB score against the text
    prompts (their weighted mean embedding), kept in `scores` and given as cloob_score."""
    from ccld.score import cloob_scores, prompt_embedding
    target = prompt_embedding(text_embeds, weights)

    def annotate(batch):
        new = cloob_scores(cloob, batch, target.expand(len(batch), -1)).tolist()
        scores.extend(new)
        return [{'cloob_score': score} for score in new]
    return annotate


if __name__ == '__main__':
    cli.run(main, PROG)

"""What sample.py does once its flags are parsed: check every argument before any model
loads, then sample each prompt (or each line of --prompts-file) and write the PNGs."""

import json
import sys
import warnings
from pathlib import Path

from tqdm.auto import tqdm

from ..data.images import image_transform
from ..errors import UserError
from ..files import check_writable_dir
from ..models import hub
from ..models.autoencoder import load_autoencoder
from ..models.cloob import load_cloob
from . import generate
from .cloob_score import scorer
from .flags import DEFAULT_STRENGTH
from .prompts import parse_prompt, read_prompts_file, slug
from .sampler import check_sampling_flags, load_sampler, resolve_model_names, sample


def jobs(args):
    """(file name prefix, text prompts, metadata) of each set of images to sample: one
    for the command line's prompts, or one per line of --prompts-file."""
    if not args.prompts_file:
        return [(args.prefix or 'out', [parse_prompt(p, args.cond_scale) for p in args.prompts],
                 {})]
    if args.prompts:
        raise UserError('pass prompts on the command line or in --prompts-file, not both.')
    lead = f'{args.prefix}_' if args.prefix else ''
    return [(f'{lead}{line:05}_{slug(text)}', [(text, weight)],
             {'prompts_file': Path(args.prompts_file).name, 'line': line})
            for line, text, weight in read_prompts_file(args.prompts_file, args.cond_scale)]


def image_metadata(image_prompts, settings, init=None, strength=1.0):
    """What every PNG of a set of prompts records besides its text prompts: the image
    prompts ((name, weight) pairs), the settings, and the init image (its name) and
    strength where there is one. The web page's PNGs record the same."""
    return {'image_prompts': json.dumps(image_prompts), **settings.metadata(),
            **({'init': init, 'strength': strength} if init is not None else {})}


def run(args):
    """Samples what the parsed flags of sample.py ask for and writes the PNGs."""
    if args.strength is not None and args.init is None:
        raise UserError('--strength needs --init IMAGE.')
    strength = (args.strength or DEFAULT_STRENGTH) if args.init else 1.0
    device, batch_size = check_sampling_flags(args, strength)

    # Everything the user wrote is checked before any model loads.
    todo = jobs(args)
    has_text = any(texts for _, texts, _ in todo)
    if not has_text and not args.images:  # as the original sampled then, but not silently
        warnings.warn('no prompt given: sampling the model unguided (unconditional images'
                      f'{", unscored" if args.score else ""}); pass a text prompt or --images '
                      'to guide it.')
    elif args.score and not has_text:
        warnings.warn('--score: there is no text prompt to score the images against; they '
                      'are written unscored.')
    check_writable_dir(args.output_dir, '--output-dir')
    image_prompts = [parse_prompt(p, args.cond_scale) for p in args.images]
    images = [(generate.read_image(path, 'image prompt'), w) for path, w in image_prompts]
    init = generate.read_image(args.init, 'init image') if args.init else None
    args.checkpoint = hub.resolve(args.checkpoint, '--checkpoint')  # last: it may download
    resolve_model_names(args)

    model, settings = load_sampler(args, args.checkpoint, device)
    autoencoder = load_autoencoder(settings.autoencoder, device=device)
    generate.latent_shape(autoencoder, settings.size)
    cloob = load_cloob(settings.cloob, device) if has_text or images else None

    metadata = image_metadata(image_prompts, settings, args.init, strength)
    init = image_transform(settings.size)(init) if init is not None else None
    written = 0
    for prefix, texts, about in tqdm(todo, unit='prompt', disable=args.prompts_file is None):
        embeds, weights = None, []
        if texts or images:
            embeds, weights = generate.embed_prompts(cloob, texts, images)
        scores = []
        annotate = scorer(cloob, embeds[:len(texts)], weights[:len(texts)], scores) \
            if args.score and texts else None
        batches = sample(model, settings, autoencoder, embeds, weights, batch_size=batch_size,
                         device=device, init=init, strength=strength,
                         progress=args.prompts_file is None)
        paths = generate.write_samples(batches, args.output_dir, prefix,
                                       {'prompts': json.dumps(texts), **about, **metadata},
                                       args.grid_cols, singles=not args.grid_only,
                                       grid_too=not args.no_grid, annotate=annotate)
        written += len(paths)
        for i, score in enumerate(scores):  # the grid's i-th image when there is no file
            name = f'{prefix}_grid.png[{i}]' if args.grid_only else \
                generate.sample_path('', prefix, i).name
            tqdm.write(f'{name}\tcloob_score {score:.4f}')
    print(f'wrote {written} PNG file(s) to {args.output_dir}', file=sys.stderr)

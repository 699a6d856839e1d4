"""The image/caption gap report of precompute_latents.py on a captioned set made here.

Why: --text-prob is worth its cost when CLOOB's text embeddings of a set's captions sit
far from its images' embeddings. This makes a set of pictures whose captions say what
they show ("a red circle on a blue background"), written as a PATH<TAB>CAPTION list,
encodes it with precompute_latents.py and prints the report the cache's manifest holds:
the cosine similarity of each image with its own caption and, as the baseline, with
another image's caption. Without --cloob-checkpoint the CLOOB is a tiny random one (its
towers are unrelated, so both figures sit near 0: the gap at its worst); with a real one
(cloob_laion_400m_vit_b_16_16_epochs, downloaded) the figures are the ones users need.

    .venv/bin/python bench/caption_gap.py [--cloob-checkpoint NAME] [--images 96]
"""

import argparse
import itertools
import json
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / 'latent-diffusion')]

import precompute_latents  # noqa: E402
from ccld.train.quickstart import make_tiny_autoencoder, make_tiny_cloob  # noqa: E402

COLOURS = {'red': (220, 30, 30), 'green': (30, 170, 60), 'blue': (30, 60, 220),
           'yellow': (240, 220, 40), 'black': (10, 10, 10), 'white': (245, 245, 245)}
SHAPES = ('circle', 'square')


def captioned_set(folder, count, size):
    """`count` pictures of a shape of one colour on another, and the list of them with
    their captions; returns the list's path."""
    folder.mkdir(parents=True, exist_ok=True)
    pairs = [(s, a, b) for s, a, b in itertools.product(SHAPES, COLOURS, COLOURS) if a != b]
    lines = []
    for i, (shape, fill, ground) in zip(range(count), itertools.cycle(pairs)):
        image = Image.new('RGB', (size, size), COLOURS[ground])
        box = [size // 4, size // 4, 3 * size // 4, 3 * size // 4]
        (ImageDraw.Draw(image).ellipse if shape == 'circle' else
         ImageDraw.Draw(image).rectangle)(box, fill=COLOURS[fill])
        path = folder / f'{i:04}.png'
        image.save(path)
        lines.append(f'{path}\ta {fill} {shape} on a {ground} background')
    listing = folder / 'train.txt'
    listing.write_text('\n'.join(lines) + '\n')
    return listing


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--images', type=int, default=96)
    p.add_argument('--image-size', type=int, default=64)
    p.add_argument('--cloob-checkpoint', help='default: a tiny random CLOOB written here')
    p.add_argument('--vqgan-model', help='default: a tiny random autoencoder written here')
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cloob = args.cloob_checkpoint or str(make_tiny_cloob(tmp / 'tiny_cloob.pkl'))
        autoencoder = args.vqgan_model or make_tiny_autoencoder(tmp / 'tiny_ae')
        listing = captioned_set(tmp / 'images', args.images, args.image_size)
        precompute_latents.main(['--train-set', str(listing), '--vqgan-model', autoencoder,
                                 '--cloob-checkpoint', cloob, '--output', str(tmp / 'latents'),
                                 '--image-size', str(args.image_size), '--num-workers', '0'])
        manifest = json.loads((tmp / 'latents' / 'ccld_cache.json').read_text())
    print(json.dumps({'cloob': args.cloob_checkpoint or 'tiny random (seed 0)',
                      'images': manifest['images'], 'captions': manifest['captions'],
                      'caption_gap': manifest['caption_gap']}, indent=1))


if __name__ == '__main__':
    main()

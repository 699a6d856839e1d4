"""The autoencoder scale: the factor that brings a dataset's latents to unit variance.

The noise schedule assumes unit-variance data, so training divides latents by this scale
and sampling multiplies by it. It is sqrt(mean over batches of var(latent samples)).
"""

import itertools
import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from . import latents
from .data import make_loader
from .errors import UserError


@dataclass
class ScaleEstimate:
    scale: float
    images: int    # images encoded
    batches: int   # batches they came in
    skipped: int   # unreadable images left out


@torch.no_grad()
def estimate_scale(autoencoder, paths, batches=32, batch_size=64, image_size=256,
                   num_workers=0, device='cpu', seed=0, progress=True):
    """Encodes `batches` shuffled batches of `paths` (all of them if there are fewer).

    Each batch's variance counts by its number of images, so with full batches this is
    the original's plain mean, and a short last batch or skipped files do not tilt it.
    Raises UserError if no image could be read.
    """
    device = torch.device(device)
    loader = make_loader(paths, image_size, batch_size, num_workers, shuffle=True, seed=seed,
                         drop_last=False)
    generator = torch.Generator(device).manual_seed(seed)
    n_batches = min(batches, len(loader))
    var_sum, images, used, skipped = 0.0, 0, 0, 0
    for batch in tqdm(itertools.islice(loader, n_batches), total=n_batches, unit='batch',
                      disable=not progress):
        skipped += batch['skipped']
        if not len(batch['images']):
            continue
        z = latents.encode(autoencoder, batch['images'].to(device), 1.0, generator)
        var_sum += z.double().var().item() * len(z)
        images += len(z)
        used += 1
    if not images:
        raise UserError(f'none of the {skipped} images could be read; check that the list '
                        'holds image paths, one a line.')
    return ScaleEstimate(math.sqrt(var_sum / images), images, used, skipped)

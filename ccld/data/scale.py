"""The autoencoder scale: the factor that brings a dataset's latents to unit variance.

The noise schedule assumes unit-variance data, so training divides latents by this scale
and sampling multiplies by it. It is the standard deviation of latent samples over the
images. The original drew one sample per image and averaged the variances of 32 batches
of 64; here the variance over all the images comes from their posteriors in closed form
(latent_cache.PartStats): what that estimates, without its sampling noise (and without
leaving out how the batches' means differ). compute_ae_scale.py (on --batches x
--batch-size images) and precompute_latents.py (on every image it caches) compute it with
this same code, so on the same images they print the same scale.
"""

import itertools
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..models import latents
from .images import make_loader
from .latent_cache import PartStats, latent_sums
from .sources import Source
from ..errors import RunError

BATCHES_CHECKED = 20  # a run whose first batches hold no readable image stops after these


@dataclass
class ScaleEstimate:
    scale: float
    images: int    # images encoded
    batches: int   # batches they came in
    skipped: int   # unreadable images left out


@torch.no_grad()
def estimate_scale(autoencoder, images, batches=32, batch_size=64, image_size=256,
                   num_workers=0, device='cpu', seed=0, progress=True):
    """Encodes `batches` shuffled batches of `images`, a list of paths or a Source (all of
    them if there are fewer; `seed` picks them), and returns the scale of their latents.

    Raises RunError if the first BATCHES_CHECKED batches (or all of them, if fewer) hold
    no readable image: a list of wrong paths would otherwise go through every batch to
    say so.
    """
    device = torch.device(device)
    source = images if isinstance(images, Source) else None
    paths = images if source is None else source.paths
    if paths is not None:
        loader = make_loader(paths, image_size, batch_size, num_workers, shuffle=True,
                             seed=seed, drop_last=False)
        available = len(loader)
    else:  # streamed: as many batches as it has rows for, where that is known
        loader = source.stream_loader(image_size, batch_size, num_workers, seed, rank=0,
                                      world_size=1)
        known = source.known_images
        available = None if known is None else -(-known // batch_size)
    n_batches = batches if available is None else min(batches, available)
    stats, encoded, used, skipped, seen = PartStats(), 0, 0, 0, 0
    for seen, batch in enumerate(tqdm(itertools.islice(loader, n_batches), total=n_batches,
                                      unit='batch', disable=not progress), 1):
        skipped += batch['skipped']
        if len(batch['images']):
            mean, std = latents.posterior(autoencoder, batch['images'].to(device))
            totals, totals_sq = (t.sum().item() for t in latent_sums(mean, std))
            stats.add(mean.numel(), totals, totals_sq)
            encoded += len(mean)
            used += 1
        if not encoded and seen == BATCHES_CHECKED:
            break
    if not encoded:
        if paths is not None:
            name = 'the path list' if source is None else source.spec
            raise RunError(f'none of the {skipped} files tried from {name} ({seen} batch(es)) '
                           'could be read as an image; check that it lists image paths, one a '
                           'line, and that the data set is mounted.')
        raise RunError(f'none of the {skipped} images tried from {images.spec} ({seen} '
                       'batch(es)) could be read; check that they are image files (and, for '
                       'parquet files and datasets, --image-column).')
    return ScaleEstimate(stats.scale(), encoded, used, skipped)

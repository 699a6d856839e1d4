"""The features of --reference-set, the images generated ones are compared with, and
their cache.

Reference images are brought to the generated images' form: the training transform
(resized to cover the size, Lanczos, centre crop) then 8 bits, as a PNG holds them; the
feature network does the rest (InceptionV3 its own resize to 299). Every model compared
on one set thus sees the same reference features.

Reading and embedding a set of thousands of images takes longer than comparing, so the
features are cached, keyed by what makes them: the set's listing (each path or shard
with its size and modification time, so an edited, added or removed file makes a new
key), the feature network (with its weights' digest) and the image size.
"""

import hashlib
import json
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils import data
from tqdm.auto import tqdm

from ..cli import size_pair
from ..errors import RunError
from ..files import atomic_write

CACHE_VERSION = 1
RESIZE = 'shorter side Lanczos, centre crop, 8-bit'


@dataclass
class ReferenceFeatures:
    features: np.ndarray  # [images, d] float64
    skipped: int          # unreadable images left out
    key: str              # the cache key
    cached: bool          # read from the cache rather than computed


def listing(source):
    """What the set is made of, cheaply: each local file with its size and mtime (listed
    images, tar shards, parquet or dataset files), each remote shard by its URL, a hub
    dataset by its name; with the column and split its images are taken from."""
    described = [[source.image_column, source.split]]
    for entry in source.files or [source.spec]:
        try:
            stat = os.stat(entry)
            described.append([str(entry), stat.st_size, stat.st_mtime_ns])
        except (OSError, ValueError):  # a URL, or a file gone missing (read as unreadable)
            described.append([str(entry)])
    return described


def cache_key(source, network, size):
    recipe = {'version': CACHE_VERSION, 'set': listing(source), 'network': network.identity,
              'size': recorded_size(size), 'resize': RESIZE}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def recorded_size(size):
    """A square's size as the one number earlier caches were keyed by, else [width,
    height]."""
    width, height = size_pair(size)
    return width if width == height else [width, height]


def to_bytes(images):
    """Images in [0, 1] -> 8-bit, rounded as a PNG of them is (png_files.to_pil)."""
    return images.clamp(0, 1).mul(255).round().byte()


def compute(source, network, size, batch_size, num_workers):
    """Features [n, d] of every readable image of `source`, and how many were unreadable
    (each is warned about and skipped)."""
    from ..data.precompute import UnitImages
    from ..processes import init_loader_worker
    loader = data.DataLoader(UnitImages(source, range(len(source)), size), batch_size=batch_size,
                             num_workers=num_workers, collate_fn=list,
                             worker_init_fn=init_loader_worker if num_workers else None)
    features, skipped = [], 0
    with tqdm(total=source.known_images, unit='img', desc='reference features') as bar:
        for batch in loader:
            items = [(key, image) for _, key, image in batch if key is not None]  # not END
            good = [image for _, image in items if image is not None]
            skipped += len(items) - len(good)
            if good:
                features.append(network(to_bytes(torch.stack(good))))
            bar.update(len(items))
    if not features:
        raise RunError(f'none of the {skipped} images of --reference-set {source.spec} could be '
                       'read; check that the set is mounted and holds images.')
    return torch.cat(features).numpy(), skipped


def reference_features(source, network, size, cache_dir, batch_size=32, num_workers=4):
    """The reference set's features, from the cache in `cache_dir` when it holds them."""
    key = cache_key(source, network, size)
    path = Path(cache_dir) / f'{key}.npz'
    if path.is_file():
        with np.load(path, allow_pickle=False) as cached:
            print(f'reference features of {source.spec} from the cache ({path})',
                  file=sys.stderr)
            return ReferenceFeatures(cached['features'], int(cached['skipped']), key, True)
    features, skipped = compute(source, network, size, batch_size, num_workers)
    if skipped:
        warnings.warn(f'--reference-set: {skipped} unreadable image(s) skipped, '
                      f'{len(features)} used.')
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        np.savez(f, features=features, skipped=skipped)
    with atomic_write(path.with_suffix('.json'), 'w') as f:  # what the cache file holds
        json.dump({'set': source.spec, 'images': len(features), 'skipped': skipped,
                   'network': network.identity, 'size': recorded_size(size), 'resize': RESIZE},
                  f, indent=1)
    return ReferenceFeatures(features, skipped, key, False)

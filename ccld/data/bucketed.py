"""A path list trained on aspect-ratio buckets (buckets.py): each image's size read from
its header once (cached beside the list), a batch sampler that follows the epoch plan, and
a dataset that resizes each image to cover its batch's bucket and crops the rest.

The sampler deals each rank its own share, so Lightning must not add its distributed
sampler (runner.make_trainer: use_distributed_sampler off with --aspect-buckets). The
loader is stateful for Lightning: each checkpoint holds how far the epoch's plan has got,
and a run resumed mid-epoch goes on with the batches the plan has left, so every image is
still used once an epoch and every rank runs the same number of batches.
"""

import os
import sys
import zlib
from pathlib import Path

import torch
from PIL import Image
from torch.utils import data
from torchvision import transforms
from torchvision.transforms import functional as F

from . import buckets
from ..errors import UserError
from .images import (UNREADABLE, caption_of, collate_skipping_bad, cover, load_image,
                     warn_skipped)

ROTATED = (5, 6, 7, 8)  # EXIF orientations that turn the picture a quarter (load_image does)


def header_size(path):
    """(width, height) of the picture an image file shows, from its header alone (no
    decode); None if it cannot be opened (the loader skips it)."""
    try:
        with Image.open(path) as image:
            w, h = image.size
            return (h, w) if image.getexif().get(0x0112) in ROTATED else (w, h)
    except Exception:  # noqa: BLE001 - an unreadable file is skipped when it is loaded
        return None


def image_sizes(paths, list_path):
    """Each path's header_size, read once: cached in LIST.sizes.tsv beside the list (path,
    mtime, width, height), reread for files whose mtime changed. A folder that cannot be
    written to just goes without the cache."""
    cache_path = Path(f'{list_path}.sizes.tsv')
    cached = {}
    if cache_path.is_file():
        for line in cache_path.read_text().splitlines():
            path, mtime, w, h = line.rsplit('\t', 3)
            cached[path, mtime] = (int(w), int(h))
    sizes, lines = [], []
    for path in paths:
        try:
            mtime = str(os.stat(path).st_mtime_ns)
        except OSError:
            sizes.append(None)
            continue
        size = cached.get((path, mtime)) or header_size(path)
        sizes.append(size)
        if size is not None:
            lines.append(f'{path}\t{mtime}\t{size[0]}\t{size[1]}\n')
    try:
        tmp = cache_path.with_name(cache_path.name + '.tmp')
        tmp.write_text(''.join(lines))
        tmp.replace(cache_path)
    except OSError:
        pass
    return sizes


def bucket_of_each(sizes, table):
    """Each image's bucket index; an unreadable one (None) goes to the squarest bucket and
    is skipped when loaded."""
    square = buckets.assign(1, 1, table)
    return [square if s is None else buckets.assign(*s, table) for s in sizes]


def describe(bucket_of, table):
    """How many images each bucket holds, for the start of a run: 'WxH: N, ...'."""
    return ', '.join(f'{w}x{h}: {bucket_of.count(i)}' for i, (w, h) in enumerate(table))


def cover_crop(image, size, random_crop, generator=None):
    """A PIL image resized (Lanczos) to the least that covers `size` (width, height), then
    cropped to it: at a random offset (drawn from `generator`, or torch's), or the centre
    (images.cover)."""
    if not random_crop:
        return cover(image, size)
    width, height = size
    w, h = image.size
    scale = max(width / w, height / h)
    new_w, new_h = max(width, round(w * scale)), max(height, round(h * scale))
    image = F.resize(image, [new_h, new_w], interpolation=transforms.InterpolationMode.LANCZOS)
    top = int(torch.randint(new_h - height + 1, (), generator=generator))
    left = int(torch.randint(new_w - width + 1, (), generator=generator))
    return F.crop(image, top, left, height, width)


def to_bucket(image, size, random_crop, random_flip):
    """A PIL image as the [3, height, width] tensor of bucket `size` (cover_crop), mirrored
    half of the time with `random_flip`."""
    image = cover_crop(image, size, random_crop)
    if random_flip and torch.rand(()) < 0.5:
        image = F.hflip(image)
    return F.to_tensor(image)


def fit_to_bucket(key, image, table, random_crop):
    """A PIL image as the latent cache stores it: resized to cover the bucket of its aspect
    ratio and cropped, as a [3, H, W] tensor in [0, 1]. A random crop is drawn from the
    key, so that a resumed or repeated precompute makes the same cache."""
    size = table[buckets.assign(*image.size, table)]
    generator = torch.Generator().manual_seed(zlib.crc32(key.encode('utf-8', 'surrogateescape')))
    return F.to_tensor(cover_crop(image, size, random_crop, generator))


class BucketedImages(data.Dataset):
    """(path, image, caption) for an (index, bucket) the sampler gives: the image resized
    to cover the bucket and cropped (`random_crop`, or the centre), optionally mirrored."""

    def __init__(self, paths, texts, table, random_crop=True, random_flip=False):
        self.paths, self.texts, self.table = list(paths), list(texts), table
        self.random_crop, self.random_flip = random_crop, random_flip

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, item):
        index, bucket = item
        path = self.paths[index]
        text = caption_of(path, self.texts[index])
        try:
            return path, to_bucket(load_image(path), self.table[bucket], self.random_crop,
                                   self.random_flip), text
        except Exception as e:  # noqa: BLE001 - any decoder failure means "skip this file"
            warn_skipped(path, e)
            return path, UNREADABLE, text


class BucketBatchSampler(data.Sampler):
    """One rank's batches of (index, bucket), from buckets.epoch_plan for the epoch
    Lightning sets; the same number on every rank. After resume(epoch, done) that
    epoch's first `done` batches are left out (its length stays the plan's: Lightning
    counts the batches done before the resume)."""

    def __init__(self, bucket_of, batch_size, world_size, rank, seed, epoch=0, catch_all=True):
        self.bucket_of, self.batch_size, self.catch_all = bucket_of, batch_size, catch_all
        self.world_size, self.rank, self.seed, self.epoch = world_size, rank, seed, epoch
        self.resumed = None  # (epoch, batches of it done before the resume)

    @property
    def sampler(self):
        """Itself: Lightning calls set_epoch on a batch sampler's `sampler`, never on the
        batch sampler."""
        return self

    def set_epoch(self, epoch):
        self.epoch = epoch

    def resume(self, epoch, done):
        self.epoch, self.resumed = epoch, (epoch, done)

    def plan(self):
        return buckets.epoch_plan(self.bucket_of, self.batch_size, self.world_size, self.rank,
                                  self.seed, self.epoch, self.catch_all)

    def first_batch(self):
        """Where this epoch's iteration starts in its plan."""
        return self.resumed[1] if self.resumed and self.resumed[0] == self.epoch else 0

    def __iter__(self):
        return iter(self.plan()[self.first_batch():])

    def __len__(self):
        return len(self.plan())


class BucketLoader(data.DataLoader):
    """The loader of a BucketBatchSampler, with the state_dict and load_state_dict by
    which Lightning saves a loader's position in each checkpoint and restores it on a
    mid-epoch resume: the epoch and how many of its batches this process has taken
    (counted here, as they are handed out, not where workers read ahead)."""

    position = None  # (epoch, batches of it handed out)

    def __iter__(self):
        sampler = self.batch_sampler
        epoch, taken = sampler.epoch, sampler.first_batch()
        self.position = (epoch, taken)
        for batch in super().__iter__():
            taken += 1
            self.position = (epoch, taken)
            yield batch

    def state_dict(self):
        epoch, taken = self.position or (self.batch_sampler.epoch, 0)
        return {'bucket_plan_epoch': epoch, 'batches_taken': taken}

    def load_state_dict(self, state):
        if 'batches_taken' in state:  # (not another loader's: a run switched to buckets)
            self.batch_sampler.resume(state['bucket_plan_epoch'], state['batches_taken'])


def make_bucket_loader(paths, texts, list_path, table, batch_size, num_workers, seed, rank,
                       world_size, random_crop=True, random_flip=False, worker_init_fn=None,
                       prefetch_factor=2, epoch=0):
    """The loader of one rank's bucketed batches of a path list."""
    bucket_of = bucket_of_each(image_sizes(paths, list_path), table)
    sampler = BucketBatchSampler(bucket_of, batch_size, world_size, rank, seed, epoch)
    if rank == 0:
        print(f'--aspect-buckets: images a bucket: {describe(bucket_of, table)}',
              file=sys.stderr, flush=True)
    if not len(sampler):  # (an epoch of no batches would never end a run)
        raise UserError(f'--aspect-buckets: {len(paths)} images make fewer than one batch of '
                        f'{batch_size} for each of {world_size} process(es); use a smaller '
                        '--batch-size or more images.')
    return BucketLoader(
        BucketedImages(paths, texts, table, random_crop, random_flip),
        batch_sampler=sampler,
        num_workers=num_workers, collate_fn=collate_skipping_bad,
        persistent_workers=num_workers > 0, pin_memory=torch.cuda.is_available(),
        worker_init_fn=worker_init_fn, prefetch_factor=prefetch_factor if num_workers else None)

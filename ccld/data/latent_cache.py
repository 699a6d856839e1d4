"""The latent cache: every training image's KL posterior (mean and std, fp16) and CLOOB
image embedding, computed once by precompute_latents.py instead of every epoch; and its
caption (UTF-8, empty for none) and the caption's CLOOB text embedding (zeros for none).
Caches made before captions were read hold neither, and train as they did.

Layout of a cache directory:
    ccld_cache.json         the manifest: what made the cache, counts, the scale. Written
                            last: a directory without it is not a finished cache.
    index.json              litdata's index of every chunk below (written with it)
    parts/part-NNNNNN/      one part per unit of the source (a slice of the path list or
                            one tar shard): litdata chunks + part.json (counts and sums)
    plan.json               the settings the parts are made with, so that a rerun that
                            would mix other settings into them is refused
    buckets.npy             in a cache made with --aspect-buckets: each record's bucket
                            (an index into the manifest's 'buckets'), in the index's order

A bucketed cache holds each image's latents at its bucket's shape; training draws every
batch from one bucket, planned from buckets.npy (buckets.epoch_plan) without reading the
latents, and reads the records by index.

Each part is written in a hidden temp directory and renamed into place whole, so a kill
at any moment leaves it finished or absent. Reading goes through litdata, which shuffles
chunks and items per epoch and gives every rank the same number of batches.
"""

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from torch.utils import data

from . import gap
from .. import software_version
from ..errors import RunError, UserError
from ..files import atomic_write, fsync_dir, temp_name

MANIFEST = 'ccld_cache.json'
PLAN = 'plan.json'
BUCKETS = 'buckets.npy'
FORMAT = 'ccld-latent-cache'
FORMAT_VERSION = 1
CHUNK_BYTES = '64MB'


def part_dir(root, unit):
    return Path(root) / 'parts' / f'part-{unit:06d}'


def part_done(root, unit):
    return (part_dir(root, unit) / 'part.json').is_file()


def read_json(path, what):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f'cannot read {what} {path} ({e}).') from None


def write_json(path, value):
    with atomic_write(path, 'w') as f:
        json.dump(value, f, indent=1)


class PartStats:
    """Sums over a part's latents, from which the autoencoder scale follows exactly.

    For a posterior N(mean, std^2), E[z] = mean and E[z^2] = mean^2 + std^2, so the
    variance of latent samples over the whole set needs no samples at all.
    """

    def __init__(self, elements=0, total=0.0, total_sq=0.0):
        self.elements, self.total, self.total_sq = elements, total, total_sq

    def add(self, elements, total, total_sq):
        self.elements += elements
        self.total += total
        self.total_sq += total_sq

    def scale(self):
        """sqrt of the variance of latent samples: the autoencoder scale (data/scale.py)."""
        mean = self.total / self.elements
        return math.sqrt(self.total_sq / self.elements - mean ** 2)


def latent_sums(mean, std):
    """Per example [n]: sum of the means and sum of mean^2 + std^2, in float64."""
    mean, std = mean.double().flatten(1), std.double().flatten(1)
    return mean.sum(1), (mean.square() + std.square()).sum(1)


def write_part(root, unit, records, skipped, stats, extra=None):
    """Writes one part whole: litdata chunks of `records` (dicts of key, mean, std, embed,
    and caption and text_embed in caches that read captions) and part.json (with `extra`
    in it), in a temp directory that is renamed into place when complete."""
    from litdata import complete_dataset
    from litdata.streaming.writer import BinaryWriter
    final = part_dir(root, unit)
    tmp = temp_name(final)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    chunks, config = [], None
    if records:
        writer = BinaryWriter(str(tmp), chunk_bytes=CHUNK_BYTES)
        for i, record in enumerate(records):
            writer[i] = record
        writer.done()
        complete_dataset(str(tmp))
        index = json.loads((tmp / 'index.json').read_text())
        chunks, config = index['chunks'], index['config']
    summary = {'unit': unit, 'images': len(records), 'skipped': skipped,
               'elements': stats.elements, 'sum': stats.total, 'sum_sq': stats.total_sq,
               'chunks': chunks, 'config': config, **(extra or {})}
    write_json(tmp / 'part.json', summary)
    for path in tmp.iterdir():
        with open(path, 'rb') as f:
            os.fsync(f.fileno())
    os.replace(tmp, final)
    fsync_dir(final.parent)
    return summary


def finalize(root, units, settings):
    """Joins the parts' indexes into one and writes the manifest; returns the manifest.

    RunError if a part is missing (a rank did not finish) or no image was readable.
    """
    root = Path(root)
    parts, chunks, config = [], [], None
    for unit in range(units):
        if not part_done(root, unit):
            raise RunError(f'part {unit} of {root} is missing; rerun the same command to '
                           'finish the cache.')
        part = read_json(part_dir(root, unit) / 'part.json', 'cache part')
        parts.append(part)
        prefix = part_dir(root, unit).relative_to(root).as_posix()
        chunks += [dict(c, filename=f'{prefix}/{c["filename"]}') for c in part['chunks']]
        config = config or part['config']
    images = sum(p['images'] for p in parts)
    skipped = sum(p['skipped'] for p in parts)
    if not images:
        raise RunError(f'none of the {skipped} images of {settings["source"]} could be read; '
                       'check that the data set is mounted and the list holds image paths.')
    stats = PartStats()
    for p in parts:
        stats.add(p['elements'], p['sum'], p['sum_sq'])
    write_json(root / 'index.json', {'chunks': chunks, 'config': config})
    counts = {}
    if 'buckets' in settings:
        bucket_of = np.array([b for p in parts for b in p['buckets']], dtype=np.int16)
        with atomic_write(root / BUCKETS, 'wb') as f:
            np.save(f, bucket_of)
        counts['bucket_images'] = np.bincount(bucket_of, minlength=len(settings['buckets'])
                                              ).tolist()
    manifest = dict(settings, format=FORMAT, format_version=FORMAT_VERSION,
                    software=f'ccld {software_version()}', images=images, skipped=skipped,
                    parts=units, autoencoder_scale=stats.scale(), **counts,
                    **caption_summary(parts))
    write_json(root / MANIFEST, manifest)
    return manifest


def caption_summary(parts):
    """What the manifest says of the captions: how many images had one, and the gap
    report (gap.gap_report) on the pairs the parts kept; {} for parts made without
    reading captions."""
    if not any('captions' in p for p in parts):
        return {}
    count = sum(p.get('captions', 0) for p in parts)
    pairs = {side: [v for p in parts for v in p.get('similarity', {}).get(side, [])]
             for side in ('matched', 'mismatched')}
    return {'captions': count,
            'caption_gap': gap.gap_report(**pairs) if pairs['matched'] else None}


def has_captions(manifest):
    """Whether a cache holds captions' text embeddings to train with --text-prob."""
    return bool(manifest.get('captions'))


def read_manifest(root):
    """The manifest of a finished cache; UserError for anything else."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f'{root} does not exist; make a latent cache there with '
                        'precompute_latents.py.')
    if not (root / MANIFEST).is_file():
        what = 'an unfinished latent cache' if (root / PLAN).is_file() else 'not a latent cache'
        raise UserError(f'{root} is {what} (no {MANIFEST}); run precompute_latents.py to '
                        'finish it (rerunning the same command resumes).')
    manifest = read_json(root / MANIFEST, 'cache manifest')
    if manifest.get('format') != FORMAT or manifest.get('format_version') != FORMAT_VERSION:
        raise UserError(f'{root / MANIFEST} is not a ccld latent cache of format version '
                        f'{FORMAT_VERSION}; make the cache again with this version.')
    return manifest


MATCHED = {  # setting -> (its flag in training, how to show it)
    'autoencoder': ('--vqgan-model', lambda s: f'{s["name"]} (sha256 {s["sha256"][:12]})'),
    'image_size': ('--image-size', str),
    'cloob': ('--cloob-checkpoint', lambda s: f'{s["name"]} (sha256 {s["sha256"][:12]})'),
}


def same_setting(key, recorded, given):
    """Whether a cache's setting `key` is the one given: CLOOB by its file's content, the
    autoencoder by its encoder's (a decoder-only finetune makes the same latents)."""
    from ..models.autoencoder import same_encoder
    if key == 'autoencoder':
        return same_encoder(recorded, given)
    return recorded.get('sha256') == given['sha256'] if isinstance(given, dict) else \
        recorded == given


def check_matches(manifest, settings, root):
    """UserError naming both sides when the cache was made with another autoencoder
    (encoder), image size or CLOOB than training is given."""
    for key, (flag, show) in MATCHED.items():
        ours, theirs = settings[key], manifest[key]
        if not same_setting(key, theirs, ours):
            raise UserError(f'--train-latents {root} was made with {key.replace("_", " ")} '
                            f'{show(theirs)}, but {flag} gives {show(ours)}; pass the same '
                            'one, or make a cache for this one.')


def encode_key(key):
    """Keys are stored as bytes: litdata would store a str naming an existing file as that
    file's content (an image path would become the image)."""
    return key.encode('utf-8', 'surrogateescape')


def decode_key(key):
    return bytes(key).decode('utf-8', 'surrogateescape')  # litdata gives a memoryview


def collate_records(records):
    """Cache records -> a batch {'mean', 'std', 'embed', 'keys', 'skipped'}, and
    'text_embed' and 'has_text' (whether each record has a caption) where the cache holds
    them."""
    batch = {name: torch.stack([r[name] for r in records]) for name in ('mean', 'std', 'embed')}
    if 'text_embed' in records[0]:
        batch['text_embed'] = torch.stack([r['text_embed'] for r in records])
        batch['has_text'] = torch.tensor([len(r['caption']) > 0 for r in records])
    return dict(batch, keys=[decode_key(r['key']) for r in records], skipped=0)


def make_cache_loader(root, batch_size, num_workers, seed, worker_init_fn=None,
                      prefetch_factor=2):
    """A litdata loader over a finished cache, for the current rank.

    Call it once the process group is up (from a train_dataloader hook): litdata reads
    the rank when the dataset is made. It reshuffles chunks and the items within them
    every epoch, and under DDP drops the last world_size * batch_size - 1 items at most
    (a different few each epoch) so every rank runs the same number of steps.
    """
    from litdata import StreamingDataLoader, StreamingDataset

    # A full shuffle inside each chunk, items decoded one by one: litdata's default
    # window decodes 256 records at a time, 100x slower for records this small.
    dataset = StreamingDataset(str(root), shuffle=True, seed=seed, item_shuffle_window=0,
                               batch_decode=0)
    return StreamingDataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                               collate_fn=collate_records, worker_init_fn=worker_init_fn,
                               pin_memory=torch.cuda.is_available(),
                               prefetch_factor=prefetch_factor if num_workers else None,
                               persistent_workers=num_workers > 0)


class RecordsByIndex(data.Dataset):
    """A finished cache's records read by their index, for a batch sampler of (index,
    bucket) pairs (bucketed.BucketBatchSampler). Opened lazily in each loader worker."""

    def __init__(self, root):
        self.root, self.records = str(root), None

    def __getitem__(self, item):
        from litdata import StreamingDataset
        if self.records is None:  # (items decoded one by one: see make_cache_loader)
            self.records = StreamingDataset(self.root, batch_decode=0)
        return self.records[int(item[0])]


def make_bucketed_cache_loader(root, batch_size, num_workers, seed, rank, world_size,
                               worker_init_fn=None, prefetch_factor=2, epoch=0):
    """A loader of one rank's batches of a cache made with --aspect-buckets: each batch one
    bucket's records, the same number on every rank (bucketed.BucketBatchSampler). A
    bucket's leftovers make a smaller batch: latents cannot be resized into another
    bucket's shape. Lightning must not add its distributed sampler (runner.make_trainer);
    a run resumed mid-epoch goes on where it stopped (bucketed.BucketLoader)."""
    from .bucketed import BucketBatchSampler, BucketLoader
    bucket_of = np.load(Path(root) / BUCKETS).tolist()
    sampler = BucketBatchSampler(bucket_of, batch_size, world_size, rank, seed, epoch,
                                 catch_all=False)
    if not len(sampler):  # (an epoch of no batches would never end a run)
        raise UserError(f'--train-latents: {len(bucket_of)} cached images make fewer batches '
                        f'than the {world_size} processes; use more images.')
    return BucketLoader(RecordsByIndex(root), batch_sampler=sampler, num_workers=num_workers,
                        collate_fn=collate_records, worker_init_fn=worker_init_fn,
                        pin_memory=torch.cuda.is_available(),
                        prefetch_factor=prefetch_factor if num_workers else None,
                        persistent_workers=num_workers > 0)

"""What precompute_latents.py does: encode every image of a training set once, through the
frozen autoencoder and CLOOB, into a latent cache (see latent_cache.py).

The set is cut into units (path-list slices or tar shards); each process encodes the
units whose number is its rank modulo the world size and writes one part per unit. A
rerun skips finished parts, so an interrupted run resumes where it stopped, with any
number of processes.
"""

import functools
import sys
from collections import defaultdict
from datetime import timedelta
from pathlib import Path

import torch
from torch.utils import data
from tqdm.auto import tqdm

from . import gap, latent_cache
from ..models import latents
from ..errors import RunError, UserError
from ..files import check_writable_dir, remove_stale_temps
from .sources import transformed

END = None  # the key that marks the end of a unit in the stream of images
# The settings a rerun must share with the parts made before (the models are compared by
# their digests).
PLANNED = ('image_size', 'source', 'image_column', 'caption_column', 'split', 'units',
           'unit_size', 'buckets', 'bucket_crop')
NO_DATA_BATCHES = 20


def settings_for(args, source):
    """What the parts are made with; a rerun must match it, and training checks the first
    three (and trains on the buckets of a cache that has them)."""
    from ..models.autoencoder import describe as describe_autoencoder
    from ..models.cloob import describe as describe_cloob
    settings = {'autoencoder': describe_autoencoder(args.vqgan_model),
                'cloob': describe_cloob(args.cloob_checkpoint), 'image_size': args.image_size,
                'source': source.location, 'image_column': source.image_column,
                'caption_column': source.caption_column,
                'split': source.split, 'units': len(source), 'unit_size': source.unit_size}
    if args.buckets is not None:  # (a square cache's plan and manifest stay as they were)
        settings.update(buckets=[list(b) for b in args.buckets], bucket_crop=args.bucket_crop)
    return settings


def prepare(root, settings):
    """Before any process starts encoding: records the plan, or checks that a rerun's
    settings are those the existing parts were made with, and clears a killed run's
    temp files."""
    root = Path(root)
    check_writable_dir(root, '--output')
    (root / 'parts').mkdir(parents=True, exist_ok=True)
    plan_path = root / latent_cache.PLAN
    if plan_path.is_file():
        plan = latent_cache.read_json(plan_path, 'cache plan')
        changed = [k for k in PLANNED if plan.get(k) != settings.get(k)]
        changed += [k for k in ('autoencoder', 'cloob')
                    if not latent_cache.same_setting(k, plan.get(k, {}), settings[k])]
        if changed:
            raise UserError(f'--output: {root} holds a cache made with other settings '
                            f'({", ".join(changed)} differ); pass a new --output, or the '
                            'same settings to resume it.')
    else:
        latent_cache.write_json(plan_path, settings)
    remove_stale_temps(root / 'parts')


class UnitImages(data.IterableDataset):
    """(unit, key, image tensor or None, caption or None) for every image of the given
    units, each unit followed by (unit, END, None, None); each loader worker takes its own
    units. (END is None, not a sentinel object: items are pickled on their way from the
    workers.) Images are square, or fitted by `fit` (sources.transformed)."""

    def __init__(self, source, units, image_size, fit=None):
        super().__init__()
        self.source, self.units, self.image_size, self.fit = source, list(units), image_size, fit

    def __iter__(self):
        info = data.get_worker_info()
        units = self.units if info is None else self.units[info.id::info.num_workers]
        for unit in units:
            for key, image, text in transformed(self.source.items(unit), self.image_size,
                                                self.fit):
                yield unit, key, image, text
            yield unit, END, None, None


@torch.inference_mode()
def encode(ae_model, cloob, images, texts):
    """Images in [0, 1] and their captions -> posterior means and stds (fp32), CLOOB image
    embeddings, as training computes them, and the captions' CLOOB text embeddings (zeros
    where there is no caption: one text forward per caption, the cost of --text-prob)."""
    embeds = cloob.embed_images(images)
    text_embeds = torch.zeros_like(embeds)
    captioned = [i for i, text in enumerate(texts) if text is not None]
    if captioned:
        text_embeds[captioned] = cloob.embed_texts([texts[i] for i in captioned]).to(embeds)
    return (*latents.posterior(ae_model, images), embeds, text_embeds)


class Part:
    """A unit's records while it is being encoded."""

    def __init__(self):
        self.records, self.skipped, self.stats = [], 0, latent_cache.PartStats()
        self.buckets = []  # each record's, in a bucketed cache

    def caption_summary(self):
        """What part.json keeps of the captions: how many records have one, and the
        similarities of the first gap.REPORT_SAMPLE of them (the gap report's pairs)."""
        captioned = [r for r in self.records if r['caption']][:gap.REPORT_SAMPLE]
        matched, mismatched = gap.similarities(
            torch.stack([r['embed'] for r in captioned]) if captioned else torch.empty(0, 1),
            torch.stack([r['text_embed'] for r in captioned]) if captioned else torch.empty(0, 1))
        return {'captions': sum(bool(r['caption']) for r in self.records),
                'similarity': {'matched': [round(v, 5) for v in matched.tolist()],
                               'mismatched': [round(v, 5) for v in mismatched.tolist()]}}


def encode_units(source, units, root, ae_model, cloob, image_size, batch_size, num_workers,
                 device, progress=True, table=None, random_crop=False):
    """Encodes `units` of `source` and writes a part for each; returns images encoded.

    With a bucket `table`, each image is fitted to its bucket (bucketed.fit_to_bucket) and
    the images of a batch are encoded a bucket at a time: CLOOB then embeds each at its
    bucket's shape, as training from bucketed images does. Each part records its
    records' buckets."""
    from ..processes import init_loader_worker
    from .bucketed import fit_to_bucket
    fit = functools.partial(fit_to_bucket, table=table, random_crop=random_crop) \
        if table is not None else None
    loader = data.DataLoader(UnitImages(source, units, image_size, fit), batch_size=batch_size,
                             num_workers=num_workers, collate_fn=list,
                             worker_init_fn=init_loader_worker if num_workers else None)
    sizes = [source.unit_size_of(u) for u in units]
    known = None not in sizes
    bar = tqdm(total=sum(sizes) if known else len(units), unit='img' if known else 'part',
               disable=not progress, desc='encoding')
    parts, encoded, tried, batches = defaultdict(Part), 0, 0, 0
    for batch in loader:
        good = [item for item in batch if item[2] is not None]
        by_shape = defaultdict(list)  # (one shape, the whole batch, without buckets)
        for item in good:
            by_shape[item[2].shape].append(item)
        for group in by_shape.values():
            images = torch.stack([image for _, _, image, _ in group]).to(device)
            encoded_batch = encode(ae_model, cloob, images, [text for *_, text in group])
            means, stds = encoded_batch[:2]
            # One copy to the CPU per batch: per-image copies would sync the GPU each time.
            totals, totals_sq = (t.cpu() for t in latent_cache.latent_sums(means, stds))
            means, stds, embeds, text_embeds = (t.half().cpu() for t in encoded_batch)
            bucket = None if table is None else table.index((images.shape[3], images.shape[2]))
            for i, (unit, key, _, text) in enumerate(group):
                part = parts[unit]
                part.stats.add(means[i].numel(), totals[i].item(), totals_sq[i].item())
                part.records.append({'key': latent_cache.encode_key(key), 'mean': means[i],
                                     'std': stds[i], 'embed': embeds[i],
                                     'caption': (text or '').encode('utf-8'),
                                     'text_embed': text_embeds[i]})
                if table is not None:
                    part.buckets.append(bucket)
        for unit, key, image, _ in batch:
            if key is END:
                part = parts.pop(unit)
                extra = part.caption_summary()
                if table is not None:
                    extra['buckets'] = part.buckets
                latent_cache.write_part(root, unit, part.records, part.skipped, part.stats,
                                        extra)
                bar.update(0 if known else 1)
            elif image is None:
                parts[unit].skipped += 1
        images_in_batch = sum(key is not END for _, key, _, _ in batch)
        encoded, tried, batches = encoded + len(good), tried + images_in_batch, batches + 1
        if known:
            bar.update(images_in_batch)
        bar.set_postfix(images=encoded, refresh=False)
        if batches == NO_DATA_BATCHES and not encoded:
            raise RunError(f'none of the first {tried} images of {source.spec} could be read; '
                           'check that the data set is mounted and the list holds image paths.')
    bar.close()
    return encoded


def run(args, source):
    """Launches the processes, encodes this one's share, and (rank zero) finishes the cache."""
    from lightning_fabric import Fabric
    from lightning_fabric.strategies import DDPStrategy

    from ..models.autoencoder import load_autoencoder
    from ..models.cloob import load_cloob
    from ..processes import is_first_process

    root = Path(args.output)
    settings = settings_for(args, source)
    if is_first_process():
        prepare(root, settings)
    processes = args.num_gpus * args.num_nodes
    # Ranks finish their shares at different times; the wait for the slowest is long.
    strategy = DDPStrategy(timeout=timedelta(days=2)) if processes > 1 else 'auto'
    fabric = Fabric(accelerator='cpu' if args.device.type == 'cpu' else 'cuda',
                    devices=args.num_gpus, num_nodes=args.num_nodes, strategy=strategy)
    fabric.launch()
    rank, world = fabric.global_rank, fabric.world_size
    units = [u for u in range(rank, len(source), world) if not latent_cache.part_done(root, u)]
    done = len(range(rank, len(source), world)) - len(units)
    if rank == 0:
        print(f'{len(source)} parts of {source.spec} on {world} process(es); this one has '
              f'{len(units)} to encode ({done} already done).', file=sys.stderr, flush=True)
    if units:
        ae_model = load_autoencoder(args.vqgan_model, device=fabric.device)
        cloob = load_cloob(args.cloob_checkpoint, fabric.device)
        encode_units(source, units, root, ae_model, cloob, args.image_size, args.batch_size,
                     args.num_workers, fabric.device, progress=rank == 0, table=args.buckets,
                     random_crop=args.bucket_crop == 'random')
    fabric.barrier()
    if rank != 0:
        return None
    return latent_cache.finalize(root, len(source), settings)

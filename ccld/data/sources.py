"""Where training images come from: a text file of paths; webdataset tar shards as
img2dataset writes them (`data/{00000..01023}.tar`, a directory of .tar files, or URLs
webdataset can open); parquet files (parquet.py); or a Hugging Face dataset, saved to disk
or on the hub (hf_datasets.py). All but path lists are streamed, and split across ranks
and loader workers by the source itself.

Every kind is cut into numbered units (a slice of the path list, one tar file, a run of
parquet row groups, a slice of a saved dataset, a hub shard): the granule that
precompute_latents.py makes one cache part of, and resumes by.
"""

import functools
import io
import itertools
from pathlib import Path

from torch.utils import data

from . import captions
from .hf_datasets import HUB, HubImages, SavedImages, is_saved_dataset
from .images import (IMAGE_EXTENSIONS, UNREADABLE, batched_loader, caption_of,
                     check_some_exist, image_transform, load_image, read_path_list,
                     warn_skipped)
from .parquet import ParquetImages, has_parquet_files
from .tables import bucket_batches
from ..errors import UserError


def is_tar_spec(spec):
    """Tar shards: a brace pattern, a .tar path or URL, or a directory of .tar files."""
    spec = str(spec)
    return '{' in spec or spec.endswith('.tar') or '://' in spec or spec.startswith('pipe:') \
        or Path(spec).is_dir()


def kind_of(spec):
    """What a --train-set names: 'hub', 'saved' (save_to_disk), 'parquet', 'tar' or 'list'."""
    if spec.startswith(HUB):
        return 'hub'
    path = Path(spec)
    if path.is_dir():
        if is_saved_dataset(path):
            return 'saved'
        if next(path.glob('*.tar'), None) is None and has_parquet_files(path):
            return 'parquet'  # (img2dataset's tar output has metadata-only parquet beside it)
        return 'tar'
    if spec.endswith('.parquet'):
        return 'parquet'
    return 'tar' if is_tar_spec(spec) else 'list'


def tar_urls(spec):
    """The shard URLs of a tar spec; a directory is listed once, for its .tar files only."""
    import webdataset as wds
    if Path(spec).is_dir():
        urls = sorted(str(p) for p in Path(spec).glob('*.tar'))
        if not urls:
            raise UserError(f'{spec} is a directory with no .tar shards, .parquet files or '
                            'saved dataset in it.')
        return urls
    urls = wds.shardlists.expand_urls(str(spec))
    local = [u for u in urls if '://' not in u and not u.startswith('pipe:')]
    missing = [u for u in local if not Path(u).is_file()]
    if missing:
        raise UserError(f'{len(missing)} of the {len(urls)} shards of {spec} do not exist '
                        f'(e.g. {missing[0]}).')
    return urls


class Source:
    """A training set cut into units. `spec` is what the user passed; `image_column` and
    `caption_column` (None: found from the schema) and `split` apply to parquet files and
    datasets, `unit_size` to path lists, parquet files and saved datasets. Exactly one of
    `paths` (a path list, with `texts`: the captions its lines give), `urls` (tar shards)
    and `table` (the rest) is set."""

    def __init__(self, spec, unit_size=10_000, image_column=None, split='train',
                 caption_column=None):
        self.spec = str(spec)
        self.paths = self.texts = self.urls = self.table = None
        self.unit_size = unit_size
        kind = kind_of(self.spec)
        for flag, column in (('--image-column', image_column),
                             ('--caption-column', caption_column)):
            if column is not None and kind in ('list', 'tar'):
                raise UserError(f'{flag} {column} names a column of parquet files or '
                                f'datasets; {self.spec} is '
                                f'{"a path list" if kind == "list" else "a set of tar shards"}.')
        if kind == 'list':
            self.paths, self.texts = read_path_list(spec)
            check_some_exist(self.paths, spec)
        elif kind == 'tar':
            self.urls, self.unit_size = tar_urls(spec), None
        elif kind == 'parquet':
            self.table = ParquetImages(self.spec, image_column, unit_size, caption_column)
        elif kind == 'saved':
            self.table = SavedImages(self.spec, split, image_column, unit_size, caption_column)
        else:
            self.table, self.unit_size = HubImages(self.spec, split, image_column,
                                                   caption_column), None

    @property
    def is_tar(self):
        return self.urls is not None

    @property
    def image_column(self):
        return self.table.columns.image if self.table is not None else None

    @property
    def caption_column(self):
        return self.table.columns.caption if self.table is not None else None

    @property
    def may_have_captions(self):
        """False for a table without a caption column; path lists and tar shards show
        whether they have captions only as they are read."""
        return self.table is None or self.caption_column is not None

    @property
    def split(self):
        return self.table.split if self.table is not None else None

    @property
    def location(self):
        """What names the set in a cache's plan: its resolved path, or the spec of tar
        shards (which may be URLs) and hub datasets."""
        if self.is_tar or isinstance(self.table, HubImages):
            return self.spec
        return str(Path(self.spec).resolve())

    @property
    def files(self):
        """The files the set is read from, where they are local: the listed images, the tar
        shards, the parquet files, a saved dataset's arrow files; [] for a hub dataset."""
        if self.table is None:
            return list(self.paths or self.urls)
        return [str(f) for f in getattr(self.table, 'files', [])]

    @property
    def uneven_shares(self):
        """Whether the ranks' shares of an epoch can differ in length (tar shards and hub
        datasets, whose units are not counted before they are read)."""
        return self.is_tar or isinstance(self.table, HubImages)

    def __len__(self):
        """The number of units."""
        if self.is_tar:
            return len(self.urls)
        if self.table is not None:
            return len(self.table)
        return -(-len(self.paths) // self.unit_size)

    @property
    def known_images(self):
        """The number of images (rows, for tables), where it is known without reading them."""
        if self.table is not None:
            return self.table.rows
        return None if self.is_tar else len(self.paths)

    def unit_size_of(self, unit):
        if self.is_tar:
            return None
        if self.table is not None:
            return self.table.unit_rows(unit)
        return len(self.paths[unit * self.unit_size:(unit + 1) * self.unit_size])

    def items(self, unit):
        """(key, PIL image or the exception that made it unreadable, caption or None) of
        one unit, in order."""
        if self.is_tar:
            yield from tar_images(self.urls[unit])
            return
        if self.table is not None:
            yield from self.table.items(unit)
            return
        span = slice(unit * self.unit_size, (unit + 1) * self.unit_size)
        for path, listed in zip(self.paths[span], self.texts[span]):
            text = caption_of(path, listed)
            try:
                yield path, load_image(path), text
            except Exception as e:  # noqa: BLE001 - any decoder failure means "skip this file"
                yield path, e, text

    def describe(self):
        if self.is_tar:
            return f'{len(self.urls)} tar shards of images'
        if self.table is not None:
            return self.table.describe()
        return f'{len(self.paths)} images'

    def stream_loader(self, image_size, batch_size, num_workers, seed, rank, world_size,
                      worker_init_fn=None, prefetch_factor=2, random_flip=False, epoch=0):
        """A loader of one rank's batches, for the kinds that split themselves across ranks
        and workers (all but path lists, which the sampler Lightning adds splits); the
        order of each epoch follows from `seed` and the epoch, counted from `epoch`."""
        if self.paths is not None:
            raise TypeError('a path list is split by its sampler; load it with make_loader')
        if self.is_tar:
            return make_tar_loader(self.urls, image_size, batch_size, num_workers, seed, rank,
                                   world_size, worker_init_fn, prefetch_factor, random_flip,
                                   epoch)
        return self.table.loader(image_size, batch_size, num_workers, seed, rank, world_size,
                                 worker_init_fn, prefetch_factor, random_flip, epoch)

    def bucket_loader(self, shapes, batch_size, num_workers, seed, rank, world_size,
                      random_crop=True, random_flip=False, worker_init_fn=None,
                      prefetch_factor=2, epoch=0):
        """stream_loader's batches on aspect-ratio buckets: `shapes`, the bucket table."""
        if self.is_tar:
            dataset = TarImages(self.urls, None, batch_size, seed, rank, world_size, random_flip,
                                epoch, shapes, random_crop)
            return batched_loader(dataset, num_workers, worker_init_fn, prefetch_factor)
        return self.table.bucket_loader(shapes, batch_size, num_workers, seed, rank, world_size,
                                        random_crop, random_flip, worker_init_fn,
                                        prefetch_factor, epoch)


def tar_images(url):
    """(key, PIL image or exception, caption) for each sample of one tar shard."""
    import webdataset as wds
    for sample in wds.tarfile_samples([{'url': url}], handler=wds.warn_and_continue):
        key = f'{url}:{sample["__key__"]}'
        ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
        text = captions.of_sample(sample)
        if ext is None:
            yield key, ValueError(f'no image among {sorted(k for k in sample if k[0] != "_")}'), \
                text
            continue
        try:
            yield key, load_image(io.BytesIO(sample[ext])), text
        except Exception as e:  # noqa: BLE001
            yield key, e, text


def transformed(items, image_size, fit=None):
    """(key, [3, S, S] tensor or None, caption) from (key, image or exception, caption),
    warning for bad ones; `fit(key, image)` makes the tensor instead where given (a
    bucketed cache's: bucketed.fit_to_bucket)."""
    transform = image_transform(image_size)
    for key, image, text in items:
        if isinstance(image, Exception):
            warn_skipped(key, image)
            yield key, None, text
        else:
            yield key, fit(key, image) if fit else transform(image), text


def split(items, index, count):
    """Every count-th item from the index-th: one rank's or one worker's share."""
    return itertools.islice(items, index, None, count)


class TarImages(data.IterableDataset):
    """Training images streamed from tar shards, batched in the workers.

    Every epoch the shard order is reshuffled (the same on every rank, from the seed and
    the epoch), then dealt out to ranks and, within a rank, to loader workers: each
    shard is read by one worker of one rank, so each image is seen once per epoch. The
    ranks' shares can differ in length; training ends every rank's epoch when the first
    one runs out (LightningDiffusion's even_epochs). With `shapes` (a bucket table), each
    worker batches its images by bucket as they come (tables.bucket_batches), and
    image_size goes unused.
    """

    def __init__(self, urls, image_size, batch_size, seed, rank, world_size, random_flip=False,
                 epoch=0, shapes=None, random_crop=True):
        super().__init__()
        import webdataset as wds
        from .images import collate_skipping_bad
        if shapes is None:
            batching = [wds.map(functools.partial(
                            decode_sample, transform=image_transform(image_size, random_flip))),
                        wds.batched(batch_size, collation_fn=collate_skipping_bad)]
        else:
            batching = [functools.partial(bucketed_samples, shapes=shapes, batch_size=batch_size,
                                          random_crop=random_crop, random_flip=random_flip)]
        self.pipeline = wds.DataPipeline(
            wds.SimpleShardList(urls),
            wds.detshuffle(bufsize=len(urls), initial=len(urls), seed=seed, epoch=epoch - 1),
            functools.partial(split, index=rank, count=world_size),
            wds.split_by_worker,
            wds.tarfile_to_samples(handler=wds.warn_and_continue),
            *batching,
        )

    def __iter__(self):
        return iter(self.pipeline)


def sample_key(sample):
    return f'{sample.get("__url__")}:{sample.get("__key__")}'


def image_file(sample):
    """The bytes of a tar sample's image file; None if it has none."""
    ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    return None if ext is None else sample[ext]


def decode_sample(sample, transform):
    """A tar sample -> (key, its image as a [3, S, S] tensor, or UNREADABLE with a warning,
    its caption or None)."""
    key, data = sample_key(sample), image_file(sample)
    text = captions.of_sample(sample)
    try:
        if data is None:
            raise ValueError('no image file in the sample')
        return key, transform(load_image(io.BytesIO(data))), text
    except Exception as e:  # noqa: BLE001
        warn_skipped(key, e)
        return key, UNREADABLE, text


def bucketed_samples(samples, shapes, batch_size, random_crop, random_flip):
    """Tar samples -> collated batches of one bucket each, as a table's rows
    (tables.bucket_batches: their image files as the cells; one with none is skipped as a
    row with no image)."""
    rows = ((sample_key(s), image_file(s), captions.of_sample(s), None) for s in samples)
    return bucket_batches(rows, shapes, batch_size, random_crop, random_flip)


def make_tar_loader(urls, image_size, batch_size, num_workers, seed, rank, world_size,
                    worker_init_fn=None, prefetch_factor=2, random_flip=False, epoch=0):
    """A loader of already batched tar images (batch_size=None: the workers batch)."""
    dataset = TarImages(urls, image_size, batch_size, seed, rank, world_size, random_flip, epoch)
    return batched_loader(dataset, num_workers, worker_init_fn, prefetch_factor)

"""Hugging Face datasets of images: a directory written by `save_to_disk`, or a dataset on
the hub (hf://OWNER/NAME) streamed with the datasets library, never downloaded whole.

A saved dataset is memory-mapped arrow, read in slices: an ImageTable (tables.py), split
exactly. A hub dataset's rows are not counted before they are read; its units are its
shards (one file on the hub each), dealt out to the ranks' loader workers as tar shards
are, so the ranks' shares can differ and training ends every rank's epoch when the first
runs out. Offline (HF_HUB_OFFLINE=1 or HF_DATASETS_OFFLINE=1) a hub dataset must be in the
datasets cache.
"""

import functools
import itertools
from pathlib import Path

import numpy as np
from torch.utils import data

from ..errors import UserError
from .images import batched_loader, image_transform
from .tables import (ImageTable, batches_of, bucket_batches, decoded, find_columns, rows_of,
                     shuffled, worker_slot)

HUB = 'hf://'
PIECE_ROWS = 1000  # rows of a saved dataset that the training split orders anew each epoch
READ_ROWS = 64  # rows taken from the files at a time


def is_saved_dataset(path):
    """A directory written by Dataset.save_to_disk or DatasetDict.save_to_disk."""
    path = Path(path)
    return (path / 'state.json').is_file() or (path / 'dataset_dict.json').is_file()


class SavedImages(ImageTable):
    """The images of a saved dataset (a split of it, if it holds several); keys are
    DIR:KEY (the key column) or DIR:ROW."""

    def __init__(self, path, split='train', image_column=None, unit_size=10_000,
                 caption_column=None):
        import datasets
        self.path = str(path)
        try:
            dataset = datasets.load_from_disk(self.path)
        except (OSError, ValueError) as e:
            raise UserError(f'{path} is not a readable saved dataset ({e}).') from None
        if isinstance(dataset, datasets.DatasetDict):
            if split not in dataset:
                raise UserError(f'{path} holds the splits {", ".join(dataset)}, not {split!r}; '
                                'pass one with --dataset-split.')
            dataset, self.split = dataset[split], split
        columns = find_columns(dataset.features.arrow_schema, image_column, path, caption_column)
        self.dataset = dataset.with_format('arrow', columns=columns.names())
        self.files = sorted(f['filename'] for f in dataset.cache_files)
        rows = [min(PIECE_ROWS, len(dataset) - start)
                for start in range(0, len(dataset), PIECE_ROWS)]
        super().__init__(columns, rows, unit_size, path)

    def read(self, piece, start, stop, sized=False):
        base = piece * PIECE_ROWS
        for first in range(base + start, base + stop, READ_ROWS):
            table = self.dataset[first:min(first + READ_ROWS, base + stop)]
            yield from rows_of(table, self.columns, first, self.path, sized)

    def describe(self):
        split = f', split {self.split}' if self.split else ''
        return f'{self.rows} rows of the dataset saved in {self.path}{split}'


def stream(name, split, spec):
    """load_dataset(streaming=True), its failures as one-line UserErrors."""
    import datasets
    try:
        return datasets.load_dataset(name, split=split, streaming=True)
    except ConnectionError as e:
        if datasets.config.HF_HUB_OFFLINE:
            raise UserError(f'{spec} is not cached on this machine, and the hub is offline '
                            '(HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set); load it once '
                            'online, or pass a directory written by save_to_disk.') from None
        raise UserError(f'cannot reach the Hugging Face hub for {spec} ({e}); check the '
                        'network, or pass a directory written by save_to_disk.') from None
    except datasets.exceptions.DatasetNotFoundError as e:
        raise UserError(f'{spec}: {e}') from None
    except ValueError as e:  # an unknown split: "Bad split: ... Available splits: [...]"
        raise UserError(f'{spec}: {e}; pass one of its splits with --dataset-split.') from None


class HubImages:
    """A hub dataset's images, streamed shard by shard; keys are hf://OWNER/NAME:SHARD:KEY
    (KEY the key column's, or the row's position in the shard)."""

    rows = None  # not known before the shards are read

    def __init__(self, spec, split='train', image_column=None, caption_column=None):
        import pyarrow as pa
        self.spec, self.split = spec, split
        name = spec[len(HUB):].strip('/')
        if name.count('/') != 1 or not all(name.split('/')):
            raise UserError(f'{spec}: a hub dataset is named hf://OWNER/NAME.')
        dataset = stream(name, split, spec).decode(False)  # images as bytes: ccld decodes
        if dataset.features is not None:
            schema = dataset.features.arrow_schema
        else:  # (features not declared: those of the first row)
            schema = pa.Table.from_pylist(list(dataset.take(1))).schema
        self.columns = find_columns(schema, image_column, spec, caption_column)
        self.dataset = dataset.select_columns(self.columns.names()).with_format('arrow')
        self.shards = dataset.num_shards

    def __len__(self):
        return self.shards

    def read(self, shard, sized=False):
        """(key, image cell, caption) of each row of a shard, and with `sized` its (width,
        height) as rows_of gives it. (Read with .iter: iterating the dataset itself in a
        loader worker would split the shard among the workers again.)"""
        first = 0
        for table in self.dataset.shard(num_shards=self.shards, index=shard).iter(READ_ROWS):
            yield from rows_of(table, self.columns, first, f'{self.spec}:{shard}', sized)
            first += table.num_rows

    def unit_rows(self, unit):
        return None

    def items(self, unit):
        for key, cell, text in self.read(unit):
            yield key, decoded(cell), text

    def loader(self, image_size, batch_size, num_workers, seed, rank, world_size,
               worker_init_fn=None, prefetch_factor=2, random_flip=False, epoch=0):
        dataset = HubShares(self, image_transform(image_size, random_flip), batch_size, seed,
                            rank, world_size, epoch)
        return batched_loader(dataset, num_workers, worker_init_fn, prefetch_factor)

    def bucket_loader(self, shapes, batch_size, num_workers, seed, rank, world_size,
                      random_crop=True, random_flip=False, worker_init_fn=None,
                      prefetch_factor=2, epoch=0):
        """The loader of one rank's batches on aspect-ratio buckets: `shapes`, the bucket
        table (buckets.bucket_table)."""
        dataset = HubBucketShares(self, shapes, batch_size, seed, rank, world_size, random_crop,
                                  random_flip, epoch)
        return batched_loader(dataset, num_workers, worker_init_fn, prefetch_factor)

    def describe(self):
        return f'{self.shards} shard(s) of the hub dataset {self.spec}, split {self.split}'


class HubShares(data.IterableDataset):
    """One rank's batches of a hub dataset. Each epoch the shards are put in a new order
    (the same on every rank) and dealt out in turn to the loader workers of every rank;
    with fewer shards than workers in all, each worker reads them all and keeps every
    n-th row, n the workers in all (as datasets' split_dataset_by_node does)."""

    def __init__(self, table, transform, batch_size, seed, rank, world_size, epoch=0):
        super().__init__()
        self.table, self.batch_size, self.seed = table, batch_size, seed % (1 << 64)
        self.rank, self.world_size, self.transform = rank, world_size, transform
        self.epoch = epoch - 1  # one up at each pass, in each worker: one pass per epoch

    def rows(self, sized=False):
        """This worker's rows of the next epoch, shuffled (with their sizes: `sized`)."""
        self.epoch += 1
        worker, workers = worker_slot()
        slot, slots = self.rank * workers + worker, self.world_size * workers
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.table)).tolist()
        read = functools.partial(self.table.read, sized=sized)
        if len(order) >= slots:
            rows = itertools.chain.from_iterable(map(read, order[slot::slots]))
        else:
            rows = itertools.islice(itertools.chain.from_iterable(map(read, order)),
                                    slot, None, slots)
        return shuffled(rows, np.random.default_rng([self.seed, self.epoch, slot]))

    def __iter__(self):
        return batches_of(self.rows(), self.batch_size, self.transform)


class HubBucketShares(HubShares):
    """One rank's batches of a hub dataset on aspect-ratio buckets: the shards dealt out
    as HubShares deals them, and each worker's rows batched by bucket as they come, their
    sizes from the width and height columns, else the image headers (tables.bucket_batches). The ranks' shares differ
    in length as without buckets (training ends every rank's epoch when one runs out), and
    every row is read once an epoch as without."""

    def __init__(self, table, shapes, batch_size, seed, rank, world_size, random_crop=True,
                 random_flip=False, epoch=0):
        super().__init__(table, None, batch_size, seed, rank, world_size, epoch)
        self.shapes, self.random_crop, self.random_flip = shapes, random_crop, random_flip

    def __iter__(self):
        return bucket_batches(self.rows(sized=True), self.shapes, self.batch_size,
                              self.random_crop, self.random_flip)

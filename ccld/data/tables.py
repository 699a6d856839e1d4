"""Images in the rows of a table: parquet files (img2dataset's --output_format parquet, the
hub's parquet shards) and Hugging Face datasets. What they share: which columns hold the
image and the key, how a row's image is decoded, and how rows are shared out.

A table whose rows are counted before it is read (parquet row groups, a dataset saved to
disk) is split exactly. Every epoch its pieces are put in a new order, the same on every
rank; the rows, laid end to end in that order, are cut into one equal share per rank, and
each share into runs of whole batches, one run per loader worker. So every row is read
once per epoch (all but the last rows % ranks of the order, a different few each epoch),
every rank runs the same number of batches, and each worker reads a few pieces whole.
On aspect-ratio buckets (BucketShares) each worker batches its run by bucket into as
many batches as it would make without.
"""

import functools
import itertools
import io
import json
from typing import NamedTuple

import numpy as np
from torch.utils import data

from . import buckets
from ..errors import UserError
from .bucketed import header_size, to_bucket
from .captions import CAPTION_COLUMNS, clean
from .images import (IMAGE_EXTENSIONS, UNREADABLE, MissingImage, batched_loader,
                     collate_skipping_bad, image_transform, load_image, warn_skipped)

KEY_COLUMNS = ('key', 'id', '__key__')  # img2dataset's, the usual one, webdataset's
SIZE_COLUMNS = ('width', 'height')  # img2dataset's: the size of the image it stored
# Binary columns taken for images by their name: img2dataset names its column after
# --encode_format (jpg by default).
IMAGE_NAMES = (*IMAGE_EXTENSIONS, 'image', 'img')
# A worker shuffles its rows in a buffer of at most this many rows and bytes of images.
SHUFFLE_ROWS = 1000
SHUFFLE_BYTES = 128 << 20


class Columns(NamedTuple):
    image: str
    key: str | None  # None: rows are keyed by their position
    caption: str | None = None  # None: the rows have no captions
    size: tuple | None = None  # (width, height) columns; None: sizes come from the images

    def names(self):
        return [self.image] + [c for c in (self.key, self.caption) if c] + list(self.size or ())


def holds_images(kind):
    """Whether an arrow type can hold images: bytes, or a datasets Image struct."""
    import pyarrow as pa
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return True
    return (pa.types.is_struct(kind) and kind.get_field_index('bytes') >= 0
            and holds_images(kind.field('bytes').type))


def declared_images(schema):
    """The columns that the datasets library's metadata in a schema declares as images."""
    try:
        features = json.loads(schema.metadata[b'huggingface'])['info']['features']
        return [name for name, f in features.items() if f.get('_type') == 'Image']
    except (TypeError, KeyError, ValueError, AttributeError):
        return []


def holds_text(kind):
    import pyarrow as pa
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def find_size_columns(schema):
    """SIZE_COLUMNS if the schema has both, of integers; else None."""
    import pyarrow as pa
    if all(n in schema.names and pa.types.is_integer(schema.field(n).type)
           for n in SIZE_COLUMNS):
        return SIZE_COLUMNS
    return None


def find_caption_column(schema, caption_column, where):
    """`caption_column`, checked to hold text, or (None given) the first text column named
    in captions.CAPTION_COLUMNS; None when there is none."""
    names = schema.names
    if caption_column is None:
        return next((n for n in CAPTION_COLUMNS
                     if n in names and holds_text(schema.field(n).type)), None)
    if caption_column not in names:
        raise UserError(f'{where} has no column {caption_column!r} (its columns: '
                        f'{", ".join(names)}); pass one of them to --caption-column.')
    if not holds_text(schema.field(caption_column).type):
        raise UserError(f'column {caption_column!r} of {where} holds '
                        f'{schema.field(caption_column).type}, not text; pass the column of '
                        'captions to --caption-column.')
    return caption_column


def find_columns(schema, image_column, where, caption_column=None):
    """The image column (`image_column`, or the one the schema shows), the key column and
    the caption column (`caption_column`, or found by find_caption_column).

    Without `image_column`: a binary column named after an image format (img2dataset's
    `jpg`), else a datasets Image column, else any struct of image bytes. UserError, naming
    `where` and its columns, when there is none or `image_column` holds no images.
    """
    names = schema.names
    listed = ', '.join(names)
    if image_column is None:
        images = [n for n in names if holds_images(schema.field(n).type)]
        named = [n for n in images if n in IMAGE_NAMES and not schema.field(n).type.num_fields]
        structs = [n for n in images if schema.field(n).type.num_fields]
        declared = [n for n in declared_images(schema) if n in images]
        image_column = next(iter(named + declared + structs), None)
        if image_column is None:
            raise UserError(f'{where} has no column of images that ccld recognises (its columns: '
                            f'{listed}); name the one that holds the image bytes with '
                            '--image-column.')
    elif image_column not in names:
        raise UserError(f'{where} has no column {image_column!r} (its columns: {listed}); pass '
                        'one of them to --image-column.')
    elif not holds_images(schema.field(image_column).type):
        raise UserError(f'column {image_column!r} of {where} holds '
                        f'{schema.field(image_column).type}, not image bytes; pass the column '
                        'of images to --image-column.')
    key = next((k for k in KEY_COLUMNS if k in names and k != image_column), None)
    return Columns(image_column, key, find_caption_column(schema, caption_column, where),
                   find_size_columns(schema))


def image_of(cell):
    """A row's image: its bytes, or a datasets Image struct of bytes or a path, decoded as
    image files are. MissingImage for an empty cell."""
    if isinstance(cell, dict):
        if cell.get('bytes') is None:
            if not cell.get('path'):
                raise MissingImage()
            if '://' not in cell['path']:
                return load_image(cell['path'])
            import fsspec  # a hub dataset's files (hf://..., zip://...::hf://...)
            with fsspec.open(cell['path'], 'rb') as f:
                return load_image(f)
        cell = cell['bytes']
    if cell is None:
        raise MissingImage()
    return load_image(io.BytesIO(cell))


def decoded(cell):
    """image_of(cell), or the exception that made it unreadable (what Source.items yields)."""
    try:
        return image_of(cell)
    except Exception as e:  # noqa: BLE001 - any decoder failure means "skip this row"
        return e


def cell_bytes(cell):
    if isinstance(cell, dict):
        cell = cell.get('bytes')
    return len(cell) if cell is not None else 0


def rows_of(table, columns, first, prefix, sized=False):
    """(key, image cell, caption or None) of each row of an arrow table or batch whose
    first row is the `first`-th of its file or dataset; keys are `prefix:KEY`, KEY the key
    column's value or the row's position. With `sized`, each row has its (width, height)
    from the size columns appended (None without them, or where they are empty)."""
    cells = table.column(columns.image).to_pylist()
    keys = (table.column(columns.key).to_pylist() if columns.key
            else range(first, first + len(cells)))
    texts = (map(clean, table.column(columns.caption).to_pylist()) if columns.caption
             else [None] * len(cells))
    rows = [(f'{prefix}:{key}', cell, text) for key, cell, text in zip(keys, cells, texts)]
    if not sized:
        return rows
    sizes = (zip(*(table.column(c).to_pylist() for c in columns.size)) if columns.size
             else [(None, None)] * len(rows))
    return [(*row, (w, h) if w and h else None) for row, (w, h) in zip(rows, sizes)]


def header_of(cell):
    """The (width, height) of a row's image from its header alone (no decode); None where
    it cannot be read so (the row is then skipped when decoded; an image at a remote path
    is cut from the squarest bucket)."""
    if isinstance(cell, dict):
        cell = cell.get('bytes') if cell.get('bytes') is not None else cell.get('path')
    if isinstance(cell, bytes):
        cell = io.BytesIO(cell)
    return header_size(cell) if cell else None


def shuffled(rows, rng, max_rows=SHUFFLE_ROWS, max_bytes=SHUFFLE_BYTES):
    """`rows` in a random order, drawn from a buffer of at most max_rows rows and max_bytes
    of image bytes, so that memory stays bounded however long the stream."""
    buffer, held = [], 0
    for row in rows:
        buffer.append(row)
        held += cell_bytes(row[1])
        while len(buffer) >= max_rows or held > max_bytes:
            i = rng.integers(len(buffer))
            buffer[i], buffer[-1] = buffer[-1], buffer[i]
            out = buffer.pop()
            held -= cell_bytes(out[1])
            yield out
    rng.shuffle(buffer)
    yield from buffer


def collated(rows, transform):
    """One batch of (key, image cell, caption) rows; an unreadable image is counted in the
    batch's 'skipped', with a warning."""
    batch = []
    for key, cell, text in rows:
        try:
            batch.append((key, transform(image_of(cell)), text))
        except Exception as e:  # noqa: BLE001
            warn_skipped(key, e)
            batch.append((key, UNREADABLE, text))
    return collate_skipping_bad(batch)


def batches_of(rows, batch_size, transform):
    """Collated batches of (key, image cell, caption) rows."""
    rows = iter(rows)
    while chunk := list(itertools.islice(rows, batch_size)):
        yield collated(chunk, transform)


def bucket_batches(rows, shapes, batch_size, random_crop=True, random_flip=False):
    """Collated batches of one bucket each of (key, image cell, caption, (width, height) or
    None) rows, by buckets.as_filled: a row without a size is put by its image header's
    (header_of), one whose header cannot be read with the squares (it is skipped when
    decoded). Each batch's images are resized to cover its bucket and cropped (to_bucket)
    only once it is full, so a worker holds at most batch_size - 1 rows a bucket undecoded."""
    square = buckets.assign(1, 1, shapes)

    def bucket_of(cell, size):
        size = size or header_of(cell)
        return square if size is None else buckets.assign(*size, shapes)

    pairs = (((key, cell, text), bucket_of(cell, size)) for key, cell, text, size in rows)
    for batch in buckets.as_filled(pairs, batch_size):
        transform = functools.partial(to_bucket, size=shapes[batch[0][1]],
                                      random_crop=random_crop, random_flip=random_flip)
        yield collated([row for row, _ in batch], transform)


def worker_slot():
    """(this loader worker's index, the number of workers); (0, 1) in the main process."""
    info = data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def pack(sizes, limit):
    """Consecutive indices of `sizes` in runs of at most `limit` in total (a larger one
    makes a run alone)."""
    runs, run, total = [], [], 0
    for i, size in enumerate(sizes):
        if run and total + size > limit:
            runs.append(run)
            run, total = [], 0
        run.append(i)
        total += size
    return runs + [run] if run else runs


class ImageTable:
    """Rows in pieces of known length, each read on its own (a parquet row group, a slice of
    a saved dataset). The units, which a latent cache makes one part of each, are runs of
    whole pieces of about unit_size rows. Subclasses read the pieces and describe the set."""

    split = None

    def __init__(self, columns, piece_rows, unit_size, where):
        self.columns, self.piece_rows = columns, list(piece_rows)
        self.rows = sum(self.piece_rows)
        if not self.rows:
            raise UserError(f'{where} has no rows.')
        self.units = pack(self.piece_rows, unit_size)

    def read(self, piece, start, stop, sized=False):
        """(key, image cell, caption) of rows start to stop of a piece (`sized`: rows_of's)."""
        raise NotImplementedError

    def __len__(self):
        return len(self.units)

    def unit_rows(self, unit):
        return sum(self.piece_rows[p] for p in self.units[unit])

    def items(self, unit):
        """(key, PIL image or the exception that made it unreadable, caption) of a unit, in
        order."""
        for piece in self.units[unit]:
            for key, cell, text in self.read(piece, 0, self.piece_rows[piece]):
                yield key, decoded(cell), text

    def rows_between(self, order, start, stop, sized=False):
        """The rows at positions start to stop of the pieces laid end to end in `order`."""
        offset = 0
        for piece in order:
            rows = self.piece_rows[piece]
            if offset < stop and offset + rows > start:
                yield from self.read(piece, max(start - offset, 0), min(stop - offset, rows),
                                     sized)
            offset += rows
            if offset >= stop:
                return

    def check_shares(self, world_size):
        if self.rows < world_size:
            raise UserError(f'{self.describe()} cannot be shared out to {world_size} '
                            'processes, fewer rows than processes.')

    def loader(self, image_size, batch_size, num_workers, seed, rank, world_size,
               worker_init_fn=None, prefetch_factor=2, random_flip=False, epoch=0):
        self.check_shares(world_size)
        dataset = RowShares(self, image_transform(image_size, random_flip), batch_size, seed,
                            rank, world_size, epoch)
        return batched_loader(dataset, num_workers, worker_init_fn, prefetch_factor)

    def bucket_loader(self, shapes, batch_size, num_workers, seed, rank, world_size,
                      random_crop=True, random_flip=False, worker_init_fn=None,
                      prefetch_factor=2, epoch=0):
        """The loader of one rank's batches on aspect-ratio buckets: `shapes`, the bucket
        table (buckets.bucket_table)."""
        self.check_shares(world_size)
        dataset = BucketShares(self, shapes, batch_size, seed, rank, world_size, random_crop,
                               random_flip, epoch)
        return batched_loader(dataset, num_workers, worker_init_fn, prefetch_factor)


class RowShares(data.IterableDataset):
    """One rank's batches of an ImageTable, split as the module docstring says."""

    def __init__(self, table, transform, batch_size, seed, rank, world_size, epoch=0):
        super().__init__()
        self.table, self.batch_size, self.seed = table, batch_size, seed % (1 << 64)
        self.rank, self.world_size, self.transform = rank, world_size, transform
        self.epoch = epoch - 1  # one up at each pass, in each worker: one pass per epoch

    def rows(self, sized=False):
        """This worker's rows of the next epoch, shuffled: a run of whole batches of the
        rank's share (the last worker's may end in a short one)."""
        self.epoch += 1
        worker, workers = worker_slot()
        share = self.table.rows // self.world_size
        batches = -(-share // self.batch_size)
        first, last = batches * worker // workers, batches * (worker + 1) // workers
        start = self.rank * share + first * self.batch_size
        stop = self.rank * share + min(last * self.batch_size, share)
        order = np.random.default_rng([self.seed, self.epoch]).permutation(
            len(self.table.piece_rows)).tolist()
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker])
        return shuffled(self.table.rows_between(order, start, stop, sized), rng)

    def __iter__(self):
        return batches_of(self.rows(), self.batch_size, self.transform)


class BucketShares(RowShares):
    """One rank's batches of an ImageTable on aspect-ratio buckets (buckets.py): the rows
    split as RowShares splits them, each put in the bucket its size (the size columns',
    else its image header's) is nearest, and batched by buckets.as_filled. A worker's run
    of n rows makes ceil(n / batch_size) batches whatever their buckets, so every rank runs
    as many batches as without buckets, and every row is read once an epoch as without."""

    def __init__(self, table, shapes, batch_size, seed, rank, world_size, random_crop=True,
                 random_flip=False, epoch=0):
        super().__init__(table, None, batch_size, seed, rank, world_size, epoch)
        self.shapes, self.random_crop, self.random_flip = shapes, random_crop, random_flip

    def __iter__(self):
        return bucket_batches(self.rows(sized=True), self.shapes, self.batch_size,
                              self.random_crop, self.random_flip)

"""Parquet files of images, one row each: img2dataset's --output_format parquet (the image
bytes in a `jpg` column, with key, caption, width, height...), or the parquet shards of a
Hugging Face dataset (a datasets Image struct of bytes and path). Given as one file, a
directory (every .parquet file under it) or a glob.

Only the files' footers are read up front, for the schema and the row groups; rows are
streamed a row group at a time with pyarrow. The row groups are the pieces that the
training split orders and shares out (see tables.py).
"""

import functools
import glob
from pathlib import Path

from ..errors import UserError
from .tables import ImageTable, find_columns, rows_of

READ_ROWS = 64  # rows decoded from the file at a time


def has_parquet_files(directory):
    return next(Path(directory).rglob('*.parquet'), None) is not None


def parquet_files(spec):
    """The files a spec names, sorted: one file, every .parquet under a directory, or a glob."""
    path = Path(spec)
    if path.is_dir():
        files = sorted(path.rglob('*.parquet'))
    elif glob.has_magic(spec):
        files = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
    elif path.is_file():
        files = [path]
    else:
        raise UserError(f'{spec} does not exist.')
    if not files:
        raise UserError(f'no .parquet files {"under" if path.is_dir() else "match"} {spec}.')
    return [str(f) for f in files]


@functools.lru_cache(maxsize=4)
def open_file(path):
    """A file's reader, kept open for the next row group (in each loader worker)."""
    import pyarrow.parquet as pq
    return pq.ParquetFile(path)


class ParquetImages(ImageTable):
    """The images of parquet files; keys are FILE:KEY (the key column) or FILE:ROW."""

    def __init__(self, spec, image_column=None, unit_size=10_000, caption_column=None):
        import pyarrow as pa
        self.spec, self.files = spec, parquet_files(spec)
        self.pieces, rows = [], []  # (file, row group, its first row in the file), its rows
        columns = None
        for path in self.files:
            try:
                reader = open_file(path)
            except (OSError, pa.ArrowException) as e:
                raise UserError(f'{path} is not a readable parquet file ({e}).') from None
            found = find_columns(reader.schema_arrow, columns.image if columns else image_column,
                                 path, columns.caption if columns else caption_column)
            if columns is not None and found.key != columns.key:
                raise UserError(f'{path} keys its rows by {found.key or "position"}, '
                                f'{self.files[0]} by {columns.key or "position"}; pass files '
                                'of one data set.')
            # (sizes are read from the columns only if every file has them)
            columns = found if columns is None else columns._replace(
                size=columns.size and found.size)
            first = 0
            for group in range(reader.metadata.num_row_groups):
                self.pieces.append((path, group, first))
                rows.append(reader.metadata.row_group(group).num_rows)
                first += rows[-1]
        open_file.cache_clear()  # loader workers open their own
        super().__init__(columns, rows, unit_size, spec)

    def read(self, piece, start, stop, sized=False):
        path, group, first = self.pieces[piece]
        offset = 0
        for batch in open_file(path).iter_batches(batch_size=READ_ROWS, row_groups=[group],
                                                  columns=self.columns.names(),
                                                  use_threads=False):
            lo, hi = max(start - offset, 0), min(stop - offset, batch.num_rows)
            if lo < hi:
                yield from rows_of(batch.slice(lo, hi - lo), self.columns, first + offset + lo,
                                   path, sized)
            offset += batch.num_rows
            if offset >= stop:
                return

    def describe(self):
        return f'{self.rows} rows of {len(self.files)} parquet file(s) ({self.spec})'

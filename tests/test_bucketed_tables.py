"""Training parquet files and saved datasets on aspect-ratio buckets (BucketShares in
ccld/data/tables.py, buckets.as_filled), through the loader the run builds from its flags,
and two real processes. At 128 px, --max-aspect 3, the buckets are 64x192, 128x128 and
192x64 (test_bucketed.py)."""

import io
import math
import random

import pytest
from PIL import Image

import tiny
from ccld.data import buckets
from test_bucketed import loader, models, train_two_ranks  # noqa: F401 - models: a fixture

TALL, SQUARE, WIDE = (64, 192), (128, 128), (192, 64)


def png(size):
    data = io.BytesIO()
    Image.new('RGB', size, (128, 128, 128)).save(data, 'PNG')
    return data.getvalue()


def shape_of(bucket):
    return (3, bucket[1], bucket[0])


@pytest.mark.parametrize('n, batch_size', [(23, 4), (24, 4), (3, 4), (0, 4), (17, 1)])
def test_a_stream_of_n_items_makes_ceil_n_over_batch_batches_whatever_their_buckets(
        n, batch_size):
    rng = random.Random(n)
    bucket_of = [rng.choice([0, 0, 1, 2, 2, 4]) for _ in range(n)]
    batches = list(buckets.as_filled(enumerate(bucket_of), batch_size))
    assert len(batches) == math.ceil(n / batch_size)
    assert sorted(item for batch in batches for item, _ in batch) == list(range(n))
    assert all(len(b) == batch_size for b in batches[:-1])
    for batch in batches:
        assert len({bucket for _, bucket in batch}) == 1
        own = [bucket_of[item] for item, _ in batch]
        assert own.count(batch[0][1]) == max(map(own.count, own))  # the bucket of most
    # Leftovers, fewer than a batch per bucket, are all that is moved to another bucket.
    moved = sum(b != bucket_of[item] for batch in batches for item, b in batch)
    assert moved <= len(set(bucket_of)) * (batch_size - 1)


def test_two_ranks_train_a_parquet_set_on_buckets_with_equal_batches_and_each_row_once(
        models, tmp_path):  # noqa: F811
    """13 rows of img2dataset parquet (files of 5, row groups of 2): 6 square, 4 tall, 3
    wide, none a multiple of the ranks' batches. 2 ranks: shares of 6 rows (one row of
    the epoch's order left out), 3 batches of 2 each an epoch, read by 2 loader workers."""
    sizes = [(100, 100)] * 6 + [(50, 150)] * 4 + [(150, 50)] * 3
    random.Random(0).shuffle(sizes)
    train_set = tiny.write_img2dataset_parquet([png(s) for s in sizes], tmp_path / 'set', 5, 2,
                                               sizes)
    bucket = {f'{i:09}': SQUARE if w == h else TALL if w < h else WIDE
              for i, (w, h) in enumerate(sizes)}
    _, seen = train_two_ranks(models, train_set, tmp_path, '--max-aspect', '3',
                              '--max-steps', '6', '--num-workers', '2')
    for epoch in (0, 1):
        assert [sum(e == epoch for e, _, _ in s) for s in seen] == [3, 3]
        keys = [k.rpartition(':')[2] for s in seen for e, batch, _ in s if e == epoch
                for k in batch]
        assert len(keys) == len(set(keys)) == 12
    for _, batch, shape in (step for s in seen for step in s):
        own = [bucket[k.rpartition(':')[2]] for k in batch]
        assert shape[0] == 2 and 2 * sum(shape[1:] == shape_of(b) for b in own) >= len(own)


def test_width_and_height_columns_choose_the_bucket_and_headers_do_without_them(
        models, tmp_path):  # noqa: F811
    """Square pictures whose width and height columns say 150x50 go to the wide bucket
    (the columns are read, not the images); a datasets parquet file without the columns
    is bucketed by its images' headers."""
    train_set = tiny.write_img2dataset_parquet([png((100, 100))] * 2, tmp_path / 'i2d', 2, 2,
                                               [(150, 50)] * 2)
    assert next(iter(loader(models, train_set, tmp_path, '--max-aspect', '3')))['images'] \
        .shape[1:] == shape_of(WIDE)
    table = tiny.write_datasets_parquet([png((50, 150))] * 2, tmp_path / 'hf.parquet')
    assert next(iter(loader(models, table, tmp_path, '--max-aspect', '3')))['images'] \
        .shape[1:] == shape_of(TALL)


def test_each_row_of_a_saved_dataset_goes_to_its_nearest_buckets_batches(models, tmp_path):  # noqa: F811
    """A saved dataset without size columns, sizes read from the headers. The nearest
    bucket worked out by hand in log aspect: 3:1 and 1:1 meet at sqrt(3) = 1.732, so
    175x100 is wide and 170x100 square (a linear midpoint, 2, would make both square);
    10:1 is clamped to the widest. Each bucket holds an even number: no catch-all batch."""
    import datasets
    expected = {(100, 100): SQUARE, (120, 100): SQUARE, (160, 100): SQUARE, (100, 160): SQUARE,
                (170, 100): SQUARE, (100, 170): SQUARE, (175, 100): WIDE, (180, 100): WIDE,
                (300, 100): WIDE, (1000, 100): WIDE, (100, 180): TALL, (100, 300): TALL}
    sizes = list(expected)
    datasets.Dataset.from_dict(
        {'image': [{'bytes': png(s), 'path': None} for s in sizes],
         'id': [f'{w}x{h}' for w, h in sizes]},
        features=datasets.Features({'image': datasets.Image(), 'id': datasets.Value('string')}),
    ).save_to_disk(str(tmp_path / 'saved'))
    seen = 0
    for batch in loader(models, tmp_path / 'saved', tmp_path, '--max-aspect', '3'):
        for key in batch['keys']:
            w, h = map(int, key.rpartition(':')[2].split('x'))
            assert batch['images'].shape[1:] == shape_of(expected[w, h]), key
            seen += 1
    assert seen == len(sizes)

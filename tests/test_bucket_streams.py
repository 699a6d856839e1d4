"""Streamed sources on aspect-ratio buckets (TarImages and HubBucketShares, batched by
tables.bucket_batches as their images come): tar shards through the loader the run
builds from its flags, two ranks of two workers over tar shards and over a hub dataset
(stood in for by local parquet files, as test_hf_datasets's), and two processes."""

import collections

import pytest
import torch
from PIL import Image

import tiny
from ccld.data.buckets import bucket_table
from ccld.data.sources import Source
from test_bucketed import edged, loader, models, train_two_ranks  # noqa: F401 - models: a fixture
from test_latent_cache import write_tar_shards

TABLE = bucket_table(128, 64, 3.0)  # (64, 192), (128, 128), (192, 64): by hand as in
#                                     test_bucketed's two-rank test
SIZES = {(50, 150): (64, 192), (100, 100): (128, 128), (150, 50): (192, 64)}  # -> bucket


@pytest.mark.parametrize('flip', [False, True])
def test_a_wide_images_edges_in_tar_shards_both_reach_the_batch(models, tmp_path,  # noqa: F811
                                                                flip):
    """As test_bucketed's for a path list: 3:1 pictures in tar shards (JPEG, so the
    colours are near, not exact) go to the 192x64 bucket with both painted edges; with
    --random-flip some of the 16 are mirrored (all or none: 1 in 2^15)."""
    paths = [edged(tmp_path / f'{i}.png', (300, 100)) for i in range(16)]
    shards = write_tar_shards(paths, tmp_path / 'shards', per_shard=8)
    batches = list(loader(models, shards, tmp_path, '--max-aspect', '3', '--batch-size', '4',
                          *['--random-flip'] * flip))
    assert [b['images'].shape for b in batches] == [(4, 3, 64, 192)] * 4
    images = torch.cat([b['images'] for b in batches])
    red, blue = torch.tensor([1., 0, 0])[:, None], torch.tensor([0., 0, 1])[:, None]
    left, right = images[:, :, :, 0], images[:, :, :, -1]

    def near(edge, colour):
        return (edge - colour).abs().amax((1, 2)) < 0.1
    mirrored = near(left, blue) & near(right, red)
    assert (mirrored | near(left, red) & near(right, blue)).all()
    assert 0 < mirrored.sum() < 16 if flip else not mirrored.any()


@pytest.mark.parametrize('crop', ['center', 'random'])
def test_bucket_crop_chooses_where_tar_images_are_cut(models, tmp_path, crop):  # noqa: F811
    """A 2:1 top-to-bottom ramp at --max-aspect 4 goes to 192x64, resized to 192x96 to
    cover it: --bucket-crop center cuts the same 32 rows from each copy, random others."""
    ramp = Image.linear_gradient('L').resize((200, 100)).convert('RGB')
    ramp.save(tmp_path / 'ramp.png')
    shards = write_tar_shards([tmp_path / 'ramp.png'] * 8, tmp_path / 'shards', per_shard=8)
    images = torch.cat([b['images'] for b in loader(models, shards, tmp_path, '--max-aspect',
                                                     '4', '--bucket-crop', crop)])
    assert images.shape == (8, 3, 64, 192)
    columns = {tuple(image[0, :, 96].tolist()) for image in images}
    assert (len(columns) == 1) == (crop == 'center')


def stream_epochs(source, rank, epochs=2):
    """[(keys, shape, skipped) of each batch] of each epoch of a rank's bucketed loader of
    2 workers, of 2 ranks, in batches of 3."""
    stream = source.bucket_loader(TABLE, 3, 2, seed=1, rank=rank, world_size=2)
    return [[(b['keys'], tuple(b['images'].shape), b['skipped']) for b in stream]
            for _ in range(epochs)]


def shape_of(i):
    """The picture size of image i of a set: of each 5, 2 tall, 2 square and 1 wide."""
    return list(SIZES)[i * 7 % 5 % 3]


def check_bucketed_epochs(seen, readable):
    """Every readable image (by its number, the end of its key) in one batch of one rank
    an epoch, each batch of the shape of the bucket most of its images belong to. A
    worker's batches hold images of one bucket each, but for its catch-all batches, what
    waits in its buffers at the end of its stream (fewer than 3 a bucket: 2 batches at
    most), the last of them the only short one: so per rank of 2 workers at most 4 mixed
    and 2 short batches."""
    for epoch in range(len(seen[0])):
        numbers = [int(k[-9:]) for rank in seen for keys, _, _ in rank[epoch] for k in keys]
        assert sorted(numbers) == sorted(readable)
        for rank in seen:
            mixed = short = 0
            for keys, shape, skipped in rank[epoch]:
                own = collections.Counter(SIZES[shape_of(int(k[-9:]))] for k in keys)
                bucket = shape[3], shape[2]
                assert shape[0] == len(keys) and own[bucket] == max(own.values())
                mixed += own[bucket] < len(keys)
                short += len(keys) + skipped < 3
            assert mixed <= 4 and short <= 2 and len(rank[epoch]) >= 8


@pytest.mark.filterwarnings('ignore:skipping')
def test_two_ranks_of_tar_shards_see_each_image_once_an_epoch_in_one_bucket_batches(tmp_path):
    """60 images of three shapes in 12 shards of 5, over 2 ranks x 2 workers: each worker
    batches its shards' images by bucket; every image once an epoch, over both ranks."""
    paths = [edged(tmp_path / f'{i}.png', shape_of(i)) for i in range(60)]
    shards = write_tar_shards(paths, tmp_path / 'shards', per_shard=5)
    seen = [stream_epochs(Source(str(shards)), rank) for rank in (0, 1)]
    check_bucketed_epochs(seen, range(60))
    orders = [[k for keys, _, _ in seen[0][epoch] for k in keys] for epoch in (0, 1)]
    assert orders[0] != orders[1]  # the shards are dealt anew each epoch


@pytest.mark.filterwarnings('ignore:skipping')
@pytest.mark.parametrize('files', [4, 1])
def test_a_hub_dataset_streams_bucketed_batches_each_row_once_an_epoch(
        models, tmp_path, monkeypatch, files):  # noqa: F811
    """48 rows of three shapes (img2dataset's, with width and height columns), row 4
    corrupt, as 4 shards or 1 (then each worker reads it all and keeps every 4th row):
    every readable row once an epoch over 2 ranks x 2 workers, in batches of one bucket;
    the corrupt one counted as skipped. The run's flags make such a loader too."""
    cells = [edged(tmp_path / f'{i}.png', shape_of(i)).read_bytes() for i in range(48)]
    cells[4] = b'not an image'
    name = tiny.stream_as_hub(monkeypatch, cells, tmp_path / 'hub', 48 // files,
                              [shape_of(i) for i in range(48)])
    seen = [stream_epochs(Source(name), rank) for rank in (0, 1)]
    check_bucketed_epochs(seen, [i for i in range(48) if i != 4])
    for epoch in (0, 1):
        assert sum(n for rank in seen for _, _, n in rank[epoch]) == 1
    shape = next(iter(loader(models, name, tmp_path, '--max-aspect', '3')))['images'].shape
    assert (shape[3], shape[2]) in TABLE


def test_two_processes_on_uneven_tar_shards_end_each_epoch_together(models, tmp_path):  # noqa: F811
    """3 shards of 4 images (2 tall, 1 square, 1 wide) on 2 ranks: one rank reads 2 shards
    an epoch, the other 1. In batches of 2 a shard gives a tall batch and a catch-all of
    the other two (square: the first of the most), so the ranks have 4 and 2 batches; both
    end the epoch after 2 (no rank waits for the other in a collective), the images of
    each epoch seen at most once. Two epochs: 4 steps."""
    shapes = [(50, 150), (50, 150), (100, 100), (150, 50)] * 3
    paths = [edged(tmp_path / f'{i}.png', s) for i, s in enumerate(shapes)]
    shards = write_tar_shards(paths, tmp_path / 'shards', per_shard=4)
    _, seen = train_two_ranks(models, shards, tmp_path, '--max-aspect', '3', '--max-steps', '4')
    for epoch in (0, 1):
        assert [sum(e == epoch for e, _, _ in s) for s in seen] == [2, 2]
        keys = [k for s in seen for e, batch, _ in s if e == epoch for k in batch]
        assert len(keys) == len(set(keys)) == 8
    assert {shape for s in seen for _, _, shape in s} == {(2, 3, 192, 64), (2, 3, 128, 128)}

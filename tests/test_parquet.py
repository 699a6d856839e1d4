"""Parquet files of images as training input (ccld.data.parquet, and the row split of
ccld.data.tables), on files written here with pyarrow in img2dataset's schema and in the
datasets library's."""

import io
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import precompute_latents
import tiny
from ccld.data.images import image_transform
from ccld.data.sources import Source

SIZE = 32


def png(width, height, seed):
    """Random pixels, so that two images (or a squashed and a cropped one) differ."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    data = io.BytesIO()
    Image.fromarray(pixels).save(data, 'PNG')
    return data.getvalue()


@pytest.fixture(scope='module')
def sets(tmp_path_factory):
    """14 rows in img2dataset's schema, in files of 5 rows of row groups of 2: 12 images
    (one of them 48x32), a corrupt image (row 5) and a failed download (row 11)."""
    d = tmp_path_factory.mktemp('parquet')
    cells = [png(48, 32, 0)] + [png(32, 32, i) for i in range(1, 14)]
    cells[5], cells[11] = b'\xff\xd8 not a jpeg', None
    return SimpleNamespace(dir=d, cells=cells,
                           img2dataset=tiny.write_img2dataset_parquet(cells, d / 'i2d', 5, 2))


def picture(cell):
    return np.asarray(Image.open(io.BytesIO(cell)).convert('RGB'))


def test_img2dataset_parquet_rows_are_its_images_keyed_by_the_key_column(sets):
    source = Source(str(sets.img2dataset), unit_size=4)
    assert (source.image_column, source.table.columns.key) == ('jpg', 'key')
    assert source.known_images == 14 and source.describe().startswith('14 rows of 3 parquet')
    # Units are runs of whole row groups of at most 4 rows; files of 5 rows end in a group
    # of 1, so the groups are 2 2 1 | 2 2 1 | 2 2, and the runs 2+2, 1+2, 2+1, 2+2.
    assert [source.unit_size_of(u) for u in range(len(source))] == [4, 3, 3, 4]
    items = [item for unit in range(len(source)) for item in source.items(unit)]
    files = sorted(sets.img2dataset.glob('*.parquet'))
    assert [key for key, *_ in items] == [f'{files[i // 5]}:{i:09}' for i in range(14)]
    for i, (_, image, _) in enumerate(items):
        if i in (5, 11):
            assert isinstance(image, Exception)
        else:
            np.testing.assert_array_equal(np.asarray(image), picture(sets.cells[i]))
    # A glob and a single file name the same rows.
    assert Source(str(sets.img2dataset / '0000[01].parquet')).known_images == 10
    assert Source(str(files[2])).known_images == 4


def test_a_datasets_image_column_is_found_and_rows_are_keyed_by_position(sets, tmp_path):
    table = tiny.write_datasets_parquet(sets.cells[:4], tmp_path / 'train.parquet')
    source = Source(str(table))
    assert (source.image_column, source.table.columns.key) == ('image', None)
    items = [item for unit in range(len(source)) for item in source.items(unit)]
    assert [key for key, *_ in items] == [f'{table}:{i}' for i in range(4)]
    np.testing.assert_array_equal(np.asarray(items[0][1]), picture(sets.cells[0]))


def test_a_keyless_row_group_of_more_rows_than_a_read_keys_each_row_by_its_position(sets,
                                                                                tmp_path):
    """70 rows in one row group, read 64 at a time: keys FILE:0 to FILE:69, all distinct,
    whether the group is read whole or from row 66 (as a rank's share may start)."""
    table = tiny.write_datasets_parquet([sets.cells[1]] * 70, tmp_path / 'long.parquet',
                                        row_group_size=70)
    source = Source(str(table))
    assert source.table.piece_rows == [70]
    keys = [key for unit in range(len(source)) for key, *_ in source.items(unit)]
    assert keys == [f'{table}:{i}' for i in range(70)]
    assert [key for key, *_ in source.table.read(0, 66, 70)] == \
        [f'{table}:{i}' for i in range(66, 70)]


def shares(source, world_size, epochs, batch_size=4, workers=2):
    return tiny.rank_shares(source, SIZE, world_size, epochs, batch_size, workers)


@pytest.mark.filterwarnings('ignore:skipping')
def test_two_ranks_of_two_workers_read_every_row_once_per_epoch_in_equal_batches(sets):
    """14 rows over 2 ranks: 7 each, 2 batches of 4 (the last of 3), one per worker. Every
    row is read once an epoch (the two bad ones counted as skipped), in a new order."""
    source = Source(str(sets.img2dataset))
    seen = shares(source, world_size=2, epochs=2)
    assert [[len(keys) + skipped for _, keys, skipped in seen[r]] for r in (0, 1)] == \
        [[4, 3, 4, 3]] * 2
    orders = []
    for epoch in (0, 1):
        keys = [k for r in (0, 1) for e, batch, _ in seen[r] if e == epoch for k in batch]
        assert sorted(k.rpartition(':')[2] for k in keys) == \
            [f'{i:09}' for i in range(14) if i not in (5, 11)]
        assert sum(n for r in (0, 1) for e, _, n in seen[r] if e == epoch) == 2
        orders.append(keys)
    assert orders[0] != orders[1]
    # The images are the rows' images, resized and cropped as image files are.
    batch = next(iter(source.stream_loader(SIZE, 14, 0, seed=3, rank=0, world_size=1)))
    first = batch['keys'].index(f'{sorted(sets.img2dataset.glob("*.parquet"))[0]}:{0:09}')
    expected = image_transform(SIZE)(Image.open(io.BytesIO(sets.cells[0])).convert('RGB'))
    torch.testing.assert_close(batch['images'][first], expected)


def test_rows_that_do_not_share_out_evenly_lose_fewer_than_the_ranks(sets):
    """14 rows over 3 ranks: 4 each, the last 2 of the epoch's order left out."""
    seen = shares(Source(str(sets.img2dataset)), world_size=3, epochs=1, workers=0)
    read = [sum(len(keys) + skipped for _, keys, skipped in seen[r]) for r in range(3)]
    assert read == [4, 4, 4]
    keys = [k for r in range(3) for _, batch, _ in seen[r] for k in batch]
    assert len(set(keys)) == len(keys)


@pytest.fixture(scope='module')
def frozen(tmp_path_factory):
    d = tmp_path_factory.mktemp('frozen')
    return SimpleNamespace(ae=tiny.tiny_autoencoder(d), cloob=str(tiny.tiny_cloob(d)))


@pytest.mark.parametrize('extra, message', [
    (['--image-column', 'caption'], "column 'caption' of {first} holds string, not image bytes"),
    (['--image-column', 'jpeg'], "{first} has no column 'jpeg' (its columns: key, jpg, caption,"),
])
def test_a_column_that_holds_no_images_is_one_line_exit_2(sets, frozen, tmp_path, capsys,
                                                          extra, message):
    argv = ['--train-set', str(sets.img2dataset), '--vqgan-model', frozen.ae,
            '--cloob-checkpoint', frozen.cloob, '--output', str(tmp_path / 'out'),
            '--device', 'cpu', *extra]
    assert tiny.exit_code(precompute_latents.main, 'precompute_latents.py', argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    first = sorted(sets.img2dataset.glob('*.parquet'))[0]
    assert len(err) == 1 and err[0].startswith('precompute_latents.py: error: --train-set: ')
    assert message.format(first=first) in err[0]


def test_rows_without_an_image_are_each_counted_and_warned_about_once(tmp_path):
    """img2dataset writes a row with no image for each failed download: there can be many."""
    cells = [png(32, 32, 0), None, png(32, 32, 1), None]
    folder = tiny.write_img2dataset_parquet(cells, tmp_path / 'i2d', per_file=4)
    loader = Source(str(folder)).stream_loader(SIZE, 4, 0, seed=0, rank=0, world_size=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('default')  # Python's own filter
        batches = list(loader)
    assert [(len(b['keys']), b['skipped']) for b in batches] == [(2, 2)]
    assert [str(w.message) for w in caught] == [
        'skipping rows with no image in them (img2dataset writes its failed downloads so); '
        'each is counted as skipped, without a warning of its own']


@pytest.fixture(scope='module')
def splits(sets):
    """The first rows as a saved dataset of two splits."""
    import datasets
    saved = datasets.Dataset.from_dict(
        {'image': [{'bytes': c, 'path': None} for c in sets.cells[:2]]},
        features=datasets.Features({'image': datasets.Image()}))
    path = sets.dir / 'splits'
    datasets.DatasetDict({'train': saved, 'test': saved}).save_to_disk(str(path))
    return path


@pytest.mark.parametrize('tool', ['train_latent_diffusion.py', 'precompute_latents.py',
                                  'compute_ae_scale.py', 'train_autoencoder.py'])
@pytest.mark.parametrize('flag', ['--image-column', '--dataset-split'])
def test_the_table_flags_reach_the_set_each_tool_reads(sets, splits, frozen, tmp_path, capsys,
                                                       tool, flag):
    """A column the files lack, or a split the dataset lacks, is the user's mistake named by
    the tool: the flag reached the set it reads. (Ignored, the run would stop at another
    mistake: the training tools' missing prompts or validation set.)"""
    import compute_ae_scale
    import train_autoencoder
    import train_latent_diffusion
    spec, value, message = (sets.img2dataset, 'jpeg', "has no column 'jpeg'") \
        if flag == '--image-column' else (splits, 'val', "holds the splits train, test, not 'val'")
    if tool == 'compute_ae_scale.py':
        main, argv = compute_ae_scale.main, [frozen.ae, str(spec), '--device', 'cpu']
    elif tool == 'precompute_latents.py':
        main, argv = precompute_latents.main, [
            '--train-set', str(spec), '--vqgan-model', frozen.ae, '--cloob-checkpoint',
            frozen.cloob, '--output', str(tmp_path / 'out'), '--device', 'cpu']
    elif tool == 'train_autoencoder.py':
        main, argv = train_autoencoder.main, [
            '--train-set', str(spec), '--vqgan-model', frozen.ae, '--output-name',
            str(tmp_path / 'ae'), '--val-set', str(tmp_path / 'val.txt'), '--output-dir',
            str(tmp_path / 'out'), '--accelerator', 'cpu']
    else:
        main, argv = train_latent_diffusion.main, [
            '--train-set', str(spec), '--vqgan-model', frozen.ae, '--cloob-checkpoint',
            frozen.cloob, '--autoencoder-scale', '1', '--demo-prompts', str(tmp_path / 'p.txt'),
            '--output-dir', str(tmp_path / 'out'), '--accelerator', 'cpu']
    capsys.readouterr()
    assert tiny.exit_code(main, tool, [*argv, flag, value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f'{tool}: error: ') and message in err[0], err

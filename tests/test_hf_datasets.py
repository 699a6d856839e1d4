"""Hugging Face datasets as training input (ccld.data.hf_datasets): a directory written by
save_to_disk, and hub datasets, streamed; the hub is stood in for by the datasets
library streaming local parquet files, as it streams the hub's."""

import io
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

import compute_ae_scale
import precompute_latents
import tiny
import train_latent_diffusion
from ccld.data import latent_cache
from ccld.data.sources import Source
from ccld.train import run as training_run

SIZE = 64


def png(seed):
    pixels = np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE + 16, 3), dtype=np.uint8)
    data = io.BytesIO()
    Image.fromarray(pixels).save(data, 'PNG')
    return data.getvalue()


@pytest.fixture(scope='module')
def assets(tmp_path_factory):
    """A dataset of 8 rows saved with save_to_disk, keyed by an `id` column, row 3 corrupt;
    tiny models; demo prompts."""
    import datasets
    d = tmp_path_factory.mktemp('hf')
    cells = [png(i) for i in range(8)]
    cells[3] = b'not an image'
    features = datasets.Features({'image': datasets.Image(), 'id': datasets.Value('string')})
    dataset = datasets.Dataset.from_dict(
        {'image': [{'bytes': c, 'path': None} for c in cells], 'id': [f'r{i}' for i in range(8)]},
        features=features)
    dataset.save_to_disk(str(d / 'saved'))
    (d / 'prompts.txt').write_text('a red circle\n')
    return SimpleNamespace(dir=d, cells=cells, saved=d / 'saved', prompts=d / 'prompts.txt',
                           autoencoder=tiny.tiny_autoencoder(d), cloob=str(tiny.tiny_cloob(d)))


def test_a_saved_dataset_precomputes_and_trains(assets, tmp_path):
    out = tmp_path / 'latents'
    frozen = ['--vqgan-model', assets.autoencoder, '--cloob-checkpoint', assets.cloob,
              '--image-size', str(SIZE), '--batch-size', '4', '--num-workers', '0']
    assert tiny.exit_code(precompute_latents.main, 'precompute_latents.py', [
        '--train-set', str(assets.saved), '--output', str(out), '--device', 'cpu', *frozen]) == 0
    manifest = latent_cache.read_manifest(out)
    assert (manifest['images'], manifest['skipped'], manifest['image_column']) == (7, 1, 'image')
    from litdata import StreamingDataset
    cache = StreamingDataset(str(out))
    keys = sorted(latent_cache.decode_key(cache[i]['key']) for i in range(len(cache)))
    assert keys == [f'{assets.saved}:r{i}' for i in range(8) if i != 3]

    # 8 rows in batches of 4 on one process: an epoch of 2 steps, one image skipped.
    args = training_run.validate(train_latent_diffusion.parser().parse_args([
        '--train-set', str(assets.saved), *frozen, '--autoencoder-scale', '1.5',
        '--demo-prompts', str(assets.prompts), '--output-dir', str(tmp_path / 'run'),
        '--accelerator', 'cpu', '--base-channels', '64', '--channel-multipliers', '1,1,1,1',
        '--max-steps', '2', '--demo-every', '1000', '--demo-steps', '2', '--seed', '0']))
    with pytest.warns(UserWarning, match=f'skipping unreadable image {assets.saved}:r3'):
        trainer, module = training_run.run(args)
    assert trainer.global_step == 2 and module.skipped_images == 1


@pytest.mark.filterwarnings('ignore:skipping')
def test_two_ranks_of_two_workers_read_every_row_of_a_saved_dataset_once_per_epoch(assets):
    """8 rows over 2 ranks of 2 workers: shares of 4, a batch of 2 per worker, each share
    a part of the one piece, read up to where the share ends (as test_parquet's)."""
    seen = tiny.rank_shares(Source(str(assets.saved)), SIZE, world_size=2, epochs=2,
                            batch_size=2)
    for epoch in (0, 1):
        for rank in (0, 1):
            assert sum(len(keys) + n for e, keys, n in seen[rank] if e == epoch) == 4
        keys = [k for r in (0, 1) for e, batch, _ in seen[r] if e == epoch for k in batch]
        assert sorted(keys) == [f'{assets.saved}:r{i}' for i in range(8) if i != 3]


def test_a_split_the_saved_dataset_lacks_is_refused(assets, tmp_path):
    import datasets
    saved = datasets.load_from_disk(str(assets.saved))
    datasets.DatasetDict({'train': saved, 'test': saved}).save_to_disk(str(tmp_path / 'splits'))
    assert Source(str(tmp_path / 'splits'), split='test').describe() == \
        f'8 rows of the dataset saved in {tmp_path / "splits"}, split test'
    with pytest.raises(Exception, match="holds the splits train, test, not 'val'; pass one"):
        Source(str(tmp_path / 'splits'), split='val')


def test_a_hub_name_offline_and_not_cached_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    import datasets
    monkeypatch.setattr(datasets.config, 'HF_HUB_OFFLINE', True)  # as HF_HUB_OFFLINE=1 sets
    monkeypatch.setattr(datasets.config, 'HF_DATASETS_CACHE', tmp_path / 'cache')
    argv = ['no_model_needed', 'hf://someone/paintings', '--device', 'cpu']
    assert tiny.exit_code(compute_ae_scale.main, 'compute_ae_scale.py', argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ['compute_ae_scale.py: error: hf://someone/paintings is not cached on this '
                   'machine, and the hub is offline (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is '
                   'set); load it once online, or pass a directory written by save_to_disk.']


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """hf://NAME streams 12 rows, images in the img2dataset schema, 3 per parquet file (a
    shard each); files=1 puts them in one file. Row 4 is corrupt."""
    cells = [png(i) for i in range(12)]
    cells[4] = b'not an image'

    def make(files):
        return Source(tiny.stream_as_hub(monkeypatch, cells, tmp_path / f'hub{files}',
                                         12 // files))
    return make


@pytest.mark.filterwarnings('ignore:skipping')
@pytest.mark.parametrize('files', [4, 1])
def test_a_hub_dataset_is_read_once_per_epoch_over_two_ranks_of_two_workers(hub, files):
    """4 shards: one for each of 2 ranks x 2 workers; 1 shard: each worker reads it and
    keeps every 4th row. Either way every row is read once an epoch."""
    source = hub(files)
    assert (len(source), source.known_images, source.uneven_shares) == (files, None, True)
    assert [key for key, *_ in source.items(0)][:2] == \
        [f'hf://someone/paintings:0:{i:09}' for i in range(2)]
    seen = [rank_epochs(source, rank) for rank in (0, 1)]
    for epoch in (0, 1):
        batches = seen[0][epoch] + seen[1][epoch]
        keys = [key.rpartition(':')[2] for keys, _ in batches for key in keys]
        assert sorted(keys) == [f'{i:09}' for i in range(12) if i != 4]
        assert sum(skipped for _, skipped in batches) == 1


def rank_epochs(source, rank, epochs=2):
    """[(keys, skipped) of each batch] of each epoch of a rank's loader of 2 workers."""
    loader = source.stream_loader(32, 2, 2, seed=1, rank=rank, world_size=2)
    return [[(batch['keys'], batch['skipped']) for batch in loader] for _ in range(epochs)]

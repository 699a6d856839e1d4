"""A latent cache made with --aspect-buckets (precompute_latents.py): each image's latents
at its bucket's shape, and training from it one bucket a batch, on one and two processes."""

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import functional as F

import precompute_latents
import tiny
import train_latent_diffusion
from ccld.data import buckets, latent_cache
from ccld.data.bucketed import fit_to_bucket
from ccld.data.images import cover, load_image
from ccld.errors import UserError
from ccld.models.autoencoder import load_autoencoder
from ccld.models.cloob import load_cloob
from ccld.train import run as training_run
from ccld.train.diffusion_module import latents_and_conditions
from test_bucketed import two_rank_run
from test_latent_cache import precompute_args, records, train_args

SIZE = 128
TABLE = [(64, 192), (128, 128), (192, 64)]  # at 128 px, --max-aspect 3 (test_bucketed.py)
# 5 square, 3 tall and 3 wide (one beyond 3:1, clamped): batches of 2 divide none of them.
SIZES = [(100, 100), (110, 90), (90, 110), (100, 100), (80, 80),
         (60, 150), (60, 120), (50, 200), (150, 60), (120, 60), (400, 100)]


@pytest.fixture(scope='module')
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp('bucketed_cache')
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate(SIZES):
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        paths.append(d / f'{i}.png')
        Image.fromarray(pixels).save(paths[-1])
    (d / 'prompts.txt').write_text('a red circle\n')
    return SimpleNamespace(dir=d, paths=[str(p) for p in paths],
                           train=tiny.write_path_list(paths, d / 'train.txt'),
                           autoencoder=tiny.tiny_autoencoder(d), cloob=str(tiny.tiny_cloob(d)),
                           prompts=d / 'prompts.txt')


def bucketed_args(assets, out, *extra):
    return precompute_args(assets, out, '--image-size', str(SIZE), '--aspect-buckets',
                           '--max-aspect', '3', '--bucket-crop', 'center', *extra)


@pytest.fixture(scope='module')
def cached(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp('made') / 'latents'
    assert tiny.exit_code(precompute_latents.main, 'precompute_latents.py',
                          bucketed_args(assets, out)) == 0
    return out


def bucket_of(path):
    """The bucket of an image, from its size alone."""
    return TABLE[buckets.assign(*SIZES[int(Path(path).stem)], TABLE)]


def latent_shape(path):
    w, h = bucket_of(path)
    return (4, h // 8, w // 8)


def test_each_record_is_its_image_fitted_to_its_bucket(assets, cached):
    """Each record's latents are at its bucket's shape, and are the posterior of the image
    resized to cover the bucket and centre-cropped; its CLOOB embedding is the one
    training computes from such a bucketed batch. The manifest's scale is over every
    latent element, whatever the shapes."""
    found = records(cached)
    assert sorted(found) == sorted(assets.paths)
    ae, cloob = load_autoencoder(assets.autoencoder), load_cloob(assets.cloob)
    means, stds = [], []
    for path, record in found.items():
        assert tuple(record['mean'].shape) == tuple(record['std'].shape) == latent_shape(path)
        image = F.to_tensor(cover(load_image(path), bucket_of(path)))[None]
        with torch.no_grad():
            mean, logvar = ae.quant_conv(ae.encoder(image * 2 - 1)).chunk(2, dim=1)
        std = logvar.clamp(-30, 20).mul(0.5).exp()
        _, cond = latents_and_conditions({'images': image}, ae, cloob, 1.0)
        torch.testing.assert_close(record['mean'].float(), mean[0], rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(record['std'].float(), std[0], rtol=1e-3, atol=1e-5)
        torch.testing.assert_close(record['embed'].float(), cond[0], rtol=1e-3, atol=1e-3)
        means.append(mean.double().flatten())
        stds.append(std.double().flatten())
    mean, std = torch.cat(means), torch.cat(stds)
    expected = ((mean ** 2 + std ** 2).mean() - mean.mean() ** 2).sqrt().item()
    manifest = latent_cache.read_manifest(cached)
    assert manifest['autoencoder_scale'] == pytest.approx(expected, rel=1e-4)
    assert manifest['buckets'] == [list(b) for b in TABLE]
    assert manifest['bucket_images'] == [3, 5, 3]


def test_the_bucket_index_names_each_records_bucket_in_litdatas_order(assets, cached):
    from litdata import StreamingDataset
    dataset = StreamingDataset(str(cached))
    index = np.load(cached / latent_cache.BUCKETS).tolist()
    assert len(index) == len(dataset) == len(SIZES)
    for i, bucket in enumerate(index):
        key = latent_cache.decode_key(dataset[i]['key'])
        assert TABLE[bucket] == bucket_of(key), (i, key)


@pytest.mark.parametrize('extra, differ', [
    (['--max-aspect', '2'], 'buckets differ'),
    (['--bucket-step', '128'], 'buckets differ'),
    (['--bucket-crop', 'random'], 'bucket_crop differ'),
])
def test_a_rerun_with_other_bucket_settings_is_refused(assets, cached, capsys, extra, differ):
    argv = bucketed_args(assets, cached, *extra)
    assert tiny.exit_code(precompute_latents.main, 'precompute_latents.py', argv) == 2
    assert f'holds a cache made with other settings ({differ})' in capsys.readouterr().err
    square = precompute_args(assets, cached, '--image-size', str(SIZE))
    assert tiny.exit_code(precompute_latents.main, 'precompute_latents.py', square) == 2
    assert '(buckets, bucket_crop differ)' in capsys.readouterr().err


def test_a_random_crop_is_drawn_from_the_images_key():
    """So that a resumed or repeated precompute makes the same cache."""
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (100, 300, 3), np.uint8))
    crops = [fit_to_bucket(f'key{i % 4}', image, [(128, 128)], True) for i in range(8)]
    assert all(torch.equal(crops[i], crops[i + 4]) for i in range(4))
    assert len({c.sum().item() for c in crops}) > 1


def test_training_flags_must_give_the_caches_buckets(assets, cached, tmp_path, capsys):
    argv = train_args(assets, cached, tmp_path / 'out', '--image-size', str(SIZE),
                      '--aspect-buckets')
    assert tiny.exit_code(train_latent_diffusion.main, 'train', argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'holds the buckets 64x192 128x128 192x64, but the flags give ' \
        '128x128' in err[0], err
    with pytest.raises(UserError, match='was made without it'):
        training_run.cache_buckets({'images': 4}, 'square', TABLE)


@pytest.mark.parametrize('flags', [[], ['--aspect-buckets', '--max-aspect', '3']])
def test_one_process_trains_on_the_caches_buckets_each_record_once(assets, cached, tmp_path,
                                                                  flags):
    """Without --aspect-buckets, or with the cache's: batches of 2 from the 3, 5 and 3
    records of the buckets are 2 + 1, 2 + 2 + 1 and 2 + 1 (a bucket's leftover in a
    smaller batch of its own): 7 batches, every record once."""
    seen = tiny.set_up_run(train_latent_diffusion.main, train_args(
        assets, cached, tmp_path / 'out', '--image-size', str(SIZE), '--batch-size', '2',
        *flags))
    assert seen.trainer['use_distributed_sampler'] is False
    batches = list(seen.loader)
    assert sorted(len(b['keys']) for b in batches) == [1, 1, 1, 2, 2, 2, 2]
    assert sorted(k for b in batches for k in b['keys']) == sorted(assets.paths)
    for batch in batches:
        for key, mean in zip(batch['keys'], batch['mean']):
            assert tuple(mean.shape) == latent_shape(key)


def test_two_ranks_train_from_the_cache_with_equal_batches_and_each_record_once(
        assets, cached, tmp_path):
    """The 7 batches of an epoch (above) are trimmed to 6 for 2 ranks: 3 steps each an
    epoch, one batch (1 or 2 records) left out. Two epochs: 6 steps."""
    argv = train_args(assets, cached, tmp_path / 'out', '--image-size', str(SIZE),
                      '--batch-size', '2', '--num-gpus', '2', '--max-steps', '6',
                      '--checkpoint-every', '100')
    seen, stderr = two_rank_run(argv, tmp_path)
    assert stderr.count('on the aspect-ratio buckets it was made with (64x192: 3, 128x128: 5, '
                        '192x64: 3)') == 1
    assert [len(s) for s in seen] == [6, 6]
    for epoch in (0, 1):
        assert [sum(e == epoch for e, _, _ in s) for s in seen] == [3, 3]
        keys = [k for s in seen for e, batch, _ in s if e == epoch for k in batch]
        assert len(keys) == len(set(keys)) >= len(SIZES) - 2
    for s in seen:
        for _, keys, shape in s:
            assert {latent_shape(k) for k in keys} == {shape[1:]}
    assert (tmp_path / 'out' / 'checkpoints').is_dir()


def test_a_loader_resumed_mid_epoch_goes_on_with_the_batches_its_epoch_had_left(
        assets, cached, tmp_path):
    """The loader's state after 3 of the epoch's 7 batches (what Lightning saves in a
    checkpoint), given to a new loader, makes it hand out the other 4: the two halves are
    the uninterrupted epoch, every record once."""
    def cache_loader():
        return tiny.set_up_run(train_latent_diffusion.main, train_args(
            assets, cached, tmp_path / 'out', '--image-size', str(SIZE), '--batch-size',
            '2')).loader

    whole = [b['keys'] for b in cache_loader()]
    first = cache_loader()
    batches = iter(first)
    taken = [next(batches)['keys'] for _ in range(3)]
    resumed = cache_loader()
    resumed.load_state_dict(first.state_dict())
    assert taken + [b['keys'] for b in resumed] == whole
    assert len(resumed) == 7  # (Lightning counts the 3 done before the resume)

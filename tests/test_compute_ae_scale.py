"""compute_ae_scale.py and ccld.scale on a tiny autoencoder and a few dozen small images."""

import copy
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from torchvision.transforms import functional as TF

import compute_ae_scale
import tiny
from ccld.models.autoencoder import load_autoencoder, read_config, save_autoencoder
from ccld.errors import RunError
from ccld.data.scale import estimate_scale

ROOT = Path(__file__).resolve().parent.parent
SIZE = 64


@pytest.fixture(scope='module')
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp('scale')
    name = tiny.tiny_autoencoder(d)
    paths = tiny.make_images(d / 'images', n=32, size=SIZE)
    (d / 'notes.txt').write_text('not an image')
    bad = [str(d / 'missing.png'), str(d / 'notes.txt')]
    autoencoder = load_autoencoder(name)
    with torch.no_grad():  # latent means x10: a scale far from 1 (and from its square)
        autoencoder.quant_conv.weight[:4] *= 10
        autoencoder.quant_conv.bias[:4] *= 10
    # Latent means x100: the posterior noise then moves the scale by ~0.04%, a missing
    # [-1, 1] mapping of the images by ~2%.
    amplified = copy.deepcopy(autoencoder)
    with torch.no_grad():
        amplified.quant_conv.weight[:4] *= 10
        amplified.quant_conv.bias[:4] *= 10
    save_autoencoder(amplified, read_config(f'{name}.yaml'), d / 'amplified')
    return SimpleNamespace(dir=d, name=name, autoencoder=autoencoder, paths=paths, bad=bad,
                           amplified=amplified, amplified_name=str(d / 'amplified'),
                           list=tiny.write_path_list(paths[:20] + bad, d / 'train.txt'))


def scale(assets, paths, **kwargs):
    return estimate_scale(assets.autoencoder, paths, image_size=SIZE, progress=False, **kwargs)


def load_images(paths):
    return torch.stack([TF.to_tensor(Image.open(p).convert('RGB')) for p in paths])


def closed_form_scale(autoencoder, images, mapped=True):
    """SPEC 5 for one batch, in closed form: latent samples mean + std * eps have expected
    variance E[mean^2 + std^2] - E[mean]^2 over their n elements (n / (n - 1) of it for
    the unbiased estimate). Returns its square root and the relative standard deviation
    that the sampling noise gives the estimate."""
    with torch.no_grad():
        moments = autoencoder.quant_conv(autoencoder.encoder(images * 2 - 1 if mapped else images))
    mean, logvar = moments.double().chunk(2, dim=1)
    std = logvar.clamp(-30, 20).div(2).exp()
    n = mean.numel()
    var = ((mean ** 2 + std ** 2).mean() - mean.mean() ** 2) * n / (n - 1)
    var_sd = (4 * ((mean - mean.mean()) ** 2 * std ** 2).sum() + 2 * (std ** 4).sum()).sqrt() / n
    return var.sqrt().item(), (var_sd / var / 2).item()


def test_matches_an_independent_computation(assets):
    """One batch of every image: the estimate is the closed form up to sampling noise,
    with a tolerance far below what a missing [-1, 1] mapping of the images shifts."""
    result = estimate_scale(assets.amplified, assets.paths, batches=1, batch_size=32,
                            image_size=SIZE, progress=False)
    assert (result.images, result.batches, result.skipped) == (32, 1, 0)
    images = load_images(assets.paths)
    expected, noise = closed_form_scale(assets.amplified, images)
    tolerance = 6 * noise
    unmapped, _ = closed_form_scale(assets.amplified, images, mapped=False)
    assert abs(unmapped / expected - 1) > 3 * tolerance  # the test can see that mistake
    assert result.scale == pytest.approx(expected, rel=tolerance)


def test_same_seed_same_scale(assets):
    def run(seed):
        return scale(assets, assets.paths, batches=1, batch_size=8, seed=seed).scale
    assert run(0) == run(0) != run(1)


def test_short_list_uses_every_image(assets):
    result = scale(assets, assets.paths[:20], batches=4, batch_size=16)
    assert (result.images, result.batches, result.skipped) == (20, 2, 0)


def test_unreadable_images_are_skipped_and_counted(assets):
    with pytest.warns(UserWarning, match='skipping unreadable image'):
        result = scale(assets, assets.paths[:6] + assets.bad, batches=4, batch_size=4)
    assert (result.images, result.skipped) == (6, 2)
    with pytest.warns(UserWarning), pytest.raises(RunError, match='none of the 2 files tried'):
        scale(assets, assets.bad, batches=1, batch_size=4)


def run_scale(argv):
    return tiny.exit_code(compute_ae_scale.main, 'compute_ae_scale.py', argv)


def test_cli_json(assets, capsys):
    argv = [assets.name, str(assets.list), '--batches', '3', '--batch-size', '8',
            '--image-size', str(SIZE), '--num-workers', '0', '--device', 'cpu', '--json']
    with pytest.warns(UserWarning):
        assert run_scale(argv) == 0
    out, err = capsys.readouterr()
    result = json.loads(out)
    assert (result['images'], result['batches'], result['skipped']) == (20, 3, 2)
    assert result['argument'] == f'--autoencoder-scale {result["autoencoder_scale"]:.6g}'
    assert 'fewer than 3 batches x 8 = 24; using all of them' in err
    assert 'skipped 2 unreadable images' in err


def test_cli_seed_workers_and_device_are_the_estimates(assets, tmp_path, capsys, monkeypatch):
    """--seed picks the images and latent samples as the library's seed does (and another
    seed gives another scale); --num-workers loads them; --device cpu runs them (the
    default device here made one that cannot run)."""
    from ccld import cli
    from ccld.data import scale as scale_module
    paths = assets.paths[:12]
    train = tiny.write_path_list(paths, tmp_path / 'train.txt')
    expected = estimate_scale(load_autoencoder(assets.name), paths, batches=1, batch_size=4,
                              image_size=SIZE, seed=1, progress=False).scale
    workers, make_loader = [], scale_module.make_loader

    def loader_spy(paths, image_size, batch_size, num_workers, **kwargs):
        workers.append(num_workers)
        return make_loader(paths, image_size, batch_size, num_workers, **kwargs)
    monkeypatch.setattr(scale_module, 'make_loader', loader_spy)
    monkeypatch.setattr(cli, 'default_device', lambda: torch.device('meta'))

    def cli_scale(seed):
        assert run_scale([assets.name, str(train), '--batches', '1', '--batch-size', '4',
                          '--image-size', str(SIZE), '--num-workers', '0', '--device', 'cpu',
                          '--seed', str(seed), '--json']) == 0
        return json.loads(capsys.readouterr().out)['autoencoder_scale']
    assert cli_scale(1) == expected != cli_scale(2)
    assert workers == [0, 0]


@pytest.mark.parametrize('argv, message', [
    (['{name}', 'missing.txt'], 'path list missing.txt does not exist'),
    (['{name}', '{dir}/empty.txt'], 'has no image paths in it'),
    (['missing_ae', '{list}'], 'missing_ae.yaml not found'),
    (['{name}', '{list}', '--batches', '0'], 'argument --batches: must be at least 1, got 0'),
    (['{name}', '{list}', '--num-workers', '-1'], 'argument --num-workers: expected a whole'),
    (['{name}', '{list}', '--image-column', 'jpg'], 'names a column of parquet files or datas'),
    (['{name}', '{list}', '--image-size', '63'], '--image-size 63 must be a multiple of 64'),
])
def test_cli_user_errors(assets, capsys, argv, message):
    (assets.dir / 'empty.txt').write_text('\n\n')
    fill = lambda s: s.format(name=assets.name, dir=assets.dir, list=assets.list)  # noqa: E731
    assert run_scale([*map(fill, argv), '--device', 'cpu']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('compute_ae_scale.py: error: ')
    assert fill(message) in err[0]


def test_cli_prints_the_scale_and_the_flag_from_any_directory(assets, tmp_path):
    run = subprocess.run(
        [sys.executable, str(ROOT / 'compute_ae_scale.py'),
         str(Path(assets.amplified_name).resolve()), str(assets.list), '--batches', '1',
         '--batch-size', '22', '--image-size', str(SIZE), '--num-workers', '2'],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    value = run.stdout.strip()
    assert '\n' not in value
    # One batch: the list's 20 readable images.
    expected, noise = closed_form_scale(assets.amplified, load_images(assets.paths[:20]))
    assert float(value) == pytest.approx(expected, rel=6 * noise)
    assert f'--autoencoder-scale {value}\n' in run.stderr
    assert 'Traceback' not in run.stderr


def test_the_scale_of_parquet_rows_is_that_of_the_same_images_as_files(assets, capsys):
    """The 32 images' bytes in img2dataset's parquet, with a corrupt row: one batch of all of
    them gives the scale of the files, up to the noise of the latent samples (which fall
    on the images in another order), well below what a missing [-1, 1] mapping moves."""
    cells = [Path(p).read_bytes() for p in assets.paths] + [b'not an image']
    folder = tiny.write_img2dataset_parquet(cells, assets.dir / 'parquet', per_file=11)
    argv = [assets.amplified_name, str(folder), '--batches', '1', '--batch-size', '33',
            '--image-size', str(SIZE), '--num-workers', '0', '--device', 'cpu', '--json']
    with pytest.warns(UserWarning, match='skipping unreadable image'):
        assert run_scale(argv) == 0
    ours = json.loads(capsys.readouterr().out)
    assert (ours['images'], ours['batches'], ours['skipped']) == (32, 1, 1)
    files = estimate_scale(assets.amplified, assets.paths, batches=1, batch_size=33,
                           image_size=SIZE, progress=False)
    _, noise = closed_form_scale(assets.amplified, load_images(assets.paths))
    assert ours['autoencoder_scale'] == pytest.approx(files.scale, rel=6 * noise)


def test_a_list_without_readable_images_stops_after_20_batches(assets, tmp_path, capsys):
    """A list of wrong paths is reported after the first 20 batches, not after all 32."""
    bad = tiny.write_path_list([assets.bad[i % 2] for i in range(50)], tmp_path / 'bad.txt')
    argv = [assets.name, str(bad), '--batches', '32', '--batch-size', '2', '--image-size',
            str(SIZE), '--num-workers', '0', '--device', 'cpu']
    with pytest.warns(UserWarning, match='skipping unreadable image'):
        assert run_scale(argv) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (
        f'compute_ae_scale.py: error: none of the 40 files tried from {bad} (20 batch(es)) '
        'could be read as an image; check that it lists image paths, one a line, and that '
        'the data set is mounted.')
    assert 'Traceback' not in err

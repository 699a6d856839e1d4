"""The latent cache: precompute_latents.py and training with --train-latents, on tiny
models written through the real formats."""

import hashlib
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

import compute_ae_scale
import precompute_latents
import tiny
import train_latent_diffusion
from ccld import cli
from ccld.data import latent_cache, precompute
from ccld.models.autoencoder import load_autoencoder
from ccld.models.cloob import load_cloob
from ccld.data.images import image_transform, load_image
from ccld.train.diffusion_module import latents_and_conditions, v_objective

ROOT = Path(__file__).resolve().parent.parent
SIZE = 64
N = 16


def subprocess_env():
    """Processes started from a temp dir import this checkout's code, one thread each."""
    path = [str(ROOT), str(ROOT / 'latent-diffusion'), os.environ.get('PYTHONPATH', '')]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, path)))


def write_tar_shards(images, folder, per_shard):
    """img2dataset's layout: NNNNN.tar holding KEY.jpg, KEY.txt and KEY.json per sample."""
    folder.mkdir(parents=True, exist_ok=True)
    for shard in range(len(images) // per_shard):
        with tarfile.open(folder / f'{shard:05}.tar', 'w') as tar:
            for i in range(shard * per_shard, (shard + 1) * per_shard):
                jpeg = io.BytesIO()
                Image.open(images[i]).convert('RGB').save(jpeg, 'JPEG', quality=95)
                for ext, data in (('jpg', jpeg.getvalue()), ('txt', b'a caption'),
                                  ('json', json.dumps({'key': f'{i:09}'}).encode())):
                    info = tarfile.TarInfo(f'{i:09}.{ext}')
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return folder


@pytest.fixture(scope='module')
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp('cache')
    paths = tiny.make_images(d / 'images', n=N, size=SIZE)
    (d / 'bad.png').write_text('not an image')
    (d / 'prompts.txt').write_text('a red circle\na blue square\n')
    return SimpleNamespace(
        dir=d, paths=[str(p) for p in paths],
        train=tiny.write_path_list([*paths[:7], d / 'bad.png', *paths[7:]], d / 'train.txt'),
        tars=write_tar_shards(paths, d / 'shards', per_shard=4),
        autoencoder=tiny.tiny_autoencoder(d), cloob=str(tiny.tiny_cloob(d)),
        other_autoencoder=tiny.make_tiny_autoencoder(d / 'other_ae', seed=1),
        other_cloob=str(tiny.make_tiny_cloob(d / 'other_cloob.pkl', seed=1)),
        prompts=d / 'prompts.txt')


@pytest.fixture(scope='module')
def parquet_set(assets):
    """The same images as img2dataset writes them to parquet: two files of 9 rows, each row
    a row group, with the images' file bytes and then a corrupt image and a failed download."""
    cells = [Path(p).read_bytes() for p in assets.paths] + [b'not an image', None]
    return tiny.write_img2dataset_parquet(cells, assets.dir / 'parquet', per_file=9)


def as_path(key, assets):
    """The image file of a parquet row's key (FILE:KEY, KEY its index in assets.paths)."""
    return assets.paths[int(key.rpartition(':')[2])]


def precompute_args(assets, out, *extra):
    return ['--train-set', str(assets.train), '--vqgan-model', assets.autoencoder,
            '--cloob-checkpoint', assets.cloob, '--output', str(out), '--image-size', str(SIZE),
            '--batch-size', '4', '--num-workers', '0', '--device', 'cpu', '--shard-size', '5',
            *extra]


@pytest.fixture(scope='module')
def cached(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp('made') / 'latents'
    assert tiny.exit_code(precompute_latents.main, 'precompute_latents.py',
                          precompute_args(assets, out)) == 0
    return out


def records(root):
    """Every record of a finished cache, by key."""
    from litdata import StreamingDataset
    dataset = StreamingDataset(str(root))
    found = [dataset[i] for i in range(len(dataset))]
    by_key = {latent_cache.decode_key(r['key']): r for r in found}
    assert len(by_key) == len(found), 'a key is in the cache twice'
    return by_key


@pytest.fixture(scope='module')
def models(assets):
    return SimpleNamespace(ae=load_autoencoder(assets.autoencoder), cloob=load_cloob(assets.cloob))


def direct(models, paths):
    """Posterior means and stds and CLOOB embeddings computed here, image by image."""
    images = torch.stack([image_transform(SIZE)(load_image(p)) for p in paths])
    with torch.no_grad():
        moments = models.ae.quant_conv(models.ae.encoder(images * 2 - 1))
        mean, logvar = moments.chunk(2, dim=1)
        return images, mean, logvar.clamp(-30, 20).mul(0.5).exp(), models.cloob.embed_images(images)


def test_the_cache_holds_every_readable_image_once_with_its_posterior_and_embedding(
        assets, cached, models):
    found = records(cached)
    assert sorted(found) == sorted(assets.paths)
    _, mean, std, embed = direct(models, assets.paths)
    for i, path in enumerate(assets.paths):
        record = found[path]
        assert record['mean'].dtype == record['std'].dtype == torch.float16
        torch.testing.assert_close(record['mean'].float(), mean[i], rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(record['std'].float(), std[i], rtol=1e-3, atol=1e-5)
        torch.testing.assert_close(record['embed'].float(), embed[i], rtol=1e-3, atol=1e-3)


def test_parquet_rows_cache_as_the_same_images_given_as_files(assets, models, tmp_path):
    """A parquet file in the datasets library's schema (image structs, rows keyed by their
    position) with a landscape image, a corrupt one and a portrait one: the cache holds
    what the image files give, resized and cropped the same."""
    files = [tmp_path / 'wide.png', Path(assets.paths[2]), tmp_path / 'tall.png']
    Image.open(assets.paths[0]).resize((96, 64)).save(files[0])
    Image.open(assets.paths[1]).resize((64, 112)).save(files[2])
    cells = [files[0].read_bytes(), b'not an image', files[1].read_bytes(), files[2].read_bytes()]
    table = tiny.write_datasets_parquet(cells, tmp_path / 'train-00000-of-00001.parquet')
    out = tmp_path / 'latents'
    assert tiny.exit_code(precompute_latents.main, 'precompute_latents.py', precompute_args(
        assets, out, '--train-set', str(table))) == 0
    found = records(out)
    rows = [0, 2, 3]
    assert sorted(found) == [f'{table}:{row}' for row in rows]
    _, mean, std, embed = direct(models, files)
    for i, row in enumerate(rows):
        record = found[f'{table}:{row}']
        torch.testing.assert_close(record['mean'].float(), mean[i], rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(record['std'].float(), std[i], rtol=1e-3, atol=1e-5)
        torch.testing.assert_close(record['embed'].float(), embed[i], rtol=1e-3, atol=1e-3)
    assert latent_cache.read_manifest(out)['skipped'] == 1


def test_the_manifest_records_what_made_the_cache_and_the_scale(assets, cached, models):
    manifest = json.loads((cached / latent_cache.MANIFEST).read_text())
    weights = Path(assets.autoencoder + '.ckpt').read_bytes()
    assert manifest['autoencoder']['sha256'] == hashlib.sha256(weights).hexdigest()
    cloob_file = Path(assets.cloob).read_bytes()
    assert manifest['cloob']['sha256'] == hashlib.sha256(cloob_file).hexdigest()
    assert (manifest['image_size'], manifest['images'], manifest['skipped']) == (SIZE, N, 1)
    assert manifest['parts'] == 4 and manifest['software'].startswith('ccld ')
    # compute_ae_scale.py's statistic over every image, from the posteriors in closed form:
    # var(z) = E[mean^2 + std^2] - E[mean]^2.
    _, mean, std, _ = direct(models, assets.paths)
    mean, std = mean.double(), std.double()
    expected = math.sqrt((mean ** 2 + std ** 2).mean() - mean.mean() ** 2)
    assert manifest['autoencoder_scale'] == pytest.approx(expected, rel=1e-4)


def test_compute_ae_scale_prints_the_scale_precompute_prints_on_the_same_images(
        assets, cached, capsys):
    """The same estimator on the same images (the list's 16 readable ones, in batches of
    another size): the two tools print the same value to paste into training."""
    argv = [assets.autoencoder, str(assets.train), '--batches', '5', '--batch-size', '5',
            '--image-size', str(SIZE), '--num-workers', '0', '--device', 'cpu', '--json']
    with pytest.warns(UserWarning, match='skipping unreadable image'):
        assert tiny.exit_code(compute_ae_scale.main, 'compute_ae_scale.py', argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result['images'], result['skipped']) == (N, 1)
    manifest = latent_cache.read_manifest(cached)
    assert result['autoencoder_scale'] == pytest.approx(manifest['autoencoder_scale'], rel=1e-5)


def test_the_loss_from_the_cache_is_the_loss_from_the_images(assets, cached, models):
    found = records(cached)
    paths = assets.paths[:4]
    images = direct(models, paths)[0]
    batch = {name: torch.stack([found[p][name] for p in paths])
             for name in ('mean', 'std', 'embed')}
    model = tiny.tiny_diffusion()
    t = torch.tensor([0.1, 0.4, 0.7, 0.95])
    losses = []
    for source in ({'images': images}, batch):
        torch.manual_seed(5)  # the same draws: posterior noise, dropout, diffusion noise
        x0, cond = latents_and_conditions(source, models.ae, models.cloob, 1.5)
        losses.append(v_objective(model, x0, cond, t).item())
    assert losses[0] == pytest.approx(losses[1], rel=2e-3), losses


def test_every_draw_from_a_cached_record_is_a_new_posterior_sample(assets, cached, models):
    """The cache stores the posterior, not a sample of it, so that training from it sees
    what training from the images sees: a new sample of N(mean, std^2) / scale at every
    step. 4000 draws of one record through the function training runs on cached
    batches: two draws differ, and per latent element their mean and standard
    deviation are the stored mean and std over the scale, within 5 standard errors
    (se of a mean: std / sqrt(n); of a standard deviation: std / sqrt(2 n))."""
    record, n, scale = records(cached)[assets.paths[0]], 4000, 1.5
    batch = {name: record[name][None].expand(n, *record[name].shape)
             for name in ('mean', 'std', 'embed')}
    torch.manual_seed(0)
    x0, cond = latents_and_conditions(batch, models.ae, models.cloob, scale)
    assert not torch.equal(x0[0], x0[1])
    mean, std, drawn = record['mean'].double() / scale, record['std'].double() / scale, x0.double()
    assert ((drawn.mean(0) - mean).abs() <= 5 * std / n ** 0.5).all()
    assert ((drawn.std(0) - std).abs() <= 5 * std / (2 * n) ** 0.5).all()
    torch.testing.assert_close(cond, record['embed'].float().expand(n, -1), rtol=0, atol=0)


def train_args(assets, latents, out, *extra):
    return ['--train-latents', str(latents), '--vqgan-model', assets.autoencoder,
            '--autoencoder-scale', '1.5', '--cloob-checkpoint', assets.cloob,
            '--demo-prompts', str(assets.prompts), '--output-dir', str(out),
            '--accelerator', 'cpu', '--num-workers', '0', '--batch-size', '4',
            '--base-channels', '64', '--channel-multipliers', '1,1,1,1', '--image-size', str(SIZE),
            '--max-steps', '2', '--checkpoint-every', '2', '--demo-every', '1000',
            '--demo-steps', '2', '--seed', '0', *extra]


@pytest.mark.parametrize('extra, message', [
    (['--vqgan-model', '{other_ae}'], 'was made with autoencoder {ae}'),
    (['--image-size', '128'], 'was made with image size 64, but --image-size gives 128'),
    (['--cloob-checkpoint', '{other_cloob}'], 'was made with cloob {cloob}'),
])
def test_a_cache_made_with_other_models_or_size_is_refused(assets, cached, tmp_path, capsys,
                                                           monkeypatch, extra, message):
    def refuse(*args, **kwargs):
        raise AssertionError('a model was loaded before the cache was checked')
    monkeypatch.setattr('ccld.models.autoencoder.load_autoencoder', refuse)
    monkeypatch.setattr('ccld.models.cloob.load_cloob', refuse)
    fill = lambda s: s.format(other_ae=assets.other_autoencoder, ae=assets.autoencoder,  # noqa: E731
                              other_cloob=assets.other_cloob, cloob=assets.cloob)
    argv = train_args(assets, cached, tmp_path / 'out', *map(fill, extra))
    assert tiny.exit_code(train_latent_diffusion.main, 'train', argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fill(message) in err[0], err
    assert '--train-latents' in err[0]


def test_an_unfinished_cache_is_refused(assets, tmp_path, capsys):
    (tmp_path / 'latents').mkdir()
    (tmp_path / 'latents' / latent_cache.PLAN).write_text('{}')
    argv = train_args(assets, tmp_path / 'latents', tmp_path / 'out')
    assert tiny.exit_code(train_latent_diffusion.main, 'train', argv) == 2
    err = capsys.readouterr().err
    assert 'is an unfinished latent cache' in err and 'rerunning the same command resumes' in err


def test_training_from_the_cache_leaves_the_encoder_and_image_tower_out(assets, cached, tmp_path):
    from ccld.train import run as training_run
    args = training_run.validate(train_latent_diffusion.parser().parse_args(
        train_args(assets, cached, tmp_path)))
    trainer, module = training_run.run(args)
    assert trainer.global_step == 2
    assert module.ae_model.encoder is None and module.cloob.model.image_encoder is None
    assert (tmp_path / 'checkpoints' / 'last.ckpt').is_file()
    # The image tower stays off the module (on the CPU), and still scores the demo grid.
    tower = module.spare_image_tower[0]
    assert all(p.device.type == 'cpu' for p in tower.parameters())
    assert tower not in list(module.modules())
    with open(tmp_path / 'logs' / 'version_0' / 'metrics.csv') as f:
        assert 'demo/cloob_score' in f.readline()


def test_the_cache_loader_follows_batch_size_num_workers_and_prefetch_factor(assets, cached,
                                                                            tmp_path):
    """The loader the run builds from its flags for a latent cache."""
    from ccld.train import run as training_run
    args = train_latent_diffusion.parser().parse_args(train_args(
        assets, cached, tmp_path, '--batch-size', '3', '--num-workers', '1',
        '--prefetch-factor', '5'))
    args.cache = latent_cache.read_manifest(cached)
    loader = training_run.TrainData(args, seed=0)(SimpleNamespace(global_rank=0, world_size=1))
    assert (loader.batch_size, loader.num_workers, loader.prefetch_factor) == (3, 1, 5)


def test_a_rerun_with_other_settings_into_the_same_cache_is_refused(assets, cached, capsys):
    argv = precompute_args(assets, cached, '--vqgan-model', assets.other_autoencoder)
    assert tiny.exit_code(precompute_latents.main, 'precompute_latents.py', argv) == 2
    assert 'holds a cache made with other settings (autoencoder differ)' in capsys.readouterr().err


@pytest.mark.parametrize('data', ['path list', 'parquet'])
def test_killed_precompute_resumes_on_two_processes_to_the_same_cache(assets, cached, tmp_path,
                                                                     parquet_set, data):
    """kill -9 mid-run leaves no half part a reader accepts; the same command with two
    processes of two loader workers finishes it, each image once, with the content of a
    one-process run on the path list: from parquet rows too (one part per row group)."""
    out = tmp_path / 'latents'
    train_set = str(assets.train if data == 'path list' else parquet_set)
    argv = [sys.executable, str(ROOT / 'precompute_latents.py'),
            *precompute_args(assets, out, '--shard-size', '1', '--train-set', train_set)]
    process = subprocess.Popen(argv, cwd=tmp_path, env=subprocess_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(out.glob('parts/part-*/part.json')) and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = len(list(out.glob('parts/part-*/part.json')))
    bad = 1 if data == 'path list' else 2  # bad.png; a corrupt row and an empty one
    assert 0 < done < N + bad and not (out / latent_cache.MANIFEST).exists()
    with pytest.raises(Exception, match='unfinished latent cache'):
        latent_cache.read_manifest(out)

    result = subprocess.run([*argv, '--num-gpus', '2', '--num-workers', '2'], cwd=tmp_path,
                            env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'on 2 process(es); this one has' in result.stderr
    assert not list(out.glob('parts/.*'))  # no temp part left behind
    ours, reference = records(out), records(cached)
    if data == 'parquet':
        ours = {as_path(key, assets): record for key, record in ours.items()}
    assert sorted(ours) == sorted(reference)
    for key in ours:  # equal up to fp16 rounding (images were encoded in other batches)
        for name in ('mean', 'std', 'embed'):
            torch.testing.assert_close(ours[key][name], reference[key][name])
    manifest = latent_cache.read_manifest(out)
    assert (manifest['images'], manifest['skipped'], manifest['parts']) == (N, bad, N + bad)
    assert manifest['autoencoder_scale'] == pytest.approx(
        latent_cache.read_manifest(cached)['autoencoder_scale'], rel=1e-6)


def test_a_rerun_encodes_only_the_parts_an_interrupted_run_left_unfinished(
        assets, cached, tmp_path, monkeypatch, capsys):
    """Parts 0 and 2 finished, 1 and 3 not (two processes, the second killed at once).
    Parts 1 and 3 are the list's paths 5-9 (one unreadable) and 15-16, from 0: the rerun
    encodes those 6 images, in batches of --batch-size 4 lines (3 readable in each),
    writes parts 1 and 3 only, leaves 0 and 2 as they were, and ends with the cache of
    an uninterrupted run, printed with --json. It loads on --num-workers 0 and runs on
    --device cpu (the default device here is made one that cannot run)."""
    out = tmp_path / 'latents'
    shutil.copytree(cached, out)
    for unit in (1, 3):
        shutil.rmtree(latent_cache.part_dir(out, unit))
    for name in (latent_cache.MANIFEST, 'index.json'):
        (out / name).unlink()
    finished = {unit: os.stat(latent_cache.part_dir(out, unit) / 'part.json')
                for unit in (0, 2)}
    encoded, written, loaders = [], [], []
    encode, write_part = precompute.encode, latent_cache.write_part
    loader = precompute.data.DataLoader

    def encode_spy(ae_model, cloob, images, texts):
        encoded.append(len(images))
        return encode(ae_model, cloob, images, texts)

    def write_part_spy(root, unit, *args):
        written.append(unit)
        return write_part(root, unit, *args)

    def loader_spy(*args, **kwargs):
        loaders.append(kwargs['num_workers'])
        return loader(*args, **kwargs)
    monkeypatch.setattr(precompute, 'encode', encode_spy)
    monkeypatch.setattr(latent_cache, 'write_part', write_part_spy)
    monkeypatch.setattr(precompute.data, 'DataLoader', loader_spy)
    monkeypatch.setattr(cli, 'default_device', lambda: torch.device('meta'))
    argv = precompute_args(assets, out, '--json')
    with pytest.warns(UserWarning, match='skipping unreadable image'):
        assert tiny.exit_code(precompute_latents.main, 'precompute_latents.py', argv) == 0
    assert (encoded, written, loaders) == ([3, 3], [1, 3], [0])
    for unit, before in finished.items():
        after = os.stat(latent_cache.part_dir(out, unit) / 'part.json')
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    ours, reference = records(out), records(cached)
    assert sorted(ours) == sorted(reference)
    for key in ours:
        for name in ('mean', 'std', 'embed'):
            torch.testing.assert_close(ours[key][name], reference[key][name])
    manifest = latent_cache.read_manifest(out)
    assert (manifest['images'], manifest['skipped'], manifest['parts']) == (N, 1, 4)
    assert json.loads(capsys.readouterr().out) == manifest


def test_precompute_asks_fabric_for_the_nodes_and_processes_of_its_flags(assets, tmp_path,
                                                                          monkeypatch):
    """Several nodes cannot run in a test: the Fabric the run asks for is checked (two
    nodes of one CPU process each need a DDP strategy)."""
    import lightning_fabric
    from lightning_fabric.strategies import DDPStrategy
    asked = {}

    class Asked(Exception):
        pass

    def fabric(**kwargs):
        asked.update(kwargs)
        raise Asked
    monkeypatch.setattr(lightning_fabric, 'Fabric', fabric)
    with pytest.raises(Asked):
        precompute_latents.main(precompute_args(assets, tmp_path / 'latents', '--num-nodes', '2'))
    assert (asked['accelerator'], asked['devices'], asked['num_nodes']) == ('cpu', 1, 2)
    assert isinstance(asked['strategy'], DDPStrategy)


EPOCHS_DRIVER = '''
import sys, torch
import ccld.train.diffusion_module
import train_latent_diffusion
from ccld.train import run as train
seen, training_step = [], ccld.train.diffusion_module.LightningDiffusion.training_step

def spy(self, batch, batch_idx):  # the keys of each batch of this rank, by epoch
    seen.append((self.current_epoch, list(batch["keys"]), batch["skipped"]))
    return training_step(self, batch, batch_idx)

ccld.train.diffusion_module.LightningDiffusion.training_step = spy
args = train_latent_diffusion.parser().parse_args(sys.argv[2:])
trainer, module = train.run(train.validate(args))
torch.save(seen, f"{sys.argv[1]}/seen{trainer.global_rank}.pt")
'''


@pytest.mark.parametrize('data', ['tar shards', 'cache', 'parquet'])
def test_two_ranks_with_two_workers_see_every_sample_once_per_epoch(assets, parquet_set,
                                                                    tmp_path, data):
    """4 tar shards of 4 images, or their cache: each of 2 ranks x 2 workers has a shard
    per epoch, 2 batches of 2, so 2 epochs are 8 steps. The images as 18 parquet rows, two
    of them bad: each rank has 9 rows an epoch, 5 batches (the last of one), 10 steps."""
    steps = 10 if data == 'parquet' else 8
    if data == 'cache':
        latents = tmp_path / 'latents'
        assert tiny.exit_code(precompute_latents.main, 'precompute_latents.py', precompute_args(
            assets, latents, '--train-set', str(assets.tars))) == 0
        input_flags = ['--train-latents', str(latents)]
    else:
        input_flags = ['--train-set', str(assets.tars if data == 'tar shards' else parquet_set)]
    driver = tmp_path / 'driver.py'
    driver.write_text(EPOCHS_DRIVER)
    argv = train_args(assets, 'unused', tmp_path / 'out', '--num-gpus', '2', '--batch-size', '2',
                      '--num-workers', '2', '--max-steps', str(steps),
                      '--checkpoint-every', '100')
    argv[:2] = input_flags
    result = subprocess.run([sys.executable, str(driver), str(tmp_path), *argv], cwd=tmp_path,
                            env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = [torch.load(tmp_path / f'seen{r}.pt') for r in (0, 1)]
    assert [len(s) for s in seen] == [steps, steps]
    for epoch in (0, 1):
        keys = [k for s in seen for e, batch, _ in s if e == epoch for k in batch]
        assert sorted(k.rpartition(':')[2] for k in keys) == [f'{i:09}' for i in range(N)], \
            (epoch, keys)
        skipped = sum(n for s in seen for e, _, n in s if e == epoch)
        assert skipped == (2 if data == 'parquet' else 0)

"""train_autoencoder.py end to end on a tiny KL autoencoder on the CPU: what a decoder-only
finetune keeps (the encoder bit for bit, and so the latents, caches and U-Nets made with
it), what --full changes, validation, the discriminator's start, and long-run survival."""

import csv
import logging
import math
import signal
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

import precompute_latents
import sample
import tiny
import train_autoencoder
import train_latent_diffusion
from ccld.data import latent_cache
from ccld.data.images import image_transform, load_image
from ccld.models import perceptual
from ccld.models.autoencoder import (build_autoencoder, describe, load_autoencoder, read_config,
                                     save_autoencoder)
from ccld.models.checkpoint_files import safe_load
from ccld.sample import generate
from ccld.train import autoencoder_module, runner
from ccld.train.quickstart import CONFIGS
from ldm.modules.losses import LPIPSWithDiscriminator

ROOT = Path(__file__).resolve().parent.parent
PROG = 'train_autoencoder.py'
SIZE = 64


def start_autoencoder(path):
    """The tiny autoencoder, saved with a discriminator and log-variance beside it as CompVis
    checkpoints carry them (loss.*)."""
    config = read_config(CONFIGS / 'tiny_autoencoder.yaml')
    torch.manual_seed(0)
    model = build_autoencoder(config)
    loss = LPIPSWithDiscriminator(disc_start=0, perceptual_weight=0)
    save_autoencoder(model, config, path, {f'loss.{k}': v for k, v in loss.state_dict().items()})
    return str(path)


@pytest.fixture(scope='module')
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp('autoencoder')
    paths = tiny.make_images(d / 'images', n=16, size=SIZE)
    (d / 'bad.png').write_text('not an image')
    g = torch.Generator().manual_seed(0)
    lpips_state = {k: 0.05 * torch.randn(v.shape, generator=g)
                   for k, v in perceptual.build_lpips('meta').state_dict().items()}
    torch.save(dict(lpips_state, **perceptual.scaling_constants()), d / 'lpips.pth')
    return SimpleNamespace(
        dir=d, paths=paths, train=tiny.write_path_list([*paths[:12], *[d / 'bad.png'] * 4],
                                                       d / 'train.txt'),
        val=tiny.write_path_list(paths[12:], d / 'val.txt'), lpips=d / 'lpips.pth',
        autoencoder=start_autoencoder(d / 'start_ae'), cloob=str(tiny.tiny_cloob(d)))


def ae_args(assets, out, name, *extra):
    """A 4-step decoder-only run in 2-image batches; later flags in `extra` override these."""
    return ['--train-set', str(assets.train), '--vqgan-model', assets.autoencoder,
            '--output-name', str(name), '--output-dir', str(out), '--accelerator', 'cpu',
            '--num-workers', '0', '--batch-size', '2', '--image-size', str(SIZE),
            '--max-steps', '4', '--checkpoint-every', '1000', '--perceptual-weight', '0',
            '--disc-start', '100', '--seed', '0', *extra]


def run_cli(argv):
    return tiny.exit_code(train_autoencoder.main, PROG, argv)


def state_of(path):
    return safe_load(path, mmap=False)['state_dict']


def part(state, *prefixes):
    return {k: v for k, v in state.items() if k.startswith(prefixes)}


def assert_same(a, b):
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), key


def metrics(out):
    with open(out / 'logs' / 'version_0' / 'metrics.csv') as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope='module')
def decoder_run(assets, tmp_path_factory):
    """Decoder-only with LPIPS and validation; the discriminator joins at step 2."""
    d = tmp_path_factory.mktemp('decoder_run')
    argv = ae_args(assets, d / 'out', d / 'art_ae', '--perceptual-weight', '1',
                   '--lpips-weights', str(assets.lpips), '--disc-start', '2',
                   '--val-set', str(assets.val), '--val-every', '2', '--lr', '1e-3')
    assert run_cli(argv) == 0
    return SimpleNamespace(out=d / 'out', name=str(d / 'art_ae'))


@pytest.fixture(scope='module')
def full_run(assets, tmp_path_factory):
    """--full, two steps of two batches each, no LPIPS, the discriminator never on."""
    d = tmp_path_factory.mktemp('full_run')
    out = d / 'out'
    argv = ae_args(assets, out, d / 'full_ae', '--full', '--max-steps', '2', '--lr', '1e-3',
                   '--accumulate-grad-batches', '2')
    said = Said()
    logging.getLogger('pytorch_lightning').addHandler(said)
    try:
        assert run_cli(argv) == 0
    finally:
        logging.getLogger('pytorch_lightning').removeHandler(said)
    return SimpleNamespace(out=out, name=str(d / 'full_ae'), said=said.lines)


class Said(logging.Handler):
    """What a run said through Lightning's rank-zero log."""

    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture(scope='module')
def cache(assets, tmp_path_factory):
    """A latent cache made with the starting autoencoder, before any finetune."""
    out = tmp_path_factory.mktemp('cache') / 'latents'
    assert tiny.exit_code(precompute_latents.main, 'precompute_latents.py', [
        '--train-set', str(assets.train), '--vqgan-model', assets.autoencoder,
        '--cloob-checkpoint', assets.cloob, '--output', str(out), '--image-size', str(SIZE),
        '--batch-size', '4', '--num-workers', '0', '--device', 'cpu']) == 0
    return out


def test_decoder_only_keeps_the_encoder_bit_identical_and_the_latents_unchanged(assets,
                                                                                decoder_run):
    start, tuned = state_of(f'{assets.autoencoder}.ckpt'), state_of(f'{decoder_run.name}.ckpt')
    assert_same(part(start, 'encoder.', 'quant_conv.'), part(tuned, 'encoder.', 'quant_conv.'))
    changed = [k for k in part(start, 'decoder.', 'post_quant_conv.')
               if not torch.equal(start[k], tuned[k])]
    assert len(changed) > 10
    image = image_transform(SIZE)(load_image(assets.paths[0]))[None] * 2 - 1
    a, b = load_autoencoder(assets.autoencoder), load_autoencoder(decoder_run.name)
    with torch.no_grad():
        pa, pb = a.encode(image), b.encode(image)
        assert torch.equal(pa.mean, pb.mean) and torch.equal(pa.std, pb.std)
        assert not torch.equal(a.decode(pa.mean), b.decode(pb.mean))
    # NAME.ckpt carries the loss as CompVis checkpoints do, and NAME.yaml its lineage.
    assert {'loss.logvar', 'loss.discriminator.main.0.weight',
            'loss.perceptual_loss.net.slice1.0.weight'} <= tuned.keys()
    lineage = OmegaConf.load(f'{decoder_run.name}.yaml')['ccld']
    assert lineage['trained'] == 'decoder' and lineage['steps'] == 4
    assert list(lineage['same_encoder_as']) == [describe(assets.autoencoder)['sha256']]


def test_the_discriminator_trains_from_disc_start_on_and_not_before(assets, decoder_run,
                                                                    full_run):
    start = part(state_of(f'{assets.autoencoder}.ckpt'), 'loss.discriminator.')
    # It starts from the checkpoint's, and with --disc-start 100 it never moves, not even
    # its batch-norm statistics, and Adam holds no state for it.
    full = safe_load(full_run.out / 'checkpoints' / 'last.ckpt', mmap=False)
    assert_same(start, part(full['state_dict'], 'loss.discriminator.'))
    batches = full['loops']['fit_loop']['epoch_loop.batch_progress']['total']['completed']
    assert (full['global_step'], batches) == (2, 4)  # (--accumulate-grad-batches 2)
    groups = full['optimizer_states'][0]['param_groups']
    assert [g['name'] for g in groups] == ['autoencoder', 'discriminator']
    assert not set(groups[1]['params']) & set(full['optimizer_states'][0]['state'])
    # From --disc-start 2 on it trains, and its loss is logged.
    tuned = part(state_of(decoder_run.out / 'checkpoints' / 'last.ckpt'), 'loss.discriminator.')
    assert any(not torch.equal(start[k], tuned[k]) for k in start)
    logged = [r for r in metrics(decoder_run.out) if r['train/disc_loss']]
    assert logged and all(int(r['step']) >= 2 for r in logged)


def test_grad_clip_clips_the_autoencoder_and_the_discriminator_each_to_its_own_norm():
    """A step with the discriminator on: each network's gradient, both over the limit,
    comes out scaled to norm --grad-clip, its direction kept."""
    torch.manual_seed(0)
    clip = 1e-3
    module = autoencoder_module.LightningAutoencoder(
        build_autoencoder(read_config(CONFIGS / 'tiny_autoencoder.yaml')),
        LPIPSWithDiscriminator(disc_start=0, perceptual_weight=0), grad_clip=clip)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # (self.log without a trainer)
        module.loss_of(torch.rand(2, 3, SIZE, SIZE), step=0, disc_on=True).backward()
    optimizer = module.configure_optimizers()
    groups = [[p for p in group['params'] if p.grad is not None]
              for group in optimizer.param_groups]
    before = [[p.grad.clone() for p in group] for group in groups]
    norms = [math.sqrt(sum(g.double().square().sum().item() for g in grads)) for grads in before]
    assert min(norms) > 10 * clip and all(groups)
    module.on_before_optimizer_step(optimizer)
    for group, grads, norm in zip(groups, before, norms):
        for p, g in zip(group, grads):
            torch.testing.assert_close(p.grad, g * (clip / norm), rtol=1e-4, atol=1e-12)


def test_validation_logs_the_starting_values_at_step_0_then_every_val_every(assets, decoder_run):
    rows = {int(r['step']): r for r in metrics(decoder_run.out) if r['val/psnr']}
    assert sorted(rows) == [0, 2, 4]
    assert all(r['val/l1'] and r['val/lpips'] for r in rows.values())
    # Step 0 is the starting autoencoder, computed here independently.
    images = torch.stack([image_transform(SIZE)(load_image(p)) for p in assets.paths[12:]])
    ae = load_autoencoder(assets.autoencoder)
    with torch.no_grad():
        rec = ((ae.decode(ae.encode(images * 2 - 1).mean) + 1) / 2).clamp(0, 1)
    mse = [((x - y) ** 2).mean().item() for x, y in zip(images, rec)]
    psnr = sum(10 * math.log10(1 / m) for m in mse) / len(mse)
    assert float(rows[0]['val/psnr']) == pytest.approx(psnr, rel=1e-5)
    assert float(rows[0]['val/l1']) == pytest.approx((images - rec).abs().mean().item(), rel=1e-5)
    # The grids: 4 inputs above their 4 reconstructions, one per validation.
    from PIL import Image
    grids = sorted((decoder_run.out / 'reconstructions').glob('*.png'))
    assert [g.name for g in grids] == [f'reconstructions_{s:08}.png' for s in (0, 2, 4)]
    assert Image.open(grids[0]).size == (4 * SIZE, 2 * SIZE)


def test_train_loss_is_per_pixel_beside_latent_diffusions_summed_total(decoder_run):
    rows = [r for r in metrics(decoder_run.out) if r['train/loss']]
    assert rows
    for row in rows:
        per_pixel = float(row['train/total_loss']) / (3 * SIZE * SIZE)
        assert float(row['train/loss']) == pytest.approx(per_pixel, rel=1e-5)
        assert float(row['train/loss']) < 10 * float(row['train/rec_loss'])


def test_unreadable_training_images_are_skipped_and_counted(decoder_run):
    counts = [float(r['train/skipped_images']) for r in metrics(decoder_run.out)
              if r['train/skipped_images']]
    assert counts and max(counts) >= 1


def train_diffusion_argv(assets, data, autoencoder, out):
    return [*data, '--vqgan-model', autoencoder, '--autoencoder-scale', '1.5',
            '--cloob-checkpoint', assets.cloob, '--demo-prompts', str(ROOT / 'demo_prompts.txt'),
            '--output-dir', str(out), '--accelerator', 'cpu', '--num-workers', '0',
            '--batch-size', '2', '--base-channels', '64', '--channel-multipliers', '1,1,1,1',
            '--image-size', str(SIZE), '--max-steps', '1', '--demo-every', '1000',
            '--demo-steps', '2', '--seed', '0']


def test_a_cache_made_before_a_decoder_only_finetune_trains_with_it_and_not_after_full(
        assets, cache, decoder_run, full_run, tmp_path, capsys):
    data = ['--train-latents', str(cache)]
    argv = train_diffusion_argv(assets, data, decoder_run.name, tmp_path / 'tuned')
    assert tiny.exit_code(train_latent_diffusion.main, 'train', argv) == 0
    checkpoint = safe_load(tmp_path / 'tuned' / 'checkpoints' / 'last.ckpt')
    assert checkpoint['ccld']['autoencoder_encoder_sha256'] == \
        describe(assets.autoencoder)['encoder_sha256']
    argv = train_diffusion_argv(assets, data, full_run.name, tmp_path / 'full')
    assert tiny.exit_code(train_latent_diffusion.main, 'train', argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f'was made with autoencoder {assets.autoencoder}' in err[0]


def test_a_cache_recorded_before_encoder_digests_is_judged_by_the_finetunes_lineage(
        assets, cache, decoder_run, full_run):
    manifest = latent_cache.read_manifest(cache)
    old = dict(manifest, autoencoder={k: manifest['autoencoder'][k]
                                      for k in ('name', 'config', 'checkpoint', 'sha256')})
    settings = {'image_size': SIZE, 'cloob': manifest['cloob']}
    latent_cache.check_matches(old, dict(settings, autoencoder=describe(decoder_run.name)), cache)
    with pytest.raises(Exception, match='was made with autoencoder'):
        latent_cache.check_matches(old, dict(settings, autoencoder=describe(full_run.name)), cache)


def test_the_finetune_loads_in_precompute_and_makes_the_original_latents(
        assets, cache, decoder_run, tmp_path):
    out = tmp_path / 'latents'
    assert tiny.exit_code(precompute_latents.main, 'precompute_latents.py', [
        '--train-set', str(assets.train), '--vqgan-model', decoder_run.name,
        '--cloob-checkpoint', assets.cloob, '--output', str(out), '--image-size', str(SIZE),
        '--batch-size', '4', '--num-workers', '0', '--device', 'cpu']) == 0
    from litdata import StreamingDataset
    by_key = [{latent_cache.decode_key(r['key']): r for r in StreamingDataset(str(root))}
              for root in (cache, out)]
    assert by_key[0].keys() == by_key[1].keys()
    for key, record in by_key[0].items():
        assert torch.equal(record['mean'], by_key[1][key]['mean'])


def test_sampling_a_unet_of_the_original_through_the_finetuned_decoder(
        assets, decoder_run, full_run, tmp_path):
    start = describe(assets.autoencoder)
    old_record = {'autoencoder': assets.autoencoder, 'autoencoder_sha256': start['sha256']}
    new_record = dict(old_record, autoencoder_encoder_sha256=start['encoder_sha256'])
    ckpt = tiny.save_ccld_checkpoint(tmp_path / 'run.ckpt', tiny.tiny_diffusion(),
                                     tiny.tiny_diffusion(), new_record)
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # no warning: the encoder is the one it was trained on
        assert tiny.exit_code(sample.main, 'sample.py', [
            'a fox', '--checkpoint', str(ckpt), '--autoencoder', decoder_run.name,
            '--cloob-checkpoint', assets.cloob, '-n', '1', '--steps', '2', '--size', str(SIZE),
            '--method', 'ddim', '--no-grid', '--device', 'cpu',
            '--output-dir', str(tmp_path / 'out')]) == 0
        generate.check_frozen_models(old_record, decoder_run.name, assets.cloob, 'run.ckpt')
    assert (tmp_path / 'out' / 'out_00000.png').is_file()
    for record in (old_record, new_record):
        with pytest.warns(UserWarning, match='was trained with autoencoder'):
            generate.check_frozen_models(record, full_run.name, assets.cloob, 'run.ckpt')


def test_full_changes_the_encoder_says_so_and_prints_the_new_scale(assets, full_run):
    start, tuned = state_of(f'{assets.autoencoder}.ckpt'), state_of(f'{full_run.name}.ckpt')
    assert any(not torch.equal(start[k], tuned[k]) for k in part(start, 'encoder.'))
    lineage = OmegaConf.load(f'{full_run.name}.yaml')['ccld']
    assert lineage['trained'] == 'encoder and decoder' and list(lineage['same_encoder_as']) == []
    assert describe(full_run.name)['encoder_sha256'] != \
        describe(assets.autoencoder)['encoder_sha256']
    said = '\n'.join(full_run.said)
    assert 'the latent space will change, so U-Nets and latent caches made with' in said
    scale = lineage['autoencoder_scale']
    assert scale > 0 and f'train with --autoencoder-scale {scale:.6g}' in said


def test_a_missing_lpips_weight_offline_is_one_line_exit_2(assets, tmp_path, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise AssertionError('a model was loaded before the flags were checked')
    monkeypatch.setattr('ccld.models.autoencoder.load_autoencoder', refuse)
    monkeypatch.setattr(torch.hub, 'get_dir', lambda: str(tmp_path / 'hub'))
    monkeypatch.setattr(perceptual, 'VGG16_URL', 'http://127.0.0.1:9/vgg16-397923af.pth')
    argv = ae_args(assets, tmp_path / 'out', tmp_path / 'ae', '--perceptual-weight', '1')
    assert run_cli(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f'{PROG}: error: LPIPS needs torchvision\'s VGG16')
    assert f'into {tmp_path / "hub" / "checkpoints"}/' in err[0] and '--lpips-weights' in err[0]
    assert run_cli([*argv, '--lpips-weights', str(tmp_path / 'nowhere.pth')]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'nowhere.pth does not exist' in err[0]


@pytest.mark.parametrize('extra, message', [
    (['--output-name', '{ae}'], '--output-name names the --vqgan-model it starts from'),
    (['--image-size', '60'], '--image-size 60 must be a multiple of 8'),
    (['--vqgan-model', '{dir}/none'], '--vqgan-model: {dir}/none.yaml does not exist'),
    (['--val-set', '{dir}/missing.txt'], '--val-set: path list {dir}/missing.txt does not exist'),
])
def test_usage_errors_are_one_line_before_any_model_loads(assets, tmp_path, monkeypatch, capsys,
                                                          extra, message):
    def refuse(*args, **kwargs):
        raise AssertionError('a model was loaded before the flags were checked')
    monkeypatch.setattr('ccld.models.autoencoder.load_autoencoder', refuse)
    fill = lambda s: s.format(ae=assets.autoencoder, dir=assets.dir)  # noqa: E731
    assert run_cli(ae_args(assets, tmp_path / 'out', tmp_path / 'ae', *map(fill, extra))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fill(message) in err[0], err


def test_a_finished_run_leaves_no_lock_file_and_a_refused_one_no_empty_folder(
        assets, decoder_run, tmp_path, capsys):
    assert decoder_run.out.is_dir() and not (decoder_run.out / '.lock').exists()
    argv = ae_args(assets, tmp_path / 'runs' / 'out', tmp_path / 'names' / 'ae',
                   '--train-set', str(tmp_path / 'missing.txt'))
    assert run_cli(argv) == 2
    assert 'missing.txt does not exist' in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_continuing_another_run_over_this_ones_checkpoints_or_autoencoder_is_refused(
        assets, decoder_run, full_run, tmp_path, capsys):
    """--resume-from another run's checkpoint would write over the run in --output-dir, or
    over the autoencoder --output-name names; continuing the run there is let through."""
    other = full_run.out / 'checkpoints' / 'last.ckpt'
    for out, name, taken in ((decoder_run.out, tmp_path / 'ae', decoder_run.out / 'checkpoints'),
                             (tmp_path / 'out', decoder_run.name, f'{decoder_run.name}.ckpt')):
        before = sorted((p.name, p.stat().st_mtime_ns) for p in decoder_run.out.rglob('*'))
        assert run_cli(ae_args(assets, out, name, '--resume-from', str(other), '--full')) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f'{taken}' in err[0] and '--resume-from auto' in err[0], err
        assert sorted((p.name, p.stat().st_mtime_ns) for p in decoder_run.out.rglob('*')) == before
    args = train_autoencoder.parser().parse_args(ae_args(assets, decoder_run.out, tmp_path / 'ae'))
    args.resume_from = str(decoder_run.out / 'checkpoints' / 'last.ckpt')
    runner.claim_output_dir(args.output_dir, args.resume_from).close()


def test_a_non_finite_step_is_skipped_and_counted_on_tar_shards(assets, tmp_path, monkeypatch):
    from test_latent_cache import write_tar_shards
    shards = write_tar_shards(assets.paths[:8], tmp_path / 'shards', per_shard=4)
    generator_loss, calls = LPIPSWithDiscriminator.generator_loss, []

    def nan_once(self, *args, **kwargs):
        calls.append(None)
        loss, log = generator_loss(self, *args, **kwargs)
        return (loss * float('nan') if len(calls) == 2 else loss), log
    monkeypatch.setattr(LPIPSWithDiscriminator, 'generator_loss', nan_once)
    seen = []
    step = autoencoder_module.LightningAutoencoder.optimizer_step_or_skip

    def record(self, disc_on):
        before = self.autoencoder.decoder.conv_out.weight.clone()
        step(self, disc_on)
        seen.append((self.global_step,
                     torch.equal(before, self.autoencoder.decoder.conv_out.weight)))
    monkeypatch.setattr(autoencoder_module.LightningAutoencoder, 'optimizer_step_or_skip', record)
    argv = ae_args(assets, tmp_path / 'out', tmp_path / 'ae', '--train-set', str(shards),
                   '--max-steps', '2', '--val-every', '1')  # (and so log every step)
    assert run_cli(argv) == 0
    assert seen == [(1, False), (1, True), (2, False)]  # the NaN batch made no step
    rows = [r for r in metrics(tmp_path / 'out') if r['train/skipped_steps']]
    assert rows and float(rows[-1]['train/skipped_steps']) == 1


def test_sigterm_saves_writes_the_autoencoder_and_resume_auto_continues(assets, tmp_path):
    from test_survival import stderr_of, subprocess_env, wait_for
    out, name = tmp_path / 'out', tmp_path / 'art_ae'
    argv = ae_args(assets, out, name, '--max-steps', '1000', '--checkpoint-every', '2')
    (tmp_path / 'a').mkdir()
    with open(tmp_path / 'a' / 'stdout.txt', 'w') as so, \
            open(tmp_path / 'a' / 'stderr.txt', 'w') as se:
        process = subprocess.Popen([sys.executable, str(ROOT / 'train_autoencoder.py'), *argv],
                                   cwd=tmp_path / 'a', stdout=so, stderr=se,
                                   env=subprocess_env(), start_new_session=True)
        wait_for(lambda: (out / 'checkpoints' / 'step=00000002.ckpt').is_file())
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 143, stderr_of(tmp_path / 'a')
    last = safe_load(out / 'checkpoints' / 'last.ckpt', mmap=False)
    k = last['global_step']
    assert k >= 2 and f'stopped by SIGTERM at step {k}' in stderr_of(tmp_path / 'a')
    # NAME holds the autoencoder of the step saved.
    written = part(state_of(f'{name}.ckpt'), 'encoder.', 'decoder.', 'quant_conv.',
                   'post_quant_conv.')
    assert_same(part(last['state_dict'], 'autoencoder.'),
                {f'autoencoder.{key}': value for key, value in written.items()})
    # The same command with --resume-from auto continues at step k, with the optimizer.
    resumed = ae_args(assets, out, name, '--max-steps', str(k + 1), '--resume-from', 'auto')
    assert run_cli(resumed) == 0
    again = safe_load(out / 'checkpoints' / 'last.ckpt', mmap=False)
    assert again['global_step'] == k + 1
    assert OmegaConf.load(f'{name}.yaml')['ccld']['steps'] == k + 1
    # A run that trained another part is not continued by this one.
    assert run_cli([*resumed, '--full']) == 2


# A number of loader workers that is not the default (one per usable CPU).
WORKERS = 1 if train_autoencoder.parser().get_default('num_workers') != 1 else 2


@pytest.fixture(scope='module')
def set_up(assets, tmp_path_factory):
    """train_autoencoder.py with every flag at a value other than its default, up to where
    it would train."""
    d = tmp_path_factory.mktemp('set_up')
    argv = ae_args(assets, d / 'out', d / 'set_up_ae', '--num-workers', str(WORKERS),
                   '--prefetch-factor', '3', '--random-flip', '--decoder-only',
                   '--kl-weight', '0.25', '--disc-start', '7', '--disc-weight', '0.75',
                   '--perceptual-weight', '0.5', '--lpips-weights', str(assets.lpips),
                   '--val-set', str(assets.val), '--val-every', '5', '--val-images', '3',
                   '--lr', '2e-4', '--lr-warmup-steps', '2', '--lr-schedule', 'cosine',
                   '--lr-min', '1e-5', '--max-steps', '6', '--accumulate-grad-batches', '3',
                   '--grad-clip', '0.5', '--max-bad-steps', '4', '--seed', '7',
                   '--checkpoint-every', '9', '--checkpoint-minutes', '2', '--keep-last', '2',
                   '--signal', 'SIGUSR2', '--wandb-project', 'ae-flags', '--num-gpus', '2',
                   '--num-nodes', '3', '--strategy', 'ddp_spawn', '--fprecision', 'bf16')
    seen = tiny.set_up_run(train_autoencoder.main, argv)
    seen.out, seen.name = d / 'out', d / 'set_up_ae'
    return seen


def lpips_is_the_files(run, assets):
    """Its VGG16 trunk holds the file's weights."""
    state, own = torch.load(assets.lpips), run.module.loss.perceptual_loss.state_dict()
    trunk = [k for k in own if k.startswith('net.')]
    return trunk and all(torch.equal(own[k], state[k]) for k in trunk)


def trains_the_decoder_alone(run):
    trained = {id(p) for p in run.module.configure_optimizers().param_groups[0]['params']}
    encoder = [p for m in (run.module.autoencoder.encoder, run.module.autoencoder.quant_conv)
               for p in m.parameters()]
    return not run.module.train_encoder and encoder and not {id(p) for p in encoder} & trained


# (1e-5 + (2e-4 - 1e-5) (1 + cos(pi (step - 2) / (6 - 2))) / 2 after the 2-step warmup.)
COSINE_LRS = [1e-4, 2e-4, 1.05e-4, 1e-5]
AE_SET_UP = {  # flag -> what set_up must show for the value it gave
    '--vqgan-model': lambda run, a: run.module.record['start']['name'] == a.autoencoder,
    '--output-name': lambda run, a: run.module.record['output_name'] == str(run.name),
    '--decoder-only': lambda run, a: trains_the_decoder_alone(run),
    '--train-set': lambda run, a: run.loader.dataset.paths == a.train.read_text().split('\n')[:-1],
    '--image-size': lambda run, a: run.loader.dataset[0][1].shape == (3, SIZE, SIZE),
    '--batch-size': lambda run, a: run.loader.batch_size == 2,
    '--num-workers': lambda run, a: run.loader.num_workers == WORKERS,
    '--prefetch-factor': lambda run, a: run.loader.prefetch_factor == 3,
    '--random-flip': lambda run, a: 'RandomHorizontalFlip' in repr(run.loader.dataset.transform),
    '--kl-weight': lambda run, a: run.module.loss.kl_weight == 0.25,
    '--disc-start': lambda run, a: run.module.loss.disc_start == 7,
    '--disc-weight': lambda run, a: run.module.loss.disc_weight == 0.75,
    '--perceptual-weight': lambda run, a: run.module.loss.perceptual_weight == 0.5,
    '--lpips-weights': lpips_is_the_files,
    '--val-set': lambda run, a: 'Reconstructions' in run.callbacks,
    '--val-every': lambda run, a: run.callbacks['Reconstructions'].every == 5,
    '--val-images': lambda run, a: len(run.callbacks['Reconstructions'].images) == 3,
    **dict.fromkeys(['--lr', '--lr-warmup-steps', '--lr-schedule', '--lr-min', '--max-steps'],
                    lambda run, a: tiny.learning_rates(run.module, [1, 2, 4, 6]) == pytest.approx(
                        COSINE_LRS, rel=1e-9)),
    '--accumulate-grad-batches': lambda run, a: run.module.accumulate == 3,
    '--grad-clip': lambda run, a: run.module.grad_clip == 0.5,
    '--max-bad-steps': lambda run, a: run.module.max_bad_steps == 4,
    '--output-dir': lambda run, a: (run.trainer['default_root_dir'],
                                    run.callbacks['Checkpoints'].dirpath) == (
                                        str(run.out), str(run.out / 'checkpoints')),
    '--seed': lambda run, a: run.seed == 7,
    '--checkpoint-every': lambda run, a: run.callbacks['Checkpoints']._every_n_train_steps == 9,
    '--checkpoint-minutes': lambda run, a: run.callbacks['TimedLastCheckpoint'].seconds == 120,
    '--keep-last': lambda run, a: run.callbacks['Checkpoints'].save_top_k == 2,
    '--signal': lambda run, a: signal.SIGUSR2 in run.callbacks['StopOnSignal'].signals,
    '--wandb-project': lambda run, a: run.trainer['logger'].name == 'ae-flags',
    '--num-gpus': lambda run, a: run.trainer['devices'] == 2,
    '--num-nodes': lambda run, a: run.trainer['num_nodes'] == 3,
    '--accelerator': lambda run, a: run.trainer['accelerator'] == 'cpu',
    '--strategy': lambda run, a: run.trainer['strategy'] == 'ddp_spawn',
    '--fprecision': lambda run, a: run.trainer['precision'] == 'bf16-mixed',
}


@pytest.mark.parametrize('flag', AE_SET_UP)
def test_each_flag_reaches_the_trainer_module_loss_loader_or_callback_it_sets(
        assets, set_up, flag):
    """Each flag, given a value other than its default, is found where the run uses it.
    (--decoder-only names the default, so no run can tell it from its absence: this checks
    what it asks for.)"""
    assert AE_SET_UP[flag](set_up, assets)

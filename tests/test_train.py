"""train_latent_diffusion.py end to end on tiny random models, on the CPU."""

import copy
import csv
import hashlib
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

import tiny
import train_latent_diffusion
from ccld.train import run as training_run, runner
from ccld.models.autoencoder import encoder_digest, load_autoencoder
from ccld.models.cloob import load_cloob
from ccld.train.demo_grids import DemoCallback
from ccld.train.ema import ema_decay, ema_update
from ccld.train import diffusion_module
from ccld.train.diffusion_module import LightningDiffusion
from ccld.models.unet import DiffusionModel

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ['a red circle', 'a blue square', 'a green field']
SCALE = 1.5


@pytest.fixture(scope='module')
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp('train')
    paths = tiny.make_images(d / 'images', n=16, size=64)
    (d / 'prompts.txt').write_text('\n'.join(PROMPTS) + '\n')
    return SimpleNamespace(dir=d, paths=paths,
                           train=tiny.write_path_list(paths, d / 'train.txt'),
                           autoencoder=tiny.tiny_autoencoder(d), cloob=tiny.tiny_cloob(d),
                           prompts=d / 'prompts.txt')


def train_args(assets, out, *extra):
    """A 4-step run of 4-image batches; later flags in `extra` override these."""
    return ['--train-set', str(assets.train), '--vqgan-model', assets.autoencoder,
            '--autoencoder-scale', str(SCALE), '--cloob-checkpoint', str(assets.cloob),
            '--demo-prompts', str(assets.prompts), '--output-dir', str(out),
            '--accelerator', 'cpu', '--num-workers', '0', '--batch-size', '4',
            '--base-channels', '64', '--channel-multipliers', '1,1,1,1', '--image-size', '64',
            '--max-steps', '4', '--checkpoint-every', '2', '--demo-every', '2',
            '--demo-steps', '2', '--seed', '0', *extra]


def train(argv):
    """The training CLI in this process; returns (trainer, module)."""
    return training_run.run(training_run.validate(train_latent_diffusion.parser().parse_args(argv)))


def run_cli(argv):
    return tiny.exit_code(train_latent_diffusion.main, train_latent_diffusion.PROG, argv)


def load(path):
    return torch.load(path, map_location='cpu', weights_only=False)


def sub_state(state, prefix):
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def assert_same_tensors(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def metrics(out):
    with open(out / 'logs' / 'version_0' / 'metrics.csv') as f:
        return list(csv.DictReader(f))


@pytest.fixture
def at_train_start(monkeypatch, caplog):
    """What the module holds when training starts (after any resume), step by step."""
    caplog.set_level(logging.INFO)
    seen = {}
    on_train_start = LightningDiffusion.on_train_start

    def spy(self):
        on_train_start(self)
        clone = lambda module: {k: v.clone() for k, v in module.state_dict().items()}  # noqa: E731
        seen.update(step=self.global_step, model=clone(self.model),
                    model_ema=clone(self.model_ema), ae_model=clone(self.ae_model),
                    optimizer=copy.deepcopy(self.trainer.optimizers[0].state_dict()))
    monkeypatch.setattr(LightningDiffusion, 'on_train_start', spy)
    return seen


@pytest.fixture(scope='module')
def first_run(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp('first_run')
    trainer, module = train(train_args(assets, out))
    return SimpleNamespace(out=out, trainer=trainer, module=module)


def test_a_run_writes_checkpoints_demo_grids_and_loss(first_run):
    checkpoints = first_run.out / 'checkpoints'
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        'last.ckpt', 'step=00000002.ckpt', 'step=00000004.ckpt']
    assert first_run.trainer.global_step == 4
    # A grid on the first step and every --demo-every steps: 3 prompts in one row of 4.
    demos = sorted(p.name for p in (first_run.out / 'demos').iterdir())
    assert demos == ['demo_00000001.png', 'demo_00000002.png', 'demo_00000004.png']
    with Image.open(first_run.out / 'demos' / demos[-1]) as grid:
        grid.load()
        assert grid.size == (3 * 64, 64)
        assert grid.text['prompts'].splitlines() == PROMPTS
    losses = [float(row['train/loss']) for row in metrics(first_run.out) if row.get('train/loss')]
    assert losses and all(0 < loss < 10 for loss in losses)


def test_checkpoints_leave_out_the_frozen_models_and_say_how_to_rebuild(first_run, assets):
    saved = load(first_run.out / 'checkpoints' / 'last.ckpt')
    prefixes = {key.split('.')[0] for key in saved['state_dict']}
    assert prefixes == {'model', 'model_ema'}
    digest = lambda path: hashlib.sha256(Path(path).read_bytes()).hexdigest()  # noqa: E731
    assert saved['ccld'] == {'autoencoder': assets.autoencoder, 'random_flip': False,
                             'cloob_checkpoint': str(assets.cloob), 'image_size': 64,
                             'base_channels': 64, 'channel_multipliers': [1, 1, 1, 1],
                             'autoencoder_scale': SCALE,
                             'autoencoder_sha256': digest(assets.autoencoder + '.ckpt'),
                             'autoencoder_encoder_sha256': encoder_digest(
                                 load_autoencoder(assets.autoencoder).state_dict()),
                             'cloob_checkpoint_sha256': digest(assets.cloob),
                             'train_set': str(assets.train),
                             'train_images': len(assets.train.read_text().split())}
    assert saved['global_step'] == 4
    assert float(saved['state_dict']['model_ema.autoencoder_scale']) == SCALE
    # The EMA copy is its own average: not the trained weights, and it moved since step 2.
    state, earlier = saved['state_dict'], load(first_run.out / 'checkpoints' / 'step=00000002.ckpt')
    key = 'net.0.main.0.weight'
    assert not torch.equal(state[f'model_ema.{key}'], state[f'model.{key}'])
    assert not torch.equal(state[f'model_ema.{key}'], earlier['state_dict'][f'model_ema.{key}'])


def test_frozen_models_stay_in_eval_mode_and_untrained(first_run, assets):
    module = first_run.module
    assert not module.ae_model.training and not module.cloob.training
    assert not module.model_ema.training
    fresh = load_autoencoder(assets.autoencoder)
    assert_same_tensors(module.ae_model.state_dict(), fresh.state_dict())
    assert_same_tensors(module.cloob.state_dict(), load_cloob(str(assets.cloob)).state_dict())


def test_resume_continues_at_the_exact_step_with_optimizer_ema_and_new_lr(
        first_run, assets, tmp_path, at_train_start, caplog):
    ckpt = first_run.out / 'checkpoints' / 'step=00000002.ckpt'
    saved = load(ckpt)
    trainer, _ = train(train_args(assets, tmp_path, '--resume-from', str(ckpt), '--lr', '1e-5'))
    assert 'a ccld training checkpoint' in caplog.text
    assert at_train_start['step'] == 2
    assert_same_tensors(at_train_start['model'], sub_state(saved['state_dict'], 'model.'))
    assert_same_tensors(at_train_start['model_ema'], sub_state(saved['state_dict'], 'model_ema.'))
    resumed, stored = at_train_start['optimizer'], saved['optimizer_states'][0]
    assert resumed['state'].keys() == stored['state'].keys() and stored['state']
    for index, state in stored['state'].items():
        for name in ('step', 'exp_avg', 'exp_avg_sq'):
            assert torch.equal(resumed['state'][index][name], state[name])
    assert stored['param_groups'][0]['lr'] == 3e-5
    assert resumed['param_groups'][0]['lr'] == 1e-5  # --lr wins over the checkpoint's LR
    # Two more steps, counted on from the checkpoint's.
    assert trainer.global_step == 4
    after = load(tmp_path / 'checkpoints' / 'step=00000004.ckpt')
    assert after['optimizer_states'][0]['param_groups'][0]['lr'] == 1e-5
    assert int(after['optimizer_states'][0]['state'][0]['step']) == 4
    assert not (tmp_path / 'checkpoints' / 'step=00000002.ckpt').exists()


def test_resume_from_a_checkpoint_of_the_original_script(
        first_run, assets, tmp_path, at_train_start, caplog):
    """A Lightning 1.5 checkpoint: frozen models inside, scale_factor, no 'ccld' record."""
    ours = load(first_run.out / 'checkpoints' / 'step=00000002.ckpt')
    ae, cloob = load_autoencoder(assets.autoencoder), load_cloob(str(assets.cloob))
    state = dict(ours['state_dict'])
    # Frozen weights in the file are ignored: the ones given on the command line are used.
    state.update({f'ae_model.{k}': torch.zeros_like(v) for k, v in ae.state_dict().items()})
    state.update({f'cloob.{k}': torch.zeros_like(v) for k, v in cloob.state_dict().items()})
    original = tmp_path / 'original.ckpt'
    torch.save({'epoch': 0, 'global_step': 2, 'pytorch-lightning_version': '1.5.10',
                'state_dict': state, 'callbacks': {}, 'optimizer_states': ours['optimizer_states'],
                'lr_schedulers': [], 'scale_factor': SCALE}, original)

    # A different --autoencoder-scale wins over the checkpoint's, with a note.
    trainer, module = train(train_args(assets, tmp_path / 'out', '--resume-from', str(original),
                                       '--max-steps', '3', '--autoencoder-scale', '2.5'))
    assert 'a checkpoint of the original training script' in caplog.text
    assert 'trained with autoencoder scale 1.5; using --autoencoder-scale 2.5' in caplog.text
    assert at_train_start['step'] == 2 and trainer.global_step == 3
    expected = dict(sub_state(ours['state_dict'], 'model_ema.'),
                    autoencoder_scale=torch.tensor(2.5))
    assert_same_tensors(at_train_start['model_ema'], expected)
    assert float(at_train_start['model']['autoencoder_scale']) == 2.5
    assert_same_tensors(at_train_start['ae_model'], ae.state_dict())
    stored = ours['optimizer_states'][0]['state'][0]
    assert torch.equal(at_train_start['optimizer']['state'][0]['exp_avg'], stored['exp_avg'])


def test_finetune_from_a_released_state_dict(assets, tmp_path, at_train_start, caplog):
    torch.manual_seed(3)
    released = DiffusionModel(64, [1, 1, 1, 1], autoencoder_scale=9.0)
    bare = tiny.save_bare(released, tmp_path / 'released.pth')
    # The width flags are the defaults (128, 4,4,8,8): the weights' widths win.
    argv = train_args(assets, tmp_path / 'out', '--resume-from', str(bare), '--max-steps', '1')
    for flag in ('--base-channels', '--channel-multipliers'):
        i = argv.index(flag)
        del argv[i:i + 2]
    trainer, module = train(argv)
    assert 'finetuning' in caplog.text
    assert at_train_start['step'] == 0 and at_train_start['optimizer']['state'] == {}
    expected = dict(released.state_dict(), autoencoder_scale=torch.tensor(SCALE))
    assert_same_tensors(at_train_start['model'], expected)
    assert_same_tensors(at_train_start['model_ema'], expected)
    assert trainer.global_step == 1
    # It records the file it started from, which exports and model cards name.
    assert (module.record['finetuned_from'], module.record['finetuned_from_sha256']) == \
        (str(bare), hashlib.sha256(bare.read_bytes()).hexdigest())


@pytest.mark.parametrize('workers', [0, 2])
def test_bad_image_files_are_skipped_and_counted(assets, tmp_path, workers, recwarn):
    bad = tmp_path / 'bad'
    bad.mkdir()
    truncated = bad / 'truncated.png'
    truncated.write_bytes(Path(assets.paths[0]).read_bytes()[:200])
    (bad / 'text.jpg').write_text('not an image')
    paths = [*assets.paths[:8], truncated, bad / 'text.jpg', bad / 'missing.png', bad]
    train_list = tiny.write_path_list(paths, tmp_path / 'train.txt')
    # 12 paths in batches of 4: three steps see every file once.
    trainer, module = train(train_args(assets, tmp_path / 'out', '--train-set', str(train_list),
                                       '--num-workers', str(workers), '--max-steps', '3',
                                       '--demo-every', '1000'))
    assert trainer.global_step == 3
    assert module.skipped_images == 4
    rows = [row for row in metrics(tmp_path / 'out') if row.get('train/skipped_images')]
    assert float(rows[-1]['train/skipped_images']) == 4
    if workers == 0:  # (a worker process warns on its own stderr)
        warned = '\n'.join(str(w.message) for w in recwarn)
        for path in paths[8:]:
            assert f'skipping unreadable image {path}:' in warned


def test_batches_of_only_unreadable_files_neither_stop_the_run_nor_step(assets, tmp_path,
                                                                        monkeypatch):
    """Every other batch loses all its images: those batches make no optimizer step."""
    from ccld.data import images
    collate, calls = images.collate_skipping_bad, []

    def every_other_batch_unreadable(batch):
        calls.append(len(calls))
        return collate([(key, None, text) for key, _, text in batch] if len(calls) % 2
                       else batch)
    monkeypatch.setattr(images, 'collate_skipping_bad', every_other_batch_unreadable)
    trainer, module = train(train_args(assets, tmp_path, '--max-steps', '2',
                                       '--demo-every', '1000'))
    assert trainer.global_step == 2 and len(calls) == 4 and module.skipped_images == 8
    saved = load(tmp_path / 'checkpoints' / 'last.ckpt')
    assert int(saved['optimizer_states'][0]['state'][0]['step']) == 2


def test_demo_grids_do_not_change_the_training_random_stream(first_run, assets, tmp_path):
    """Same seed, a grid every step instead of every other one: the same weights."""
    _, module = train(train_args(assets, tmp_path, '--demo-every', '1'))
    assert len(list((tmp_path / 'demos').iterdir())) == 4
    assert_same_tensors(module.model.state_dict(), first_run.module.model.state_dict())


def test_the_seed_picks_the_timesteps(assets, tmp_path, monkeypatch):
    """--seed 5: the first step's timesteps are the first draws of the scrambled Sobol
    sequence of seed 5 (rank zero's). (Without it, a run picks a seed at random, or the
    one an earlier run in this process left in PL_GLOBAL_SEED.)"""
    seen, objective = [], diffusion_module.v_objective

    def spy(model, x0, cond, t):
        seen.append(t.clone())
        return objective(model, x0, cond, t)
    monkeypatch.setattr(diffusion_module, 'v_objective', spy)
    train(train_args(assets, tmp_path, '--seed', '5', '--max-steps', '1', '--demo-every', '1000'))
    expected = torch.quasirandom.SobolEngine(1, scramble=True, seed=5).draw(4)[:, 0]
    torch.testing.assert_close(seen[0], expected, rtol=0, atol=0)


@pytest.mark.parametrize('n', [1, 5, 17])
def test_demo_grid_takes_any_number_of_prompts(first_run, tmp_path, n):
    prompts = [f'prompt {i}' for i in range(n)]
    callback = DemoCallback(prompts, every=1, out_dir=tmp_path, steps=2, latent_size=8)
    rng = torch.get_rng_state()
    callback.render_and_log(SimpleNamespace(loggers=[]), first_run.module, step=7)
    assert torch.equal(torch.get_rng_state(), rng)
    rows = -(-n // 4)
    with Image.open(tmp_path / 'demo_00000007.png') as grid:
        grid.load()
        assert grid.size == (min(n, 4) * 64, rows * 64)
        assert grid.text['prompts'].splitlines() == prompts


def test_ema_decay_schedule():
    assert [ema_decay(s, 200_000) for s in (0, 19_999, 20_000, 199_999, 200_000, 10 ** 7)] == \
        [0.99, 0.99, 0.999, 0.999, 0.9999, 0.9999]
    assert ema_decay(50_000, decay_at=40_000) == 0.9999


def test_ema_update_averages_parameters_and_copies_buffers():
    torch.manual_seed(0)
    model, averaged = DiffusionModel(16, [4, 4, 4, 4], 2.0), DiffusionModel(16, [4, 4, 4, 4], 1.0)
    before = {k: v.clone() for k, v in averaged.state_dict().items()}
    ema_update(model, averaged, 0.9)
    for name, param in model.named_parameters():
        expected = 0.9 * before[name] + 0.1 * param.detach()
        torch.testing.assert_close(dict(averaged.named_parameters())[name], expected)
    assert float(averaged.autoencoder_scale) == 2.0


# Every usage error: exit code 2, one line naming the flag, before any model is loaded.
def _write(path, text):
    path.write_text(text)
    return str(path)


def _half_model(path):
    state = tiny.tiny_diffusion().state_dict()
    torch.save({k: v for k, v in state.items() if not k.startswith('net.4.')}, path)
    return path


@pytest.mark.parametrize('make_extra, message', [
    (lambda d: ['--vqgan-model', str(d / 'nothing')], '--vqgan-model'),
    (lambda d: ['--vqgan-model', _write(d / 'yaml_only.yaml', 'x')[:-5]], '--vqgan-model'),
    (lambda d: ['--autoencoder-scale', '0'], '--autoencoder-scale'),
    (lambda d: ['--autoencoder-scale', '-2'], '--autoencoder-scale'),
    (lambda d: ['--autoencoder-scale', 'big'], '--autoencoder-scale'),
    (lambda d: ['--train-set', str(d / 'missing.txt')], '--train-set'),
    (lambda d: ['--train-set', _write(d / 'empty.txt', '\n\n')], '--train-set'),
    (lambda d: ['--demo-prompts', str(d / 'missing.txt')], '--demo-prompts'),
    (lambda d: ['--demo-prompts', _write(d / 'blank.txt', '  \n')], '--demo-prompts'),
    (lambda d: ['--channel-multipliers', '4,4,8'], '--channel-multipliers'),
    (lambda d: ['--channel-multipliers', '4,4,x,8'], '--channel-multipliers'),
    (lambda d: ['--base-channels', '100'], '--base-channels'),
    (lambda d: ['--image-size', '100'], '--image-size'),
    (lambda d: ['--cloob-checkpoint', str(d / 'cloob.pkl')], '--cloob-checkpoint'),
    (lambda d: ['--resume-from', str(d / 'nothing.ckpt')], '--resume-from'),
    (lambda d: ['--resume-from', _write(d / 'notes.ckpt', 'text')], '--resume-from: '),
    (lambda d: ['--resume-from', str(_half_model(d / 'half.pth'))], 'is missing'),
    (lambda d: ['--fprecision', 'fp8'], '--fprecision'),
    (lambda d: ['--batch-size', '0'], '--batch-size'),
    (lambda d: ['--num-workers', '-1'], '--num-workers'),
    (lambda d: ['--accelerator', 'tpu9'], '--accelerator'),
    (lambda d: ['--seed', '-5'], '--seed'),
])
def test_usage_errors(assets, tmp_path, capsys, monkeypatch, make_extra, message):
    def refuse(*args, **kwargs):
        raise AssertionError('a model was loaded before the arguments were checked')
    monkeypatch.setattr('ccld.models.autoencoder.load_autoencoder', refuse)
    monkeypatch.setattr('ccld.models.cloob.load_cloob', refuse)
    code = run_cli(train_args(assets, tmp_path / 'out', *make_extra(tmp_path)))
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('gpus, extra, message', [
    (0, ['--accelerator', 'gpu'], 'no CUDA GPU; pass --accelerator cpu'),
    (0, ['--accelerator', 'auto', '--num-gpus', '2'], 'pass --accelerator cpu to run 2 CPU'),
    (1, ['--accelerator', 'gpu', '--num-gpus', '2'], 'has 1 CUDA GPU'),
    (4, ['--accelerator', 'auto', '--num-gpus', '8'], 'has 4 CUDA GPU'),
])
def test_devices_that_are_not_there(assets, tmp_path, capsys, monkeypatch, gpus, extra, message):
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: gpus)
    assert run_cli(train_args(assets, tmp_path, *extra)) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err, err


@pytest.mark.parametrize('missing', ['--vqgan-model', '--autoencoder-scale', '--train-set',
                                     '--demo-prompts'])
def test_required_flags(assets, tmp_path, capsys, missing):
    argv = train_args(assets, tmp_path)
    i = argv.index(missing)
    del argv[i:i + 2]
    assert run_cli(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and f'{missing} is required' in err


def test_precision_flags():
    parse = lambda *a: train_latent_diffusion.parser().parse_args(list(a))  # noqa: E731
    assert [parse('--fprecision', p).fprecision for p in ('16', '32', 'bf16', 'bf16-true')] == \
        ['16-mixed', '32-true', 'bf16-mixed', 'bf16-true']


def test_strategy_is_ddp_with_more_than_one_device():
    from pytorch_lightning.strategies import DDPStrategy
    def args(**kw):
        return SimpleNamespace(**{'strategy': 'auto', 'devices': 1, 'num_nodes': 1, **kw})
    assert runner.strategy_for(args()) == 'auto'
    assert isinstance(runner.strategy_for(args(devices=8)), DDPStrategy)
    assert isinstance(runner.strategy_for(args(num_nodes=2)), DDPStrategy)
    assert runner.strategy_for(args(devices=8, strategy='fsdp')) == 'fsdp'


def test_script_error_is_one_line_from_any_directory(assets, tmp_path):
    argv = train_args(assets, tmp_path / 'out', '--train-set', str(tmp_path / 'missing.txt'))
    result = subprocess.run([sys.executable, str(ROOT / 'train_latent_diffusion.py'), *argv],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f'train_latent_diffusion.py: error: --train-set: path list {tmp_path / "missing.txt"} '
        'does not exist.']


DDP_DRIVER = '''
import sys, torch
import ccld.train.diffusion_module
import ccld.train.throughput
import train_latent_diffusion
from ccld.train import run as train
seen, ticks, v_objective = [], [], ccld.train.diffusion_module.v_objective

def spy(model, x0, cond, t):  # the latents and timesteps of each step of this rank
    seen.append({"x0": x0.detach().clone(), "t": t.detach().clone()})
    return v_objective(model, x0, cond, t)

def clock():  # the throughput meter's clock: k^2 / 4 seconds at its k-th reading
    ticks.append(len(ticks) ** 2 / 4)
    return ticks[-1]

ccld.train.diffusion_module.v_objective = spy
ccld.train.throughput.perf_counter = clock
args = train_latent_diffusion.parser().parse_args(sys.argv[2:])
trainer, module = train.run(train.validate(args))
torch.save({"model": module.model.state_dict(), "model_ema": module.model_ema.state_dict(),
            "step": trainer.global_step, "world_size": trainer.world_size, "seen": seen,
            "ticks": ticks}, f"{sys.argv[1]}/rank{trainer.global_rank}.pt")
'''


def test_two_process_cpu_ddp_keeps_both_ranks_identical_and_logs_the_images_of_both(
        assets, tmp_path):
    """Both ranks end with the same weights, having trained on different images at
    different timesteps (each rank has its own Sobol sequence).

    4 images in batches of 2 on 2 ranks: one step an epoch, so every step is logged.
    With the meter's clock read at the start and at every step (its k-th reading is
    k^2 / 4 s, so the intervals differ), perf/images_per_sec is the images both ranks
    trained on over the meter's window divided by the window's time; perf/mfu is
    perf/tflops_per_device over --peak-tflops."""
    from ccld.train.throughput import UPDATES_PER_WINDOW
    driver = tmp_path / 'driver.py'
    driver.write_text(DDP_DRIVER)
    four = tiny.write_path_list(assets.paths[:4], tmp_path / 'four.txt')
    argv = train_args(assets, tmp_path / 'out', '--train-set', str(four), '--num-gpus', '2',
                      '--batch-size', '2', '--max-steps', '5', '--demo-every', '1000',
                      '--peak-tflops', '0.5')
    # The driver lives outside the checkout: it must import this checkout's code.
    path = [str(ROOT), str(ROOT / 'latent-diffusion'), os.environ.get('PYTHONPATH', '')]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, path)))
    result = subprocess.run([sys.executable, str(driver), str(tmp_path), *argv], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [load(tmp_path / f'rank{r}.pt') for r in (0, 1)]
    assert [(r['step'], r['world_size']) for r in ranks] == [(5, 2), (5, 2)]
    for name in ('model', 'model_ema'):
        assert_same_tensors(ranks[0][name], ranks[1][name])
    assert [len(r['seen']) for r in ranks] == [5, 5]
    for step, (a, b) in enumerate(zip(ranks[0]['seen'], ranks[1]['seen'])):
        assert a['x0'].shape == b['x0'].shape == (2, 4, 8, 8)
        assert not torch.equal(a['x0'], b['x0']), f'step {step}: both ranks had the same latents'
        assert not torch.equal(a['t'], b['t']), f'step {step}: both ranks drew timesteps {a["t"]}'
    assert (tmp_path / 'out' / 'checkpoints' / 'last.ckpt').is_file()
    assert len(list((tmp_path / 'out' / 'demos').iterdir())) == 1  # rank zero only

    logged = [r for r in metrics(tmp_path / 'out') if r.get('perf/images_per_sec')]
    assert len(logged) == 1  # the window is full at the 5th reading after the start
    last, first = 5, 5 - UPDATES_PER_WINDOW + 1  # the steps whose readings bound the window
    images = sum(len(r['seen'][step - 1]['x0']) for r in ranks for step in range(first + 1,
                                                                               last + 1))
    seconds = ranks[0]['ticks'][last] - ranks[0]['ticks'][first]
    assert images == 16 and seconds == 6
    logged = {k: float(v) for k, v in logged[0].items() if k.startswith('perf/')}
    # (metrics are logged in float32)
    assert logged['perf/images_per_sec'] == pytest.approx(images / seconds, rel=1e-6)
    assert logged['perf/mfu'] == pytest.approx(logged['perf/tflops_per_device'] / 0.5, rel=1e-6)


def test_wandb_offline_run_logs_the_demo_grid_and_prompts(assets, tmp_path):
    env = dict(os.environ, WANDB_MODE='offline', WANDB_SILENT='true')
    argv = train_args(assets, tmp_path / 'out', '--wandb-project', 'ccld-test', '--max-steps', '2')
    result = subprocess.run([sys.executable, str(ROOT / 'train_latent_diffusion.py'), *argv],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = list((tmp_path / 'out' / 'wandb').glob('offline-run-*'))
    assert len(runs) == 1
    media = runs[0] / 'files' / 'media'
    assert list(media.glob('images/demo_grid_*.png'))
    html = list(media.glob('html/prompts_*.html'))
    assert html and '(0, 2) a green field' in html[0].read_text()


def test_the_demo_refuses_flags_it_would_ignore(tmp_path, capsys):
    """--demo trains with its own settings: another flag (but --output-dir) is named in one
    line, exit 2, and nothing is written."""
    from ccld import cli
    with pytest.raises(SystemExit) as exit_:
        cli.run(lambda: train_latent_diffusion.main(
            ['--demo', '--output-dir', str(tmp_path / 'demo'), '--aspect-buckets', '--seed', '3']),
            'train_latent_diffusion.py')
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert '\n' not in err and 'drop --aspect-buckets, --seed' in err
    assert not (tmp_path / 'demo').exists()


def test_the_readme_demo_runs_offline_from_any_directory(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / 'train_latent_diffusion.py'), '--demo',
                             '--output-dir', 'demo'], cwd=tmp_path, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / 'demo'
    assert (out / 'run' / 'checkpoints' / 'last.ckpt').is_file()
    assert sorted(p.name for p in (out / 'run' / 'demos').iterdir()) == [
        'demo_00000001.png', 'demo_00000060.png', 'demo_00000120.png']
    with Image.open(out / 'samples' / 'out_grid.png') as grid:
        assert grid.size == (128, 128)
    assert 'not a trained model' in result.stdout
    assert 'train_latent_diffusion.py --train-set train.txt' in result.stdout


def test_the_modules_are_importable_from_the_script_as_in_the_original():
    assert train_latent_diffusion.LightningDiffusion is LightningDiffusion
    assert train_latent_diffusion.DiffusionModel is DiffusionModel


def test_grad_clip_limits_the_update(assets, tmp_path, at_train_start):
    """AdamW's first step moves each weight by lr * g / (|g| + 1e-8) besides the weight
    decay: ~lr unclipped, under lr / 10^4 with the gradient norm clipped to 1e-12 (the
    bound allows for float32 rounding)."""
    lr, weight_decay = 3e-5, 0.01
    _, module = train(train_args(assets, tmp_path, '--max-steps', '1', '--lr', str(lr),
                                 '--grad-clip', '1e-12', '--demo-every', '1000'))
    worst = 0.0
    for name, after in module.model.named_parameters():
        before = at_train_start['model'][name].double()
        adam_step = before * (1 - lr * weight_decay) - after.detach().double()
        worst = max(worst, adam_step.abs().max().item() / lr)
    assert worst < 0.01, f'the first step moved a weight by {worst:.3g} lr'


def test_ema_decay_at_sets_when_the_average_slows_to_0_9999(first_run, assets, tmp_path,
                                                            at_train_start):
    """SPEC 2: past step 20000 the EMA decays by 0.999 until --ema-decay-at, then by 0.9999.
    Resumed at step 20010 with --ema-decay-at 20005 and an EMA far from the model, one
    step gives EMA = 0.9999 EMA_before + 0.0001 model_after (0.999 would be visibly off),
    and the EMA's buffers are the model's."""
    ours = load(first_run.out / 'checkpoints' / 'step=00000002.ckpt')
    torch.manual_seed(5)
    far = DiffusionModel(64, [1, 1, 1, 1], SCALE).state_dict()
    state = {**{f'model.{k}': v for k, v in sub_state(ours['state_dict'], 'model.').items()},
             **{f'model_ema.{k}': v for k, v in far.items()}}
    original = tmp_path / 'original.ckpt'  # a checkpoint of the original script, at step 20010
    torch.save({'epoch': 0, 'global_step': 20010, 'pytorch-lightning_version': '1.5.10',
                'state_dict': state, 'callbacks': {}, 'optimizer_states': ours['optimizer_states'],
                'lr_schedulers': [], 'scale_factor': SCALE}, original)
    _, module = train(train_args(assets, tmp_path / 'out', '--resume-from', str(original),
                                 '--max-steps', '20011', '--ema-decay-at', '20005'))
    assert at_train_start['step'] == 20010
    ema = dict(module.model_ema.named_parameters())
    off = {0.9999: 0.0, 0.999: 0.0}
    for name, model in module.model.named_parameters():
        before, after = at_train_start['model_ema'][name].double(), ema[name].double()
        for decay in off:
            expected = decay * before + (1 - decay) * model.detach().double()
            off[decay] = max(off[decay], (after - expected).abs().max().item())
    assert off[0.9999] < 1e-6 and off[0.999] > 1e-5, off
    assert_same_tensors(dict(module.model_ema.named_buffers()), dict(module.model.named_buffers()))


@pytest.mark.parametrize('step, schedule, expected', [
    # warmup over 10 steps: linear from 0
    (0, dict(warmup=10), 0.0), (5, dict(warmup=10), 0.5), (10, dict(warmup=10), 1.0),
    (1000, dict(warmup=10), 1.0),
    # cosine from the end of the warmup (step 10) to step 110, down to 0.1
    (60, dict(warmup=10, schedule='cosine', minimum=0.1, total=110), 0.55),
    (110, dict(warmup=10, schedule='cosine', minimum=0.1, total=110), 0.1),
    (35, dict(warmup=10, schedule='cosine', minimum=0.0, total=110), (1 + 2 ** -0.5) / 2),
    # inverse square root from the end of a 100-step warmup
    (400, dict(warmup=100, schedule='inverse-sqrt'), 0.5),
    (10_000, dict(warmup=100, schedule='inverse-sqrt', minimum=0.2), 0.2),
])
def test_learning_rate_schedules(step, schedule, expected):
    from ccld.train.diffusion_module import learning_rate
    assert learning_rate(step, 1.0, **schedule) == pytest.approx(expected)


def test_the_lr_warmup_continues_on_resume_and_is_logged(first_run, assets, tmp_path):
    """A 4-step warmup stopped after 2 steps and resumed: steps 2 and 3 run at 2/4 and
    3/4 of --lr, as in one run, and train/lr is in the log."""
    argv = train_args(assets, tmp_path, '--lr-warmup-steps', '4', '--demo-every', '1')
    train([*argv, '--max-steps', '2'])
    seen = []
    step = LightningDiffusion.optimizer_step_or_skip

    def spy(self):
        step(self)
        seen.append(self.optimizers().param_groups[0]['lr'])
    try:
        LightningDiffusion.optimizer_step_or_skip = spy
        train([*argv, '--max-steps', '4', '--resume-from', 'auto'])
    finally:
        LightningDiffusion.optimizer_step_or_skip = step
    assert seen == pytest.approx([3e-5 * 2 / 4, 3e-5 * 3 / 4])
    logged = [float(r['train/lr']) for r in metrics(tmp_path) if r.get('train/lr')]
    assert logged[:2] == pytest.approx([0.0, 3e-5 / 4])


def test_lr_schedule_flags_are_checked(assets, tmp_path, capsys):
    no_max_steps = train_args(assets, tmp_path, '--lr-schedule', 'cosine')
    i = no_max_steps.index('--max-steps')
    del no_max_steps[i:i + 2]
    for argv, message in ((no_max_steps, 'cosine decays over the run: it needs --max-steps'),
                          (train_args(assets, tmp_path, '--lr-schedule', 'cosine', '--lr-min',
                                      '1'), '--lr-min 1 must be below --lr 3e-05'),
                          (train_args(assets, tmp_path, '--lr-min', '-1'),
                           'argument --lr-min: must be 0 or more')):
        assert run_cli(argv) == 2
        assert message in capsys.readouterr().err


class LearningRates:
    """Spies on optimizer steps: the LR each one ran at, and the batches between them."""

    def __init__(self, monkeypatch):
        self.lrs, self.batches = [], []
        step, objective = LightningDiffusion.optimizer_step_or_skip, diffusion_module.v_objective

        def stepped(module):
            step(module)
            self.lrs.append(module.optimizers().param_groups[0]['lr'])

        def counted(*args):
            self.batches.append(len(self.lrs))  # the optimizer steps before this batch
            return objective(*args)
        monkeypatch.setattr(LightningDiffusion, 'optimizer_step_or_skip', stepped)
        monkeypatch.setattr(diffusion_module, 'v_objective', counted)


@pytest.mark.parametrize('schedule, lr_min, expected', [
    # lr_min + (lr - lr_min) (1 + cos(pi step / max_steps)) / 2
    ('cosine', 1e-5, [3e-5, 1e-5 + 2e-5 * 0.75, 1e-5 + 2e-5 * 0.25]),
    # lr / sqrt(step) from step 1 (no warmup), floored at lr_min
    ('inverse-sqrt', 2.2e-5, [3e-5, 3e-5, 2.2e-5]),
])
def test_the_lr_schedule_flags_set_the_lr_of_each_step(assets, tmp_path, monkeypatch, schedule,
                                                       lr_min, expected):
    spy = LearningRates(monkeypatch)
    train(train_args(assets, tmp_path, '--lr-schedule', schedule, '--lr-min', str(lr_min),
                     '--max-steps', '3', '--demo-every', '1000'))
    assert spy.lrs == pytest.approx(expected, rel=1e-9)


def test_accumulate_grad_batches_makes_one_step_of_that_many_batches(assets, tmp_path,
                                                                     monkeypatch):
    """Three batches to a step, on one device too (which has no gradient sync to skip)."""
    spy = LearningRates(monkeypatch)
    trainer, _ = train(train_args(assets, tmp_path, '--accumulate-grad-batches', '3',
                                  '--max-steps', '2', '--demo-every', '1000'))
    assert trainer.global_step == 2 and spy.batches == [0, 0, 0, 1, 1, 1]


def test_the_demo_flags_choose_the_demo_sampler_schedule_steps_and_size(assets, tmp_path,
                                                                        monkeypatch):
    """--demo-size 128x64 of a 64 px run: latents [4, 8, 16], a grid of 128 x 64 images."""
    from ccld.diffusion.schedule import sampling_timesteps
    from ccld.train import demo_grids
    runs, sample_latents = [], demo_grids.sample_latents

    def spy(model_fn, x, ts, method, *args, **kwargs):
        runs.append((method, ts.tolist(), tuple(x.shape)))
        return sample_latents(model_fn, x, ts, method, *args, **kwargs)
    monkeypatch.setattr(demo_grids, 'sample_latents', spy)
    train(train_args(assets, tmp_path, '--max-steps', '1', '--demo-steps', '3',
                     '--demo-method', 'plms2', '--demo-schedule', 'karras', '--demo-size',
                     '128x64'))
    assert runs == [('plms2', sampling_timesteps(3, schedule='karras').tolist(),
                     (len(PROMPTS), 4, 8, 16))]
    [path] = (tmp_path / 'demos').glob('demo_*.png')
    with Image.open(path) as grid:  # the prompts in one row
        assert grid.size == (len(PROMPTS) * 128, 64)


def test_the_run_asks_lightning_for_the_nodes_strategy_accelerator_and_precision(
        assets, tmp_path, monkeypatch):
    """Several nodes cannot run in a test: the Trainer the run asks for is checked. With
    16 images in batches of 4 on 3 nodes an epoch is one step, so it logs every step."""
    import pytorch_lightning as pl
    asked = {}

    class Asked(Exception):
        pass

    def trainer(**kwargs):
        asked.update(kwargs)
        raise Asked
    monkeypatch.setattr(pl, 'Trainer', trainer)
    with pytest.raises(Asked):
        train(train_args(assets, tmp_path, '--num-nodes', '3', '--strategy', 'ddp_spawn',
                         '--fprecision', 'bf16'))
    assert (asked['num_nodes'], asked['strategy'], asked['accelerator'], asked['precision'],
            asked['devices'], asked['log_every_n_steps']) == (3, 'ddp_spawn', 'cpu',
                                                              'bf16-mixed', 1, 1)


def test_random_flip_mirrors_about_half_the_images_and_is_recorded(assets, tmp_path):
    from ccld.data.images import ImagePathDataset
    picture = Image.new('RGB', (64, 64), (0, 0, 255))
    picture.paste((255, 0, 0), (0, 0, 32, 64))  # red left half
    picture.save(tmp_path / 'half.png')
    dataset = ImagePathDataset([tmp_path / 'half.png'] * 400, 64, random_flip=True)
    torch.manual_seed(0)
    flipped = sum(int(dataset[i][1][0, 32, 5] < 0.5) for i in range(len(dataset)))
    assert 160 < flipped < 240  # binomial(400, 0.5): mean 200, sd 10
    unflipped = ImagePathDataset([tmp_path / 'half.png'], 64)[0][1]
    assert unflipped[0, 32, 5] == 1 and unflipped[2, 32, 60] == 1
    _, module = train(train_args(assets, tmp_path / 'out', '--random-flip', '--max-steps', '1'))
    assert load(tmp_path / 'out' / 'checkpoints' / 'last.ckpt')['ccld']['random_flip'] is True


def test_every_demo_grid_logs_its_cloob_score(first_run):
    """demo/cloob_score is the mean cosine similarity of each cell's CLOOB image
    embedding with its prompt's text embedding (8-bit PNG cells: 1e-2 tolerance)."""
    from torchvision.transforms.functional import to_tensor
    rows = [r for r in metrics(first_run.out) if r.get('demo/cloob_score')]
    assert [int(r['step']) for r in rows] == [1, 2, 4]
    cloob = first_run.module.cloob
    with Image.open(first_run.out / 'demos' / 'demo_00000004.png') as grid:
        cells = to_tensor(grid.convert('RGB')).unfold(2, 64, 64).permute(2, 0, 1, 3)
        assert float(grid.text['cloob_score']) == pytest.approx(float(rows[-1]['demo/cloob_score']),
                                                                abs=1e-4)
    with torch.no_grad():
        images = torch.nn.functional.normalize(cloob.embed_images(cells), dim=-1)
        texts = torch.nn.functional.normalize(cloob.embed_texts(PROMPTS), dim=-1)
    expected = (images * texts).sum(-1).mean().item()
    assert float(rows[-1]['demo/cloob_score']) == pytest.approx(expected, abs=1e-2)


def test_the_demo_starts_afresh_in_its_own_directory_and_leaves_others_alone(tmp_path):
    """Running the README's demo twice must work (its run would otherwise be refused as a
    fresh run into a directory with checkpoints); a directory it did not make is refused."""
    from ccld.train import quickstart
    from ccld.errors import UserError
    demo = tmp_path / 'demo'
    quickstart.clear_previous_demo(demo)
    (demo / 'run' / 'checkpoints').mkdir(parents=True)
    (demo / 'run' / 'checkpoints' / 'last.ckpt').write_text('x')
    (demo / 'assets').mkdir()
    quickstart.clear_previous_demo(demo)
    assert not (demo / 'run').exists() and (demo / 'assets').exists()
    (tmp_path / 'mine').mkdir()
    (tmp_path / 'mine' / 'precious.ckpt').write_text('x')
    with pytest.raises(UserError, match='holds other files'):
        quickstart.clear_previous_demo(tmp_path / 'mine')
    assert (tmp_path / 'mine' / 'precious.ckpt').exists()


@pytest.mark.parametrize('kind', ['path list', 'tar', 'parquet'])
def test_the_training_loader_follows_random_flip_and_prefetch_factor(assets, tmp_path, kind):
    """The loader the run builds from its flags (path list, tar shards or parquet) mirrors
    about half the images with --random-flip, and prefetches as --prefetch-factor says."""
    import io
    import tarfile
    picture = Image.new('RGB', (64, 64), (0, 0, 255))
    picture.paste((255, 0, 0), (0, 0, 32, 64))  # red left half
    picture.save(tmp_path / 'half.png')
    data = io.BytesIO()
    picture.save(data, 'PNG')
    if kind == 'tar':
        with tarfile.open(tmp_path / '00000.tar', 'w') as shard:
            for i in range(200):
                info = tarfile.TarInfo(f'{i:09}.png')
                info.size = len(data.getvalue())
                shard.addfile(info, io.BytesIO(data.getvalue()))
        train_set = tmp_path / '00000.tar'
    elif kind == 'parquet':
        train_set = tiny.write_img2dataset_parquet([data.getvalue()] * 200, tmp_path / 'pq',
                                                   per_file=100, row_group_size=20)
    else:
        train_set = tiny.write_path_list([tmp_path / 'half.png'] * 200, tmp_path / 'list.txt')
    args = train_latent_diffusion.parser().parse_args(train_args(
        assets, tmp_path / 'out', '--train-set', str(train_set), '--random-flip',
        '--num-workers', '1', '--prefetch-factor', '3', '--batch-size', '10'))
    from ccld.data.sources import Source
    args.source = Source(args.train_set)
    args.cache = None
    trainer = SimpleNamespace(global_rank=0, world_size=1, current_epoch=0)
    loader = training_run.TrainData(args, seed=0)(trainer)
    settings = loader.num_workers, loader.prefetch_factor
    images = torch.cat([batch['images'] for batch in loader])
    # Its worker ignores SIGTERM (as training's do): kept alive by a failure's traceback,
    # it would hang the end of the tests instead of letting them report.
    del loader
    assert settings == (1, 3)
    flipped = int((images[:, 0, 32, 5] < 0.5).sum())
    assert len(images) == 200 and 70 < flipped < 130  # binomial(200, 0.5): sd 7

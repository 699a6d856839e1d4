"""Runs that survive: stop signals, kill -9, full disks, divergence, bad data and bad
checkpoints lose at most the steps since the last checkpoint, and are never silent.

Real processes where the behaviour lives in the process (signals, kills, file limits);
in-process runs elsewhere. All on tiny models on the CPU.
"""

import fcntl
import os
import random
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

import precompute_latents
import tiny
import train_latent_diffusion
from ccld.train import run as training_run, runner, saving
from ccld.models.checkpoint_files import safe_load
from ccld.errors import RunError, UserError
from ccld.train.signals import StopOnSignal

ROOT = Path(__file__).resolve().parent.parent
SCALE = 1.5


@pytest.fixture(scope='module')
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp('survival')
    paths = tiny.make_images(d / 'images', n=16, size=64)
    (d / 'prompts.txt').write_text('a red circle\na blue square\n')
    a = SimpleNamespace(dir=d, paths=paths, train=tiny.write_path_list(paths, d / 'train.txt'),
                        autoencoder=tiny.tiny_autoencoder(d), cloob=str(tiny.tiny_cloob(d)),
                        prompts=d / 'prompts.txt', latents=d / 'latents')
    assert tiny.exit_code(precompute_latents.main, 'precompute_latents.py', [
        '--train-set', str(a.train), '--vqgan-model', a.autoencoder, '--cloob-checkpoint',
        a.cloob, '--output', str(a.latents), '--image-size', '64', '--num-workers', '0',
        '--device', 'cpu']) == 0
    return a


def train_args(assets, out, *extra, data=None):
    """Tiny steps, no demo after the first; later flags in `extra` override these."""
    data = data or ['--train-set', str(assets.train)]
    return [*data, '--vqgan-model', assets.autoencoder, '--autoencoder-scale', str(SCALE),
            '--cloob-checkpoint', assets.cloob, '--demo-prompts', str(assets.prompts),
            '--output-dir', str(out), '--accelerator', 'cpu', '--num-workers', '0',
            '--batch-size', '2', '--base-channels', '64', '--channel-multipliers', '1,1,1,1',
            '--image-size', '64', '--max-steps', '1000', '--checkpoint-every', '1000',
            '--demo-every', '1000', '--demo-steps', '2', '--seed', '0', *extra]


def subprocess_env(**extra):
    path = [str(ROOT), str(ROOT / 'latent-diffusion'), os.environ.get('PYTHONPATH', '')]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, path)), **extra)


def start(argv, cwd, **kwargs):
    """train_latent_diffusion.py in its own process group, output to files in cwd."""
    out, err = open(Path(cwd) / 'stdout.txt', 'w'), open(Path(cwd) / 'stderr.txt', 'w')
    kwargs.setdefault('env', subprocess_env())
    return subprocess.Popen([sys.executable, str(ROOT / 'train_latent_diffusion.py'), *argv],
                            cwd=cwd, stdout=out, stderr=err, start_new_session=True, **kwargs)


def wait_for(predicate, timeout=180):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, 'timed out'
        time.sleep(0.02)


def stderr_of(cwd):
    return (Path(cwd) / 'stderr.txt').read_text()


def run_in_process(argv):
    return training_run.run(training_run.validate(train_latent_diffusion.parser().parse_args(argv)))


def weights(path):
    state = safe_load(path, mmap=False)
    return state['state_dict'], state['optimizer_states'][0]['state'], state['global_step']


def assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            assert_same(a[key], b[key])
        elif isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


def test_sigterm_saves_the_step_and_resume_auto_continues_as_if_never_stopped(assets, tmp_path):
    """From the cache, one process: SIGTERM at some step k saves step=k and last.ckpt and
    exits 143; the same command with --resume-from auto and 2 more steps ends with the
    model, EMA and optimizer of an uninterrupted run of k + 2 steps, bit for bit (the
    timestep sequence, random generators and litdata's position are restored too)."""
    data = ['--train-latents', str(assets.latents)]
    out = tmp_path / 'out'
    (tmp_path / 'a').mkdir()
    process = start(train_args(assets, out, '--checkpoint-every', '2', data=data), tmp_path / 'a')
    wait_for(lambda: (out / 'checkpoints' / 'step=00000002.ckpt').is_file())
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 143, stderr_of(tmp_path / 'a')
    _, _, k = weights(out / 'checkpoints' / 'last.ckpt')
    assert k >= 2
    assert (out / 'checkpoints' / f'step={k:08}.ckpt').is_file()
    last_line = stderr_of(tmp_path / 'a').strip().splitlines()[-1]
    assert last_line == (f'train_latent_diffusion.py: stopped by SIGTERM at step {k}; saved '
                         f'{out / "checkpoints" / "last.ckpt"}. Run the same command with '
                         '--resume-from auto to continue.')
    # What the terminal showed says nothing untrue or empty (Lightning's own lines).
    shown = stderr_of(tmp_path / 'a') + (tmp_path / 'a' / 'stdout.txt').read_text()
    for noise in ('was raised with message', '/-2', 'FLOPs'):
        assert noise not in shown, noise
    assert "(cpu's device memory: all of this machine's RAM" in shown
    assert not (out / '.lock').exists()  # (a stopped run lets go of its directory too)

    resumed, _ = run_in_process(train_args(assets, out, '--checkpoint-every', '2',
                                           '--resume-from', 'auto', '--max-steps', str(k + 2),
                                           data=data))
    assert resumed.global_step == k + 2
    run_in_process(train_args(assets, tmp_path / 'straight', '--checkpoint-every', '2',
                              '--max-steps', str(k + 2), data=data))
    a, b = (weights(d / 'checkpoints' / 'last.ckpt') for d in (out, tmp_path / 'straight'))
    assert a[2] == b[2] == k + 2
    assert_same(a[0], b[0])
    assert_same(a[1], b[1])


def test_the_cpu_ema_and_8bit_adamw_resume_as_if_never_stopped(assets, tmp_path):
    """--ema-device cpu --optimizer adamw8bit: 2 steps, then --resume-from auto to 4, end
    with the model, EMA and 8-bit optimizer state of a straight run of 4, bit for bit."""
    from ccld.train.optimizers import adamw8bit_unavailable
    flags = ['--train-latents', str(assets.latents), '--ema-device', 'cpu', '--checkpoint-every',
             '2'] + (['--optimizer', 'adamw8bit'] if adamw8bit_unavailable('cpu') is None else [])
    run_in_process(train_args(assets, tmp_path / 'out', '--max-steps', '2', data=flags))
    run_in_process(train_args(assets, tmp_path / 'out', '--max-steps', '4', '--resume-from', 'auto',
                              data=flags))
    run_in_process(train_args(assets, tmp_path / 'straight', '--max-steps', '4', data=flags))
    a, b = (safe_load(d / 'checkpoints' / 'last.ckpt', mmap=False)
            for d in (tmp_path / 'out', tmp_path / 'straight'))
    assert a['global_step'] == b['global_step'] == 4
    assert_same(a['state_dict'], b['state_dict'])
    assert_same(a['optimizer_states'][0]['state'], b['optimizer_states'][0]['state'])


def test_sigterm_to_the_process_group_with_loader_workers_stops_cleanly(assets, tmp_path):
    out = tmp_path / 'out'
    process = start(train_args(assets, out, '--num-workers', '2', '--checkpoint-every', '2'),
                    tmp_path)
    wait_for(lambda: (out / 'checkpoints' / 'step=00000002.ckpt').is_file())
    os.killpg(process.pid, signal.SIGTERM)  # as SLURM or Kubernetes would: every process
    assert process.wait(timeout=120) == 143
    err = stderr_of(tmp_path)
    assert 'Traceback' not in err and 'stopped by SIGTERM at step' in err, err[-3000:]
    _, _, k = weights(out / 'checkpoints' / 'last.ckpt')
    assert (out / 'checkpoints' / f'step={k:08}.ckpt').is_file()
    wait_for(lambda: not process_group_alive(process.pid), timeout=30)  # the workers ended


def process_group_alive(pgid):
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_sigterm_under_two_process_ddp_saves_once_and_both_ranks_exit(assets, tmp_path):
    """The signal goes to rank zero only; it passes it on, both ranks stop after the same
    step, one checkpoint of it is written, and no process is left."""
    out = tmp_path / 'out'
    process = start(train_args(assets, out, '--num-gpus', '2', '--checkpoint-every', '2'),
                    tmp_path)
    wait_for(lambda: (out / 'checkpoints' / 'step=00000002.ckpt').is_file())
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 143, stderr_of(tmp_path)[-3000:]
    wait_for(lambda: not process_group_alive(process.pid), timeout=60)
    err = stderr_of(tmp_path)
    assert err.count('stopped by SIGTERM at step') == 1, err[-3000:]
    _, _, k = weights(out / 'checkpoints' / 'last.ckpt')
    steps = sorted(p.name for p in (out / 'checkpoints').glob('step=*.ckpt'))
    assert steps[-1] == f'step={k:08}.ckpt'


def test_a_second_signal_exits_at_once(monkeypatch):
    exits = []
    monkeypatch.setattr(os, '_exit', exits.append)
    stop = StopOnSignal()
    stop.trainer = SimpleNamespace(strategy=SimpleNamespace(launcher=None))
    stop.handle(signal.SIGINT, None)
    assert stop.received == signal.SIGINT and exits == []
    stop.handle(signal.SIGTERM, None)
    assert exits == [128 + signal.SIGTERM]


def test_the_signal_flag_chooses_the_warning_signal(assets, tmp_path, monkeypatch, capsys):
    """--signal SIGUSR2, sent during the first step (in this process): the run saves
    step 1 and exits 128 + SIGUSR2. (SIGUSR1 is the default; for a run that ignored the
    flag, SIGUSR2 meets a handler that does nothing instead of ending the tests.)"""
    from ccld.train import diffusion_module
    objective = diffusion_module.v_objective

    def signalled(*args):
        os.kill(os.getpid(), signal.SIGUSR2)
        return objective(*args)
    monkeypatch.setattr(diffusion_module, 'v_objective', signalled)
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: None)
    try:
        code = tiny.exit_code(train_latent_diffusion.main, 'train', train_args(
            assets, tmp_path, '--signal', 'SIGUSR2', '--max-steps', '3'))
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert code == 128 + signal.SIGUSR2
    assert 'stopped by SIGUSR2 at step 1' in capsys.readouterr().err
    assert weights(tmp_path / 'checkpoints' / 'last.ckpt')[2] == 1


def test_kill_9_never_leaves_an_unloadable_checkpoint_or_an_orphan(assets, tmp_path):
    """Checkpoints every step (the newest kept), killed once in the middle of a write and
    twice at random moments, TMPDIR on another file system: every *.ckpt left loads,
    TMPDIR stays empty, and the next run clears the killed writes' temp files."""
    shm = Path('/dev/shm') if Path('/dev/shm').is_dir() else None
    tmpdir = Path(tempfile.mkdtemp(dir=shm))
    out = tmp_path / 'out'
    rng = random.Random(0)
    argv = train_args(assets, out, '--checkpoint-every', '1', '--keep-last', '1')
    try:
        for attempt in range(3):
            process = start([*argv, '--resume-from', 'auto'], tmp_path,
                            env=subprocess_env(TMPDIR=str(tmpdir)))
            if attempt == 0:  # in the middle of a write
                wait_for(lambda: list((out / 'checkpoints').glob('.*.tmp-*')))
            else:
                wait_for(lambda: len(list((out / 'checkpoints').glob('*.ckpt'))) > 0)
                time.sleep(rng.uniform(0.5, 4))
            process.send_signal(signal.SIGKILL)
            process.wait()
            if attempt == 0:
                assert list((out / 'checkpoints').glob('.*.tmp-*')), 'the kill missed the write'
            for path in (out / 'checkpoints').glob('*.ckpt'):
                assert 'state_dict' in safe_load(path), path
            assert not list(tmpdir.iterdir())
        steps = len(list((out / 'checkpoints').glob('step=*.ckpt')))
        assert steps <= 2  # --keep-last 1, and perhaps the step a kill interrupted
        # The next run resumes from the newest whole checkpoint and clears the debris.
        _, _, k = weights(saving.checkpoint_files(out / 'checkpoints')[0])
        trainer, _ = run_in_process([*argv, '--resume-from', 'auto', '--max-steps', str(k + 1)])
        assert trainer.global_step == k + 1
        assert not list((out / 'checkpoints').glob('.*'))
    finally:
        for leftover in tmpdir.iterdir():
            leftover.unlink()
        tmpdir.rmdir()


def test_a_full_disk_fails_the_run_at_the_end_and_keeps_nothing_half_written(assets, tmp_path):
    """Files over 50 MB cannot be written (RLIMIT_FSIZE): every checkpoint write fails,
    each failure is reported, the run still trains to the end, then exits 1 saying so."""
    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (50 * 2 ** 20, 50 * 2 ** 20))
    out = tmp_path / 'out'
    process = start(train_args(assets, out, '--max-steps', '2', '--checkpoint-every', '1'),
                    tmp_path, preexec_fn=limit_file_size)
    assert process.wait(timeout=300) == 1
    err = stderr_of(tmp_path)
    assert 'Traceback' not in err
    assert err.count('error: could not write the checkpoint') == 4  # step 1, 2 and last x2
    assert err.strip().splitlines()[-1].startswith(
        'train_latent_diffusion.py: error: 4 checkpoint write(s) failed')
    assert 'the newest checkpoint written whole is none' in err
    assert not list((out / 'checkpoints').iterdir())


def test_a_failed_write_keeps_the_older_checkpoints_and_fails_the_run(assets, tmp_path,
                                                                     monkeypatch):
    """Checkpoint writes from step 4 on fail (read-only, say): the step 2 files stay,
    nothing is pruned, and the run ends with an error naming the newest whole one."""
    real = saving.atomic_write

    def read_only_from_step_4(path, *args):
        if 'step=00000002' not in str(path) and trainer_step[0] >= 4:
            raise PermissionError(13, 'Read-only file system', str(path))
        return real(path, *args)
    trainer_step = [0]
    monkeypatch.setattr(saving, 'atomic_write', read_only_from_step_4)
    monkeypatch.setattr(saving.AtomicCheckpointIO, 'save_checkpoint', count_steps(
        saving.AtomicCheckpointIO.save_checkpoint, trainer_step))
    with pytest.raises(RunError, match=r'failed, the last .*last.ckpt \(Read-only file system\); '
                       r'the newest checkpoint written whole is .*last.ckpt'):
        run_in_process(train_args(assets, tmp_path, '--max-steps', '6', '--checkpoint-every',
                                  '2', '--keep-last', '1'))
    names = sorted(p.name for p in (tmp_path / 'checkpoints').iterdir())
    assert names == ['last.ckpt', 'step=00000002.ckpt']
    assert weights(tmp_path / 'checkpoints' / 'last.ckpt')[2] == 2


def count_steps(save, step):
    def spy(self, checkpoint, path, storage_options=None):
        step[0] = checkpoint['global_step']
        return save(self, checkpoint, path, storage_options)
    return spy


def nan_at(steps):
    """A v_objective whose loss is NaN on the given calls (counted from 0)."""
    from ccld.train import diffusion_module
    objective, calls = diffusion_module.v_objective, []

    def maybe_nan(*args):
        calls.append(None)
        loss = objective(*args)
        return loss * float('nan') if len(calls) - 1 in steps else loss
    return maybe_nan, calls


def test_a_non_finite_loss_skips_the_step_and_is_counted(assets, tmp_path, monkeypatch):
    from ccld.train import diffusion_module
    spy, calls = nan_at({1, 2})
    monkeypatch.setattr(diffusion_module, 'v_objective', spy)
    seen = {}
    step = diffusion_module.LightningDiffusion.optimizer_step_or_skip

    def record(self):
        ema = lambda: {k: v.clone() for k, v in self.model_ema.state_dict().items()}  # noqa: E731
        before = ema()
        step(self)
        seen[len(calls) - 1] = (self.global_step, before, ema())
    monkeypatch.setattr(diffusion_module.LightningDiffusion, 'optimizer_step_or_skip', record)
    trainer, module = run_in_process(train_args(assets, tmp_path, '--max-steps', '3'))
    assert len(calls) == 5 and trainer.global_step == 3 and module.skipped_steps == 2
    assert [seen[i][0] for i in range(5)] == [1, 1, 1, 2, 3]  # no step for the NaN batches
    for i in (1, 2):
        assert_same(seen[i][1], seen[i][2])  # nor an EMA update
    assert all(torch.isfinite(p).all() for p in module.model.parameters())


def test_repeated_non_finite_losses_stop_the_run_with_the_last_good_checkpoint(
        assets, tmp_path, monkeypatch, capsys):
    from ccld.train import diffusion_module
    spy, calls = nan_at(set(range(3, 100)))
    monkeypatch.setattr(diffusion_module, 'v_objective', spy)
    argv = train_args(assets, tmp_path, '--max-steps', '50', '--checkpoint-every', '2',
                      '--max-bad-steps', '4')
    assert tiny.exit_code(train_latent_diffusion.main, 'train_latent_diffusion.py', argv) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith('train_latent_diffusion.py: error: the loss or the gradients were not '
                          'finite for 4 steps in a row (at step 3); the last good checkpoint is ')
    assert 'lower --lr or --fprecision 32' in err
    good = Path(err.split('the last good checkpoint is ')[1].split('. Resume')[0])
    state, _, step = weights(good)
    assert step == 2 and all(torch.isfinite(v).all() for v in state.values())
    for path in (tmp_path / 'checkpoints').glob('*.ckpt'):
        assert all(torch.isfinite(v).all() for v in weights(path)[0].values())


@pytest.mark.parametrize('content, message', [
    (b'\x00\x01binary\x00', 'is a binary file'),
    ('caf\xe9.png\n'.encode('latin-1'), 'is not UTF-8 text'),
])
def test_a_list_that_is_not_text_is_one_line(assets, tmp_path, capsys, content, message):
    (tmp_path / 'list.txt').write_bytes(content)
    for flag in ('--train-set', '--demo-prompts'):
        argv = train_args(assets, tmp_path / 'out', flag, str(tmp_path / 'list.txt'))
        assert tiny.exit_code(train_latent_diffusion.main, 'train', argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and flag in err[0] and message in err[0], err


def test_a_list_of_missing_files_is_refused_before_any_model_loads(assets, tmp_path, capsys):
    tiny.write_path_list([tmp_path / f'gone{i}.png' for i in range(30)], tmp_path / 'list.txt')
    argv = train_args(assets, tmp_path / 'out', '--train-set', str(tmp_path / 'list.txt'))
    assert tiny.exit_code(train_latent_diffusion.main, 'train', argv) == 2
    assert 'none of the first 20 paths in' in capsys.readouterr().err
    assert not (tmp_path / 'out').exists()


def test_a_list_of_unreadable_files_stops_at_once(assets, tmp_path, capsys):
    paths = []
    for i in range(6):
        paths.append(tmp_path / f'text{i}.png')
        paths[-1].write_text('not an image')
    tiny.write_path_list(paths, tmp_path / 'list.txt')
    argv = train_args(assets, tmp_path / 'out', '--train-set', str(tmp_path / 'list.txt'))
    assert tiny.exit_code(train_latent_diffusion.main, 'train', argv) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith('train: error: none of the first 6 training files could be read')
    assert not list((tmp_path / 'out' / 'checkpoints').glob('*.ckpt'))


def claim(args):
    """The output directory's lock, taken as the training run takes it."""
    return runner.claim_output_dir(args.output_dir, args.resume_from,
                                   training_run.checkpoint_bytes(args.base_channels,
                                                                 args.channel_multipliers))


def test_a_second_run_on_a_locked_output_dir_is_refused(assets, tmp_path, capsys):
    args = train_latent_diffusion.parser().parse_args(train_args(assets, tmp_path))
    args.resume_from = 'auto'
    lock = claim(args)  # as a live run holds it
    try:
        argv = train_args(assets, tmp_path, '--resume-from', 'auto')
        assert tiny.exit_code(train_latent_diffusion.main, 'train', argv) == 2
        assert f'is in use by another run (pid {os.getpid()} on' in capsys.readouterr().err
    finally:
        lock.close()
    # A process killed while holding the lock holds it no more.
    holder = subprocess.Popen([sys.executable, '-c', (
        'import fcntl, sys, time; f = open(sys.argv[1], "a"); '
        'fcntl.flock(f, fcntl.LOCK_EX); print("locked", flush=True); time.sleep(600)'),
        str(tmp_path / '.lock')], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == 'locked'
    holder.kill()
    holder.wait()
    claim(args).close()


def test_a_fresh_run_into_a_directory_with_checkpoints_is_refused(assets, tmp_path, capsys):
    (tmp_path / 'checkpoints').mkdir()
    (tmp_path / 'checkpoints' / 'last.ckpt').write_bytes(b'x')
    assert tiny.exit_code(train_latent_diffusion.main, 'train', train_args(assets, tmp_path)) == 2
    err = capsys.readouterr().err
    assert 'already holds checkpoints; pass --resume-from auto' in err
    assert 'or a new --output-dir' in err


def test_a_finetune_into_a_directory_with_checkpoints_is_refused(assets, tmp_path, capsys):
    """A run started from a model file (or another run's checkpoint) would write its own
    step 1 over the run there; continuing that run (auto, or one of its checkpoints by
    path) is let through."""
    model = tiny.tiny_diffusion(base_channels=64, channel_multipliers=(1, 1, 1, 1))
    released = tiny.save_bare(model, tmp_path / 'released.pt')
    out = tmp_path / 'run'
    (out / 'checkpoints').mkdir(parents=True)
    last = tiny.save_ccld_checkpoint(out / 'checkpoints' / 'last.ckpt', model, model,
                                     global_step=6)
    before = last.read_bytes()
    for start in (released, tmp_path / 'other' / 'checkpoints' / 'last.ckpt'):
        start.parent.mkdir(parents=True, exist_ok=True)
        if not start.exists():
            tiny.save_ccld_checkpoint(start, model, model, global_step=3)
        argv = train_args(assets, out, '--resume-from', str(start))
        assert tiny.exit_code(train_latent_diffusion.main, 'train', argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f'{out / "checkpoints"} already holds checkpoints, which a run ' \
            f'started from {start} (not one of them) would overwrite; pass --resume-from auto ' \
            'to continue that run, or a new --output-dir.' in err[0], err
    assert last.read_bytes() == before
    args = train_latent_diffusion.parser().parse_args(train_args(assets, out))
    for args.resume_from in ('auto', str(last), str(out / 'checkpoints' / '..' / 'checkpoints'
                                                    / 'step=00000002.ckpt')):
        claim(args).close()


def test_a_run_refused_after_it_took_its_new_output_dir_leaves_nothing(assets, tmp_path, capsys):
    argv = train_args(assets, tmp_path / 'runs' / 'out', '--resume-from', 'auto',
                      '--lora-rank', '4')
    assert tiny.exit_code(train_latent_diffusion.main, 'train', argv) == 2
    assert 'a LoRA run starts from a base model' in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_the_lock_file_goes_when_the_run_lets_go_and_a_run_taking_it_then_takes_the_new_one(
        tmp_path, monkeypatch):
    """A run that opened .lock just before its holder removed it and let go must not hold
    the removed file (beside a third run holding the new one): it locks the file there."""
    first = runner.claim_output_dir(tmp_path, None)
    real_flock, calls = fcntl.flock, []

    def holder_lets_go_first(file, operation):
        if not calls:  # between this run's open and its flock
            first.close()
            assert not (tmp_path / '.lock').exists()
            third = open(tmp_path / '.lock', 'a+')  # a third run takes the new file
            real_flock(third, fcntl.LOCK_EX | fcntl.LOCK_NB)
            calls.append(third)
        return real_flock(file, operation)
    monkeypatch.setattr(fcntl, 'flock', holder_lets_go_first)
    with pytest.raises(UserError, match='is in use by another run'):
        runner.claim_output_dir(tmp_path, None)
    calls[0].close()
    monkeypatch.undo()
    lock = runner.claim_output_dir(tmp_path, None)
    assert (tmp_path / '.lock').read_text().startswith(f'pid {os.getpid()} on ')
    lock.close()
    assert not list(tmp_path.iterdir())


def test_an_output_dir_that_is_a_file_is_refused(assets, tmp_path, capsys):
    (tmp_path / 'file').write_text('x')
    argv = train_args(assets, tmp_path / 'file')
    assert tiny.exit_code(train_latent_diffusion.main, 'train', argv) == 2
    assert '--output-dir: ' in capsys.readouterr().err


def test_little_free_space_is_a_warning(assets, tmp_path, monkeypatch):
    import shutil
    monkeypatch.setattr(shutil, 'disk_usage', lambda path: SimpleNamespace(free=2 ** 20))
    args = train_latent_diffusion.parser().parse_args(train_args(assets, tmp_path))
    with pytest.warns(UserWarning, match=r'has 0.0 GiB free; two checkpoints of this model '
                      r'take about 0.5 GiB'):
        claim(args).close()


def test_resume_auto_skips_a_truncated_checkpoint_and_resume_from_it_is_refused(
        assets, tmp_path, capsys):
    run_in_process(train_args(assets, tmp_path, '--max-steps', '2', '--checkpoint-every', '1'))
    last = tmp_path / 'checkpoints' / 'last.ckpt'
    last.write_bytes(last.read_bytes()[:1000])  # truncated, and the newest file
    argv = train_args(assets, tmp_path, '--resume-from', str(last))
    assert tiny.exit_code(train_latent_diffusion.main, 'train', argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and '--resume-from: ' in err[0] and 'truncated' in err[0], err
    with pytest.warns(UserWarning, match='--resume-from auto: skipping .*last.ckpt'):
        trainer, _ = run_in_process(train_args(assets, tmp_path, '--resume-from', 'auto',
                                               '--max-steps', '3'))
    assert trainer.global_step == 3  # resumed from step=00000002.ckpt


class Boobytrap:
    """Unpickling this runs code: it creates the file it names."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, 'w'))


def test_a_checkpoint_that_would_run_code_is_refused_without_running_it(assets, tmp_path,
                                                                       capsys):
    import sample
    marker = tmp_path / 'pwned'
    state = tiny.tiny_diffusion().state_dict()
    crafted = tmp_path / 'crafted.ckpt'
    torch.save({'state_dict': {f'model.{k}': v for k, v in state.items()},
                'hyper_parameters': Boobytrap(str(marker))}, crafted)
    argv = train_args(assets, tmp_path / 'out', '--resume-from', str(crafted))
    assert tiny.exit_code(train_latent_diffusion.main, 'train', argv) == 2
    sample_argv = [str(crafted), '--autoencoder', assets.autoencoder, '--cloob-checkpoint',
                   assets.cloob, '--device', 'cpu', '--output-dir', str(tmp_path)]
    assert tiny.exit_code(sample.main, 'sample.py', ['--checkpoint', *sample_argv]) == 2
    err = capsys.readouterr().err
    assert err.count('holds objects other than weights') == 2, err
    assert not marker.exists()


def test_an_original_lightning_1_5_checkpoint_with_its_objects_still_loads(tmp_path):
    """Hyperparameters as AttributeDict or Namespace and callback states keyed by class
    are on the allow-list."""
    import argparse

    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.utilities.parsing import AttributeDict
    model = tiny.tiny_diffusion()
    path = tiny.save_original_checkpoint(tmp_path / 'original.ckpt', model, model, 2.5)
    raw = torch.load(path, weights_only=False)
    raw.update(hyper_parameters=AttributeDict(lr=3e-5), hparams=argparse.Namespace(lr=3e-5),
               callbacks={ModelCheckpoint: {'best_model_path': ''}})
    torch.save(raw, path)
    loaded = safe_load(path)
    assert loaded['hyper_parameters'] == {'lr': 3e-5} and loaded['hparams'].lr == 3e-5
    assert ModelCheckpoint in loaded['callbacks']


def test_16_bit_and_exif_rotated_images_load_as_they_look(tmp_path):
    from ccld.data.images import load_image
    import numpy as np
    gray = Image.fromarray(np.full((4, 6), 30000, dtype=np.uint16))
    gray.save(tmp_path / 'gray16.png')
    loaded = load_image(tmp_path / 'gray16.png')
    assert loaded.mode == 'RGB' and loaded.getpixel((0, 0)) == (117, 117, 117)  # 30000/257

    # A 40x20 picture, red on the left half, stored turned and tagged "rotate 90 CW".
    picture = Image.new('RGB', (40, 20), (0, 0, 255))
    picture.paste((255, 0, 0), (0, 0, 20, 20))
    stored = picture.transpose(Image.Transpose.ROTATE_90)  # as a camera held sideways
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    stored.save(tmp_path / 'rotated.jpg', exif=exif, quality=95)
    shown = load_image(tmp_path / 'rotated.jpg')
    assert shown.size == (40, 20)
    assert shown.getpixel((5, 10))[0] > 200 and shown.getpixel((35, 10))[2] > 200


def test_float_flags_refuse_inf_and_nan(assets, tmp_path, capsys):
    for flag, value in (('--lr', 'inf'), ('--autoencoder-scale', 'inf'), ('--lr', 'nan'),
                        ('--grad-clip', 'nan')):
        argv = train_args(assets, tmp_path, flag, value)
        assert tiny.exit_code(train_latent_diffusion.main, 'train', argv) == 2
        assert f'argument {flag}: expected a finite number' in capsys.readouterr().err


def test_keep_last_prunes_old_step_checkpoints(assets, tmp_path):
    run_in_process(train_args(assets, tmp_path, '--max-steps', '5', '--checkpoint-every', '1',
                              '--keep-last', '2'))
    assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()) == [
        'last.ckpt', 'step=00000004.ckpt', 'step=00000005.ckpt']


def test_checkpoint_minutes_writes_last_between_step_checkpoints(assets, tmp_path, monkeypatch):
    written = []
    save = saving.AtomicCheckpointIO.save_checkpoint

    def spy(self, checkpoint, path, storage_options=None):
        written.append((Path(path).name, checkpoint['global_step']))
        return save(self, checkpoint, path, storage_options)
    monkeypatch.setattr(saving.AtomicCheckpointIO, 'save_checkpoint', spy)
    run_in_process(train_args(assets, tmp_path, '--max-steps', '3', '--checkpoint-minutes',
                              '0.0001'))
    assert [name for name, _ in written] == ['last.ckpt'] * len(written)
    assert [step for _, step in written][-1] == 3 and len(written) >= 3


def test_a_failed_write_elsewhere_is_one_line_naming_the_latest_checkpoint(assets, tmp_path,
                                                                          monkeypatch, capsys):
    """Disk full while a demo grid is written, after a checkpoint at step 2."""
    from ccld.sample import png_files
    save_png = png_files.save_png

    def full_from_step_3(image, path, metadata=None):
        if metadata and metadata.get('step', 0) >= 3:
            raise OSError(28, 'No space left on device', str(path))
        return save_png(image, path, metadata)
    monkeypatch.setattr(png_files, 'save_png', full_from_step_3)
    argv = train_args(assets, tmp_path, '--max-steps', '4', '--checkpoint-every', '2',
                      '--demo-every', '1')
    assert tiny.exit_code(train_latent_diffusion.main, 'train', argv) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f'train: error: {tmp_path / "demos" / "demo_00000003.png"} failed (No space '
                   f'left on device); the latest checkpoint is '
                   f'{tmp_path / "checkpoints" / "last.ckpt"}.')


def test_in_16_bit_the_scaler_skips_a_non_finite_step_and_it_is_counted(assets, monkeypatch):
    """fp16 mixed precision (here forced onto the CPU with an explicit GradScaler): the
    scaler skips the step and halves its scale; the EMA does not move; it is counted.
    (The scaler may also skip the first steps while it finds its scale: those count too.)"""
    import pytorch_lightning as pl
    from pytorch_lightning.plugins import MixedPrecision

    from ccld.train import diffusion_module
    from ccld.models.autoencoder import load_autoencoder
    from ccld.models.cloob import load_cloob
    from ccld.data.images import make_loader
    spy, calls = nan_at({1})
    monkeypatch.setattr(diffusion_module, 'v_objective', spy)
    module = diffusion_module.LightningDiffusion(load_autoencoder(assets.autoencoder),
                                         load_cloob(assets.cloob), 64, [1, 1, 1, 1], SCALE)
    emas, scales, skipped = [], [], []
    step = diffusion_module.LightningDiffusion.optimizer_step_or_skip

    def record(self):
        step(self)
        emas.append({k: v.clone() for k, v in self.model_ema.state_dict().items()})
        scales.append(self.trainer.precision_plugin.scaler.get_scale())
        skipped.append(self.skipped_steps)
    monkeypatch.setattr(diffusion_module.LightningDiffusion, 'optimizer_step_or_skip', record)
    trainer = pl.Trainer(accelerator='cpu', max_steps=3, logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False,
                         plugins=[MixedPrecision('16-mixed', 'cpu', torch.amp.GradScaler('cpu'))])
    trainer.fit(module, make_loader([str(p) for p in assets.paths], 64, 2, 0))
    assert skipped[1] == skipped[0] + 1 and len(calls) == len(skipped) >= 3
    assert scales[1] == scales[0] / 2
    assert_same(emas[0], emas[1])  # the NaN step left the EMA alone
    assert all(torch.isfinite(p).all() for p in module.model.parameters())

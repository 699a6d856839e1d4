"""distill.py end to end on tiny random models, on the CPU: the stages and their files,
resuming in the right stage and round, the students in sample.py and export_model.py,
and what is refused before any model loads."""

import hashlib
import logging
import os
import shutil
import signal
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import distill
import export_model
import sample
import tiny
from ccld.data import latent_cache
from ccld.errors import UserError
from ccld.models import checkpoint_files
from ccld.models.autoencoder import describe as describe_autoencoder
from ccld.models.checkpoint_files import read_checkpoint
from ccld.models.cloob import describe as describe_cloob
from ccld.models.student import StudentModel
from ccld.train import demo_grids
from ccld.train.distill_module import LightningDistillation
from ccld.train.signals import StopOnSignal
from test_train_autoencoder import Said

SCALE = 1.5


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_cache(root, autoencoder, cloob, images=8, seed=0):
    """A latent cache as precompute_latents.py writes it, of random 4x8x8 posteriors."""
    g = torch.Generator().manual_seed(seed)
    records = [{'key': latent_cache.encode_key(f'{i}'),
                'mean': torch.randn([4, 8, 8], generator=g).half(),
                'std': torch.full([4, 8, 8], 0.05).half(),
                'embed': torch.randn([512], generator=g).half()} for i in range(images)]
    stats = latent_cache.PartStats()
    stats.add(images * 256, 0.0, images * 256.0)
    latent_cache.write_part(root, 0, records, 0, stats)
    latent_cache.finalize(root, 1, {'source': 'random', 'image_size': 64,
                                    'autoencoder': describe_autoencoder(autoencoder),
                                    'cloob': describe_cloob(cloob)})
    return root


@pytest.fixture(scope='module')
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp('distill')
    autoencoder, cloob = tiny.tiny_autoencoder(d), str(tiny.tiny_cloob(d))
    other = tiny.tiny_autoencoder(d / 'other', seed=1)
    (d / 'prompts.txt').write_text('a red circle\na blue square\n')
    record = {'autoencoder': autoencoder, 'cloob_checkpoint': cloob, 'image_size': 64,
              'autoencoder_sha256': sha256(f'{autoencoder}.ckpt'),
              'cloob_checkpoint_sha256': sha256(cloob)}
    teacher = tiny.tiny_diffusion(seed=0, autoencoder_scale=SCALE)
    return SimpleNamespace(
        dir=d, autoencoder=autoencoder, cloob=cloob, other=other, prompts=d / 'prompts.txt',
        teacher_model=teacher,
        teacher=tiny.save_ccld_checkpoint(d / 'teacher.ckpt', teacher, teacher, record),
        bare=tiny.save_bare(teacher, d / 'bare.pth'),
        latents=write_cache(d / 'latents', autoencoder, cloob),
        other_latents=write_cache(d / 'other_latents', other, cloob))


def distill_args(assets, out, *extra):
    """Two stages (guidance, then one round from 2 teacher steps to 1) of 2 steps each."""
    return ['--teacher', str(assets.teacher), '--train-latents', str(assets.latents),
            '--vqgan-model', assets.autoencoder, '--cloob-checkpoint', assets.cloob,
            '--output-dir', str(out), '--image-size', '64', '--batch-size', '4',
            '--num-workers', '0', '--accelerator', 'cpu', '--start-steps', '2',
            '--target-steps', '1', '--round-steps', '2', '--demo-prompts', str(assets.prompts),
            '--demo-steps', '2', '--lr', '1e-4', '--seed', '0', *extra]


def run_distill(argv):
    return tiny.exit_code(distill.main, distill.PROG, argv)


@pytest.fixture(scope='module')
def distilled(assets, tmp_path_factory):
    """A distillation stopped by SIGTERM after step 1 of its last round, then run again
    with --resume-from auto; what each run built and where it started."""
    out = tmp_path_factory.mktemp('distilled') / 'out'
    seen = SimpleNamespace(built=[], started=[], demos=[])
    with pytest.MonkeyPatch.context() as patch:
        init, start = LightningDistillation.__init__, LightningDistillation.on_train_start
        check, sample_latents = StopOnSignal.on_train_batch_end, demo_grids.sample_latents

        def spy_init(self, *args, **kwargs):
            init(self, *args, **kwargs)
            seen.built[-1].append(self.student_steps)

        def spy_start(self):
            start(self)
            seen.started[-1].append((self.student_steps, self.global_step))

        def stop_in_the_last_round(self, trainer, module, *args):
            if module.student_steps == 1 and trainer.global_step == 1 and len(seen.built) == 1:
                self.received = signal.SIGTERM
            return check(self, trainer, module, *args)

        def spy_demo(model_fn, x, steps, method, **kwargs):
            seen.demos.append((method, len(steps)))
            return sample_latents(model_fn, x, steps, method, **kwargs)

        patch.setattr(LightningDistillation, '__init__', spy_init)
        patch.setattr(LightningDistillation, 'on_train_start', spy_start)
        patch.setattr(StopOnSignal, 'on_train_batch_end', stop_in_the_last_round)
        patch.setattr(demo_grids, 'sample_latents', spy_demo)
        seen.codes = []
        said = Said()
        logging.getLogger('pytorch_lightning').addHandler(said)
        try:
            for extra in ([], ['--resume-from', 'auto']):
                seen.built.append([])
                seen.started.append([])
                seen.codes.append(run_distill(distill_args(assets, out, *extra)))
                if not seen.codes[-1]:
                    break
                seen.stopped = copy_run(out, tmp_path_factory.mktemp('stopped') / 'out')
                seen.guidance_bytes = (out / 'student-guidance.ckpt').read_bytes()
        finally:
            logging.getLogger('pytorch_lightning').removeHandler(said)
    seen.out, seen.said = out, '\n'.join(said.lines)
    return seen


def copy_run(out, to):
    """A copy of the output directory `out` as it is now (its checkpoints hard-linked: they
    are only ever replaced whole)."""
    def link_or_copy(source, target):
        return os.link(source, target) if source.endswith('.ckpt') else \
            shutil.copy2(source, target)
    return Path(shutil.copytree(out, to, copy_function=link_or_copy))


def test_an_interrupted_distillation_resumes_in_its_stage_and_round(distilled):
    assert distilled.codes == [128 + signal.SIGTERM, 0]
    # First run: the guidance stage, then the round, stopped after its first step.
    assert distilled.built[0] == [None, 1] and distilled.started[0] == [(None, 0), (1, 0)]
    # Second run: only the round, from its step-1 checkpoint; the guidance student kept.
    assert distilled.built[1] == [1] and distilled.started[1] == [(1, 1)]
    assert (distilled.out / 'student-guidance.ckpt').read_bytes() == distilled.guidance_bytes
    last = torch.load(distilled.out / '1-steps' / 'checkpoints' / 'last.ckpt', weights_only=False)
    assert last['global_step'] == 2 and last['ccld']['distill_stage'] == '1-steps'


def test_a_resumed_round_takes_its_student_and_ema_from_its_checkpoint_in_place(
        distilled, assets, tmp_path):
    """Resuming its round, the student and its EMA are the stage checkpoint's own tensors,
    and Lightning is handed that same checkpoint (it copies each weight onto itself): no
    student made from the teacher, no EMA copied, the file read once."""
    out = copy_run(distilled.stopped, tmp_path / 'out')
    seen = tiny.set_up_run(distill.main, distill_args(assets, out, '--resume-from', 'auto'))
    path, checkpoint = seen.trainer['plugins'][0].resumed
    assert Path(path).parent == out / '1-steps' / 'checkpoints'
    state = checkpoint['state_dict']
    for name in ('model', 'model_ema'):
        model = getattr(seen.module, name)
        assert isinstance(model, StudentModel) and model.guidance_range == (1.0, 8.0)
        for key, tensor in model.state_dict().items():
            if key != 'autoencoder_scale':  # (--autoencoder-scale's, as before)
                assert tensor.data_ptr() == state[f'{name}.{key}'].data_ptr(), (name, key)
    assert not any(p.requires_grad for p in seen.module.model_ema.parameters())
    assert all(p.requires_grad for p in seen.module.model.parameters())


def test_a_resumed_round_ends_as_the_old_way_did(distilled, assets, tmp_path):
    """The resumed round ends with the student, EMA and optimizer state that the old way
    (initialised models, the checkpoint copied into them) gave, bit for bit."""
    out = copy_run(distilled.stopped, tmp_path / 'out')
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(checkpoint_files, 'build_model', tiny.initialised_build)
        assert run_distill(distill_args(assets, out, '--resume-from', 'auto')) == 0
    for name in ('student.ckpt', '1-steps/checkpoints/last.ckpt'):
        new, old = (torch.load(d / name, weights_only=False) for d in (distilled.out, out))
        assert new['global_step'] == old['global_step'] == 2
        assert new['state_dict'].keys() == old['state_dict'].keys()
        for key, tensor in old['state_dict'].items():
            assert torch.equal(new['state_dict'][key], tensor), (name, key)
        for a, b in zip(*(c.get('optimizer_states', [{'state': {}}])[0]['state'].values()
                          for c in (new, old))):
            assert all(torch.equal(a[k], b[k]) for k in ('step', 'exp_avg', 'exp_avg_sq'))


@pytest.mark.parametrize('after', [None, 'guidance'], ids=['first', 'after-a-done-stage'])
def test_a_stage_starts_from_the_random_state_the_old_way_left(distilled, assets, tmp_path,
                                                                after):
    """A stage's teacher (--teacher, or the student of the stage before) is built from its
    file drawing what initialising it drew: a seeded distillation draws its noise as it
    did when the teacher was initialised, then loaded."""
    runs = []
    for way, build in (('new', checkpoint_files.build_model), ('old', tiny.initialised_build)):
        out, extra = tmp_path / way, []
        if after:
            out.mkdir()
            os.link(distilled.stopped / f'student-{after}.ckpt', out / f'student-{after}.ckpt')
            extra = ['--resume-from', 'auto']
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(checkpoint_files, 'build_model', build)
            runs.append(tiny.set_up_run(distill.main, distill_args(assets, out, *extra)))
    new, old = runs
    assert new.module.student_steps == old.module.student_steps == (1 if after else None)
    assert torch.equal(new.random_state, old.random_state)
    for name in ('model', 'model_ema', 'teacher'):
        ours, theirs = (getattr(run.module, name).state_dict() for run in (new, old))
        assert all(torch.equal(ours[key], theirs[key]) for key in theirs), name


def test_each_stage_writes_its_student_and_the_last_is_student_ckpt(distilled, assets):
    out = distilled.out
    assert sorted(p.name for p in out.glob('*.ckpt')) == [
        'student-1-steps.ckpt', 'student-guidance.ckpt', 'student.ckpt']
    assert (out / 'student.ckpt').read_bytes() == (out / 'student-1-steps.ckpt').read_bytes()
    teacher_keys = set(assets.teacher_model.state_dict())
    for name, steps in (('student-guidance.ckpt', None), ('student.ckpt', 1)):
        saved = torch.load(out / name, weights_only=False)
        record = saved['ccld']
        assert (record['teacher'], record['teacher_sha256']) == (str(assets.teacher),
                                                                 sha256(assets.teacher))
        assert record['student_steps'] == steps and record['guidance_range'] == [1.0, 8.0]
        assert record['autoencoder_sha256'] == sha256(f'{assets.autoencoder}.ckpt')
        keys = {k.removeprefix('model_ema.') for k in saved['state_dict']}
        assert teacher_keys <= keys
        assert {k.split('.')[0] for k in keys - teacher_keys} == {'guidance_embed'}
        assert read_checkpoint(out / name).autoencoder_scale == SCALE


def test_the_demo_grids_are_drawn_by_each_student_in_its_own_steps(distilled):
    """The guidance stage with the demo flags (PLMS, 2 steps), the round with its DDIM step."""
    assert ('plms', 2) in distilled.demos and ('ddim', 1) in distilled.demos
    assert set(distilled.demos) == {('plms', 2), ('ddim', 1)}
    for stage in ('guidance', '1-steps'):
        assert list((distilled.out / stage / 'demos').glob('demo_*.png'))


def sample_args(assets, checkpoint, out, *extra):
    return ['a red fox', '--checkpoint', str(checkpoint), '--autoencoder', assets.autoencoder,
            '--cloob-checkpoint', assets.cloob, '--output-dir', str(out), '-n', '2',
            '--seed', '3', '--device', 'cpu', *extra]


def test_a_student_samples_in_sample_py_with_its_steps_one_call_a_step(distilled, assets,
                                                                        tmp_path, monkeypatch):
    calls = []
    forward = StudentModel.forward

    def counted(self, x, t, *args):
        calls.append(x.shape[0])
        return forward(self, x, t, *args)
    monkeypatch.setattr(StudentModel, 'forward', counted)
    student = distilled.out / 'student.ckpt'
    assert tiny.exit_code(sample.main, 'sample.py', sample_args(assets, student, tmp_path)) == 0
    assert calls == [2]  # one step, one call for both images (no unconditional half)
    text = Image.open(tmp_path / 'out_00000.png').text
    assert (text['method'], text['steps']) == ('ddim', '1')


@pytest.mark.parametrize('extra', [['--method', 'plms'], ['--steps', '4'],
                                   ['--schedule', 'karras'], ['--eta', '0.5']])
def test_a_student_refuses_samplers_it_was_not_distilled_for(distilled, assets, tmp_path,
                                                             capsys, extra):
    argv = sample_args(assets, distilled.out / 'student.ckpt', tmp_path, *extra)
    assert tiny.exit_code(sample.main, 'sample.py', argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'is a student distilled for 1 step of DDIM' in err[0], err


def test_cond_scale_outside_the_students_range_warns(distilled, assets, tmp_path):
    argv = sample_args(assets, distilled.out / 'student.ckpt', tmp_path, '--cond-scale', '12')
    with pytest.warns(UserWarning, match='guidance scale 12 is outside the range 1 to 8'):
        assert tiny.exit_code(sample.main, 'sample.py', argv) == 0


def test_the_guidance_student_takes_any_sampler(distilled, assets, tmp_path):
    argv = sample_args(assets, distilled.out / 'student-guidance.ckpt', tmp_path,
                       '--method', 'dpmpp_2m', '--steps', '3')
    assert tiny.exit_code(sample.main, 'sample.py', argv) == 0


def test_a_student_exports_and_its_export_samples_the_same_images(distilled, assets, tmp_path):
    export = tmp_path / 'student.safetensors'
    student = distilled.out / 'student.ckpt'
    assert tiny.exit_code(export_model.main, 'export_model.py',
                          [str(student), str(export), '--dtype', 'fp32']) == 0
    record = read_checkpoint(export).record
    assert (record['student_steps'], record['guidance_range'], record['teacher_sha256']) == \
        (1, [1.0, 8.0], sha256(assets.teacher))
    for source, out in ((student, tmp_path / 'a'), (export, tmp_path / 'b')):
        assert tiny.exit_code(sample.main, 'sample.py', sample_args(assets, source, out)) == 0
    for name in ('out_00000.png', 'out_00001.png'):
        assert np.array_equal(np.asarray(Image.open(tmp_path / 'a' / name)),
                              np.asarray(Image.open(tmp_path / 'b' / name)))


def test_the_printed_command_samples_the_student_as_printed_from_another_folder(distilled,
                                                                               tmp_path):
    """With the frozen models the distillation recorded, no flag naming them."""
    said = distilled.said.split('sample it with: ')[-1]
    assert tiny.run_printed_sample_command(said, tmp_path, '-n', '1', '--device', 'cpu') == 0
    with Image.open(tmp_path / 'out_00000.png') as image:
        assert (image.size, image.text['checkpoint'], image.text['steps']) == \
            ((64, 64), 'student.ckpt', '1')


def test_training_refuses_to_resume_from_a_student(distilled):
    from ccld.train.run import read_resume
    with pytest.raises(UserError, match='is a distilled student'):
        read_resume(distilled.out / 'student.ckpt')


def _teacher_of_another_autoencoder(assets):
    record = {'autoencoder': assets.other, 'autoencoder_sha256': sha256(f'{assets.other}.ckpt')}
    return ['--teacher', str(tiny.save_ccld_checkpoint(assets.dir / 'other_teacher.ckpt',
                                                       assets.teacher_model,
                                                       assets.teacher_model, record))]


@pytest.mark.parametrize('make_extra, message', [
    (_teacher_of_another_autoencoder, 'was trained with autoencoder'),
    (lambda a: ['--teacher', str(a.bare), '--train-latents', str(a.other_latents)],
     'was made with autoencoder'),
    (lambda a: ['--teacher', str(a.dir / 'missing.ckpt')], '--teacher: checkpoint'),
    (lambda a: ['--start-steps', '6', '--target-steps', '4'], 'times 2, 4, 8'),
    (lambda a: ['--guidance-range', '8,1'], 'the first number must be below the second'),
    (lambda a: ['--resume-from', str(a.teacher)], '--resume-from takes "auto" only'),
    (lambda a: ['--train-latents', str(a.dir)], 'not a latent cache'),
])
def test_usage_errors_before_any_model_loads(assets, tmp_path, capsys, monkeypatch,
                                             make_extra, message):
    def refuse(*args, **kwargs):
        raise AssertionError('a model was loaded before the arguments were checked')
    monkeypatch.setattr('ccld.models.autoencoder.load_autoencoder', refuse)
    monkeypatch.setattr('ccld.models.cloob.load_cloob', refuse)
    assert run_distill(distill_args(assets, tmp_path / 'out', *make_extra(assets))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('distill.py: error: ') and message in err[0], err


def test_a_fresh_run_into_a_directory_with_students_is_refused(distilled, assets, capsys):
    assert run_distill(distill_args(assets, distilled.out)) == 2
    assert 'already holds' in capsys.readouterr().err


def test_continuing_with_another_teacher_or_range_is_refused(distilled, assets, tmp_path,
                                                            capsys):
    """Whether a student is done (its file says) or only a stage's checkpoint is there."""
    checkpoints = tmp_path / 'out' / 'guidance' / 'checkpoints'
    checkpoints.mkdir(parents=True)
    shutil.copy(distilled.out / 'guidance' / 'checkpoints' / 'last.ckpt', checkpoints)
    for out in (distilled.out, tmp_path / 'out'):
        for extra, message in ((['--teacher', str(assets.bare)], 'from another teacher'),
                               (['--guidance-range', '2,6'], 'for --guidance-range 1,8')):
            assert run_distill(distill_args(assets, out, '--resume-from', 'auto', *extra)) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and message in err[0], err


# A number of loader workers that is not the default (one per usable CPU).
WORKERS = 1 if distill.parser().get_default('num_workers') != 1 else 2


@pytest.fixture(scope='module')
def set_up(assets, tmp_path_factory):
    """distill.py with every flag at a value other than its default, up to where its first
    stage (guidance) would train."""
    out = tmp_path_factory.mktemp('set_up') / 'out'
    argv = distill_args(assets, out, '--guidance-range', '2,6', '--round-steps', '6',
                        '--loss-weighting', 'truncated-snr', '--autoencoder-scale', '2.5',
                        '--batch-size', '3', '--num-workers', str(WORKERS),
                        '--prefetch-factor', '3', '--lr', '2e-4', '--lr-warmup-steps', '2',
                        '--lr-schedule', 'inverse-sqrt', '--lr-min', '1.5e-4',
                        '--accumulate-grad-batches', '3', '--grad-clip', '0.5',
                        '--max-bad-steps', '4', '--seed', '7', '--checkpoint-every', '9',
                        '--checkpoint-minutes', '2', '--keep-last', '2', '--signal', 'SIGUSR2',
                        '--wandb-project', 'distill-flags', '--num-gpus', '2', '--num-nodes',
                        '3', '--strategy', 'ddp_spawn', '--fprecision', 'bf16',
                        '--peak-tflops', '123', '--demo-every', '5', '--demo-steps', '3',
                        '--demo-method', 'plms2', '--demo-schedule', 'karras', '--demo-size',
                        '128x64', '--compile',
                        '--channels-last', '--tf32', '--gradient-checkpointing')
    seen = tiny.set_up_run(distill.main, argv)
    seen.out, seen.record = out, seen.module.record
    return seen


def checkpointed(model):
    from ccld.models.unet import Block
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    return blocks and all(b.checkpointing for b in blocks)


# 2e-4 step / 2 over the 2-step warmup, then 2e-4 sqrt(2 / step), floored at 1.5e-4.
INVERSE_SQRT_LRS = [1e-4, 2e-4, 2e-4 * (2 / 3) ** 0.5, 1.5e-4]
DISTILL_SET_UP = {  # flag -> what set_up must show for the value it gave
    '--teacher': lambda run, a: (run.record['teacher'], run.record['teacher_sha256']) == (
        str(a.teacher), sha256(a.teacher)),
    '--train-latents': lambda run, a: run.loader.dataset.input_dir.path == str(a.latents),
    '--guidance-range': lambda run, a: run.module.guidance_range == (2, 6) == tuple(
        run.record['guidance_range']) == run.module.model.guidance_range,
    '--round-steps': lambda run, a: run.trainer['max_steps'] == 6,
    '--loss-weighting': lambda run, a: run.module.weighting == 'truncated-snr' == run.record[
        'loss_weighting'],
    '--autoencoder-scale': lambda run, a: run.module.model.autoencoder_scale.item() == 2.5,
    '--vqgan-model': lambda run, a: run.record['autoencoder'] == a.autoencoder,
    '--cloob-checkpoint': lambda run, a: run.record['cloob_checkpoint'] == a.cloob,
    '--image-size': lambda run, a: run.record['image_size'] == 64 and run.callbacks[
        'Throughput'].latent_size == 8,
    '--batch-size': lambda run, a: run.loader.batch_size == 3,
    '--num-workers': lambda run, a: run.loader.num_workers == WORKERS,
    '--prefetch-factor': lambda run, a: run.loader.prefetch_factor == 3,
    **dict.fromkeys(['--lr', '--lr-warmup-steps', '--lr-schedule', '--lr-min'],
                    lambda run, a: tiny.learning_rates(run.module, [1, 2, 3, 8]) == pytest.approx(
                        INVERSE_SQRT_LRS, rel=1e-9)),
    '--accumulate-grad-batches': lambda run, a: run.module.accumulate == 3,
    '--grad-clip': lambda run, a: run.module.grad_clip == 0.5,
    '--max-bad-steps': lambda run, a: run.module.max_bad_steps == 4,
    '--output-dir': lambda run, a: (run.trainer['default_root_dir'],
                                    run.callbacks['Checkpoints'].dirpath) == (
                                        str(run.out / 'guidance'),
                                        str(run.out / 'guidance' / 'checkpoints')),
    '--seed': lambda run, a: run.seed == 7 == run.module.seed,
    '--checkpoint-every': lambda run, a: run.callbacks['Checkpoints']._every_n_train_steps == 9,
    '--checkpoint-minutes': lambda run, a: run.callbacks['TimedLastCheckpoint'].seconds == 120,
    '--keep-last': lambda run, a: run.callbacks['Checkpoints'].save_top_k == 2,
    '--signal': lambda run, a: signal.SIGUSR2 in run.callbacks['StopOnSignal'].signals,
    '--wandb-project': lambda run, a: run.trainer['logger'].name == 'distill-flags',
    '--num-gpus': lambda run, a: run.trainer['devices'] == 2,
    '--num-nodes': lambda run, a: run.trainer['num_nodes'] == 3,
    '--accelerator': lambda run, a: run.trainer['accelerator'] == 'cpu',
    '--strategy': lambda run, a: run.trainer['strategy'] == 'ddp_spawn',
    '--fprecision': lambda run, a: run.trainer['precision'] == 'bf16-mixed',
    '--peak-tflops': lambda run, a: run.callbacks['Throughput'].peak_tflops == 123,
    '--demo-prompts': lambda run, a: run.callbacks['DemoCallback'].prompts == [
        'a red circle', 'a blue square'],
    '--demo-every': lambda run, a: run.callbacks['DemoCallback'].every == 5,
    '--demo-steps': lambda run, a: run.callbacks['DemoCallback'].steps == 3,
    '--demo-method': lambda run, a: run.callbacks['DemoCallback'].method == 'plms2',
    '--demo-schedule': lambda run, a: run.callbacks['DemoCallback'].schedule == 'karras',
    '--demo-size': lambda run, a: run.callbacks['DemoCallback'].latent_size == (16, 8),
    '--compile': lambda run, a: run.module.model._compiled_call_impl is not None,
    '--channels-last': lambda run, a: run.module.model.net[0].main[0].weight.is_contiguous(
        memory_format=torch.channels_last),
    '--tf32': lambda run, a: run.tf32 == (True, True),
    '--gradient-checkpointing': lambda run, a: checkpointed(run.module.model),
}


@pytest.mark.parametrize('flag', DISTILL_SET_UP)
def test_each_flag_reaches_the_trainer_module_loader_or_callback_it_sets(assets, set_up, flag):
    """Each flag, given a value other than its default, is found where the stage uses it."""
    assert DISTILL_SET_UP[flag](set_up, assets)

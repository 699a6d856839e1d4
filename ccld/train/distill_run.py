"""What distill.py does once its flags are parsed: check every argument, then run the
stages one after the other, each a training run of its own.

    guidance      the teacher's guided v in one call (the student takes w as an input)
    N-steps       a progressive round: N DDIM steps of the student for 2N of its teacher,
                  the previous stage's student; N from --start-steps / 2 to --target-steps

Stage NAME trains in OUTPUT_DIR/NAME (checkpoints, demo grids, logs), with every machinery
of training: atomic checkpoints, stop signals, timed saves, skipped non-finite steps, DDP,
throughput, wandb. When it ends, its student (the EMA weights) is written atomically to
OUTPUT_DIR/student-NAME.ckpt, and that file is what says the stage is done: --resume-from
auto skips the stages whose students exist, resumes the next one from its newest
checkpoint, and starts the rest afresh. The last student is OUTPUT_DIR/student.ckpt too.
"""

import copy
import gc
import itertools
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..cli import check_devices, check_frozen_model_files, check_image_size, sample_command
from ..errors import UserError
from ..files import atomic_write, sha256
from ..models import hub
from ..processes import is_first_process
from . import runner
from .distill_flags import PROG
from .run import (TrainData, cache_buckets, check_lr_schedule, check_text_prob,
                  checkpoint_bytes, describe_frozen, load_frozen_models, read_cache,
                  read_prompts)

REQUIRED = ['teacher', 'train_latents', 'vqgan_model']
FINAL = 'student.ckpt'
TEACHER_FORWARDS = 2  # teacher U-Net passes per training example, in either stage
UNLOGGED = ('teacher_ckpt', 'cache', 'source', 'prompts', 'frozen', 'stages', 'resume_paths')


@dataclass(frozen=True)
class Stage:
    steps: Optional[int]  # the student's DDIM steps; None for guidance distillation

    @property
    def name(self):
        return 'guidance' if self.steps is None else f'{self.steps}-steps'

    @property
    def student_file(self):
        return f'student-{self.name}.ckpt'


def plan(start_steps, target_steps):
    """The stages from the guidance stage to the round whose student takes target_steps."""
    ratio = start_steps // target_steps
    if start_steps % target_steps or ratio < 2 or ratio & (ratio - 1):
        raise UserError(f'--start-steps {start_steps} must be --target-steps {target_steps} '
                        'times 2, 4, 8, ...: each round halves the steps.')
    rounds, steps = [], start_steps // 2
    while steps >= target_steps:
        rounds.append(Stage(steps))
        steps //= 2
    return [Stage(None), *rounds]


def read_teacher(args):
    """The --teacher checkpoint, checked: complete weights, not a student itself, and an
    autoencoder scale (its own, or --autoencoder-scale)."""
    from ..models.checkpoint_files import check_weights, read_checkpoint
    from ..models.student import is_student
    try:
        ckpt = read_checkpoint(args.teacher)
        check_weights(ckpt.model_ema, args.teacher)
    except UserError as e:
        raise UserError(f'--teacher: {e}') from None
    if is_student(ckpt.model_ema):
        raise UserError(f'--teacher: {args.teacher} is a distilled student already; pass the '
                        'model it was distilled from.')
    if args.autoencoder_scale is None and ckpt.autoencoder_scale is None:
        raise UserError(f'--teacher: {args.teacher} records no autoencoder scale; pass the one '
                        'it was trained with as --autoencoder-scale.')
    return ckpt


def check_teacher_frozen_models(record, frozen, teacher):
    """Refuses a teacher whose record names another autoencoder or CLOOB than the flags
    (by content): the student would learn from latents the teacher never saw."""
    for key, ours, flag in (('autoencoder', frozen['autoencoder'], '--vqgan-model'),
                            ('cloob_checkpoint', frozen['cloob'], '--cloob-checkpoint')):
        digest = record.get(f'{key}_sha256')
        if digest and digest != ours['sha256']:
            raise UserError(f'--teacher {teacher} was trained with {key.replace("_", " ")} '
                            f'{record.get(key)} (sha256 {digest[:12]}), but {flag} gives '
                            f'{ours["name"]} (sha256 {ours["sha256"][:12]}); pass the one it '
                            'was trained with.')


def check_same_distillation(record, args, path):
    """Refuses to continue, in --output-dir, a distillation of another teacher or range."""
    if args.teacher_sha256 is not None and record.get('teacher_sha256') != args.teacher_sha256:
        raise UserError(f'{path} was distilled from another teacher ({record.get("teacher")}); '
                        'pass that --teacher, or a new --output-dir.')
    if list(record.get('guidance_range', ())) != list(args.guidance_range):
        recorded = ','.join(f'{w:g}' for w in record.get('guidance_range', ()))
        raise UserError(f'{path} was distilled for --guidance-range {recorded or "unknown"}; '
                        'pass the same, or a new --output-dir.')


def stage_checkpoint_reader(stage):
    """read() for --resume-from auto in a stage's directory: a checkpoint of that stage
    (its record says which); others are skipped."""
    from ..models.checkpoint_files import read_checkpoint

    def read(path):
        ckpt = read_checkpoint(path)
        if ckpt.record.get('distill_stage') != stage.name:
            raise UserError(f'it is not a checkpoint of the {stage.name} stage.')
        return ckpt
    return read


def validate(args):
    """Checks every argument before any model loads; raises UserError naming the flag.

    Adds to `args` the teacher's checkpoint, the cache manifest, the demo prompts, the
    stages, and where each unfinished stage resumes (`resume_paths`); on the first
    process of a run, takes the output directory's lock.
    """
    from ..models.unet import infer_widths
    for name in REQUIRED:
        if getattr(args, name) is None:
            raise UserError(f'--{name.replace("_", "-")} is required.')
    if args.resume_from not in (None, 'auto'):
        raise UserError('--resume-from takes "auto" only: a distillation continues from the '
                        'checkpoints in its --output-dir.')
    args.stages = plan(args.start_steps, args.target_steps)
    args.max_steps = args.round_steps  # every stage is a run of --round-steps
    check_image_size(args.image_size)
    hub.resolve_frozen_models(args)
    check_frozen_model_files(args.vqgan_model, args.cloob_checkpoint)
    check_lr_schedule(args)
    args.prompts = read_prompts(args.demo_prompts) if args.demo_prompts else None
    check_devices(args.accelerator, args.devices)
    args.teacher = hub.resolve(args.teacher, '--teacher')
    args.teacher_ckpt = read_teacher(args)
    args.frozen = describe_frozen(args)
    args.teacher_sha256 = None
    if args.frozen is not None:
        check_teacher_frozen_models(args.teacher_ckpt.record, args.frozen, args.teacher)
    args.source, args.cache = None, read_cache(args)
    args.buckets = cache_buckets(args.cache, args.train_latents)
    if args.text_prob is None:  # the student learns on the conditions its teacher learnt on
        args.text_prob = args.teacher_ckpt.record.get('text_prob', 0.0)
    check_text_prob(args)
    if args.frozen is not None:  # (hashing the teacher: the first process alone records it)
        args.teacher_sha256 = sha256(args.teacher)
    out = Path(args.output_dir)
    args.lock = None
    if is_first_process():
        size = checkpoint_bytes(*infer_widths(args.teacher_ckpt.model_ema))
        args.lock = runner.claim_output_dir(out, args.resume_from, size,
                                            checkpoint_dirs=list(out.glob('*/checkpoints')))
    with runner.released_on_exit(args.lock, error_only=True):
        # A fresh run would replace the students too (the first process checks).
        students = sorted(out.glob('student*.ckpt'))
        if args.lock is not None and args.resume_from is None and students:
            raise UserError(f'--output-dir: {out} already holds students ({students[0].name}); '
                            'pass --resume-from auto to continue that distillation, or a new '
                            '--output-dir.')
        args.resume_paths = resume_paths(args, out) if args.resume_from == 'auto' else {}
    return args


def resume_paths(args, out):
    """{stage name: the checkpoint it resumes from} for the unfinished stages that have
    one; UserError if what is there was distilled from another teacher or range."""
    from ..models.checkpoint_files import read_checkpoint
    paths = {}
    for stage in args.stages:
        done = out / stage.student_file
        if done.is_file():
            check_same_distillation(read_checkpoint(done).record, args, done)
        elif (out / stage.name / 'checkpoints').is_dir():
            path, ckpt = runner.newest_checkpoint(out / stage.name, stage_checkpoint_reader(stage))
            if ckpt is not None:
                check_same_distillation(ckpt.record, args, path)
            paths[stage.name] = path
    return paths


@runner.releasing_lock
def run(args):
    """Runs the stages that are not done; returns the final student's path."""
    from pytorch_lightning.utilities import rank_zero_info

    from ..models.checkpoint_files import build_model
    runner.quiet_lightning()
    out = Path(args.output_dir)
    seed = runner.seed_run(args.seed)
    runner.set_tf32(args.tf32)
    # The stages whose students exist are done; they come first.
    done = list(itertools.takewhile(lambda s: (out / s.student_file).is_file(), args.stages))
    todo = args.stages[len(done):]
    rank_zero_info('Distilling ' + ', then '.join(
        f'{s.name} ({"done" if s in done else resume_note(args, s)})' for s in args.stages)
        + f'; {args.round_steps} steps each.')
    if todo:
        scale = args.autoencoder_scale or args.teacher_ckpt.autoencoder_scale
        ae_model, cloob = load_frozen_models(args)
        # Built from the file's tensors, drawing what initialising it drew (the noise of
        # a seeded run comes after).
        teacher = read_student(out / done[-1].student_file, init_draws=True) if done else \
            build_model(args.teacher_ckpt.model_ema, path=args.teacher, init_draws=True)
        args.teacher_ckpt = None  # its weights are in `teacher` now
        data = TrainData(args, seed)
    for stage in todo:
        module = run_stage(args, stage, ae_model, cloob, teacher, scale, data, seed)
        teacher = module.model_ema  # the same on every rank
        if module.trainer.is_global_zero:
            write_student(out / stage.student_file, teacher, module.record,
                          module.trainer.global_step)
        del module
        gc.collect()  # the finished stage's student, optimizer and old teacher
    final = out / FINAL
    if is_first_process():
        link_or_copy(out / args.stages[-1].student_file, final)
        rank_zero_info(f'The {args.target_steps}-step student is {final}; sample it with: '
                       f'{sample_command(final)}')
    return final


def resume_note(args, stage):
    path = args.resume_paths.get(stage.name)
    return f'resuming from {path}' if path else 'to do'


def record_of(args, stage, scale):
    """The 'ccld' record of a stage's checkpoints and student: what training records, and
    which teacher it was distilled from, for which steps and guidance range."""
    from ..models.frozen_files import AUTOENCODER, CLOOB, recorded
    record = {'autoencoder': recorded(AUTOENCODER, args.vqgan_model),
              'cloob_checkpoint': recorded(CLOOB, args.cloob_checkpoint),
              'image_size': args.image_size,
              'teacher': hub.name_of(os.path.abspath(args.teacher)),
              'teacher_sha256': args.teacher_sha256,
              'guidance_range': list(args.guidance_range), 'distill_stage': stage.name,
              'student_steps': stage.steps, 'loss_weighting': args.loss_weighting,
              'train_set': args.train_latents, 'train_images': args.cache['images']}
    if args.text_prob:
        record['text_prob'] = args.text_prob
    if args.frozen is not None:
        record.update(autoencoder_sha256=args.frozen['autoencoder']['sha256'],
                      cloob_checkpoint_sha256=args.frozen['cloob']['sha256'])
    return record


def run_stage(args, stage, ae_model, cloob, teacher, scale, data, seed):
    """One stage as a training run in OUTPUT_DIR/NAME; returns its module. A stage that
    resumes takes its student and EMA from its checkpoint in place, as a continued
    training run does (run.run)."""
    from pytorch_lightning.utilities import rank_zero_info

    from ..models.checkpoint_files import build_model, read_checkpoint
    from ..models.student import student_of
    from .demo_grids import DemoCallback, demo_latent_size
    from .distill_module import LightningDistillation
    from .throughput import Throughput

    stage_dir = Path(args.output_dir) / stage.name
    stage_args = copy.copy(args)
    stage_args.output_dir, stage_args.stage = str(stage_dir), stage.name
    ckpt_path = args.resume_paths.get(stage.name)
    resume = read_checkpoint(ckpt_path) if ckpt_path else None
    if resume is None:
        student, student_ema = student_of(teacher), None
    else:
        student = build_model(resume.model, path=ckpt_path)
        student_ema = build_model(resume.model_ema, path=ckpt_path)
    for model in filter(None, (student, student_ema)):
        model.guidance_range = tuple(args.guidance_range)
    module = LightningDistillation(
        ae_model, cloob, teacher, student, stage.steps, args.guidance_range,
        args.loss_weighting, autoencoder_scale=scale, lr=args.lr,
        record=record_of(args, stage, scale), seed=seed, grad_clip=args.grad_clip,
        accumulate_grad_batches=args.accumulate_grad_batches, max_bad_steps=args.max_bad_steps,
        compile=args.compile, channels_last=args.channels_last,
        gradient_checkpointing=args.gradient_checkpointing, text_prob=args.text_prob,
        model_ema=student_ema,
        lr_schedule=dict(warmup=args.lr_warmup_steps, schedule=args.lr_schedule,
                         minimum=args.lr_min, total=args.round_steps))
    latent_size = args.image_size // 8
    callbacks = [Throughput(latent_size, args.peak_tflops, TEACHER_FORWARDS)]
    if args.prompts:
        # The student's own sampler: its DDIM steps, or (guidance stage) the demo flags'.
        sampler = dict(method='ddim', steps=stage.steps, schedule='spliced') if stage.steps \
            else dict(method=args.demo_method, steps=args.demo_steps, schedule=args.demo_schedule)
        callbacks.insert(0, DemoCallback(args.prompts, args.demo_every, stage_dir / 'demos',
                                         latent_size=demo_latent_size(args), seed=seed,
                                         **sampler))
    logger, where = runner.make_logger(stage_args, stage_dir, UNLOGGED)
    steps_per_epoch = args.cache['images'] // (args.batch_size * args.devices * args.num_nodes)
    trainer = runner.make_trainer(stage_args, PROG, callbacks, logger,
                                  log_every_n_steps=max(1, min(50, args.demo_every,
                                                               steps_per_epoch)),
                                  resumed=(str(ckpt_path), resume.raw) if resume else None)
    del resume  # (its weights are the module's; the trainer alone passes on the rest)
    rank_zero_info(f'Stage {stage.name}: {describe(stage)}; checkpoints in '
                   f'{stage_dir / "checkpoints"}, logs to {where}.')
    runner.fit(trainer, module, data, ckpt_path and str(ckpt_path), PROG)
    # The module kept CLOOB's image tower aside (the cache holds the image embeddings);
    # the next stage's takes it from where it was.
    cloob.model.image_encoder = module.spare_image_tower[0]
    if args.wandb_project:  # one wandb run a stage: each counts its steps from 0
        import wandb
        wandb.finish()
    return module


def describe(stage):
    if stage.steps is None:
        return "the teacher's guided v in one call, for any w of --guidance-range"
    return f'{stage.steps} DDIM steps for {2 * stage.steps} of the previous student'


def read_student(path, init_draws=False):
    """A student written by write_student, frozen, with its guidance range."""
    from ..models.checkpoint_files import build_model, read_checkpoint
    ckpt = read_checkpoint(path)
    model = build_model(ckpt.model_ema, path=path, init_draws=init_draws)
    model.guidance_range = tuple(ckpt.record['guidance_range'])
    return model.eval().requires_grad_(False)


def write_student(path, model, record, step):
    """A student's file: its weights (the EMA) and its record, which sample.py and
    export_model.py read like a training checkpoint's."""
    from .saving import save
    state = {f'model_ema.{k}': v.detach().cpu() for k, v in model.state_dict().items()}
    with atomic_write(path) as f:
        save({'state_dict': state, 'ccld': record, 'global_step': step}, f)


def link_or_copy(source, target):
    """Makes `target` the same file as `source` (a hard link, else a copy), atomically."""
    from ..files import temp_name
    tmp = temp_name(target)
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
        os.replace(tmp, target)
    except OSError:
        tmp.unlink(missing_ok=True)
        with open(source, 'rb') as src, atomic_write(target) as dst:
            shutil.copyfileobj(src, dst)

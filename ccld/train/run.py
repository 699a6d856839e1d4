"""What train_latent_diffusion.py does once its flags are parsed: check every argument,
load the frozen models, set up Lightning, resume or finetune, and train."""

import math
from pathlib import Path

import torch

from ..cli import check_devices, check_frozen_model_files, check_image_size
from ..errors import UserError
from ..processes import init_loader_worker, is_first_process
from . import runner
from .flags import PROG

REQUIRED = ['vqgan_model', 'autoencoder_scale', 'demo_prompts']
BYTES_PER_PARAMETER = 16  # a checkpoint holds the model, its EMA and two Adam moments in fp32
# What validate() adds to the flags that is no setting, left out of the wandb config.
UNLOGGED = ('source', 'cache', 'resume', 'prompts', 'frozen', 'base', 'lora', 'origin')
# A LoRA run's frozen base is kept in 16 bits under 16-bit mixed precision; the adapters
# stay fp32. Precisions that cast every weight (16-true, ...) would make them 16-bit too.
LORA_BASE_DTYPES = {'16-mixed': torch.float16, 'bf16-mixed': torch.bfloat16,
                    '32-true': torch.float32, '64-true': torch.float64}


def read_prompts(path):
    from ..files import read_text_lines
    prompts = read_text_lines(path, '--demo-prompts:')
    if not prompts:
        raise UserError(f'--demo-prompts: {path} has no prompts in it (one per line).')
    return prompts


def validate(args):
    """Checks every argument before any model is loaded; raises UserError naming the flag.

    Adds the training data (`source` or `cache`), the prompts and the --resume-from
    checkpoint to `args`, and, on the first process of a run, takes the output
    directory's lock.
    """
    from ..data.sources import Source
    from ..models import hub

    for name in REQUIRED:
        if getattr(args, name) is None:
            raise UserError(f'--{name.replace("_", "-")} is required.')
    if args.train_set is None and args.train_latents is None:
        raise UserError('--train-set is required (or --train-latents DIR, a latent cache made by '
                        'precompute_latents.py).')
    if args.train_set is not None and args.train_latents is not None:
        raise UserError('pass --train-set or --train-latents, not both.')
    widths = [args.base_channels * m for m in args.channel_multipliers]
    if any(w % 64 for w in widths):
        raise UserError(f'--base-channels {args.base_channels} with --channel-multipliers '
                        f'{",".join(map(str, args.channel_multipliers))} gives widths '
                        f'{",".join(map(str, widths))}; each must be a multiple of 64 '
                        '(one attention head per 64 channels).')
    check_image_size(args.image_size)
    hub.resolve_frozen_models(args)
    check_frozen_model_files(args.vqgan_model, args.cloob_checkpoint)
    check_lr_schedule(args)
    check_optimizer(args)
    check_lora_flags(args)
    if args.random_flip and args.train_latents is not None:
        raise UserError('--random-flip flips images before they are encoded; a latent cache '
                        'holds them encoded already: train with --train-set to flip.')
    args.source = args.cache = None
    if args.train_set is not None:
        try:
            args.source = Source(args.train_set, image_column=args.image_column,
                                 split=args.dataset_split, caption_column=args.caption_column)
        except UserError as e:
            raise UserError(f'--train-set: {e}') from None
    args.prompts = read_prompts(args.demo_prompts)
    check_devices(args.accelerator, args.devices)
    args.frozen = describe_frozen(args)
    if args.train_latents is not None:
        args.cache = read_cache(args)
    args.buckets = check_buckets(args)
    check_text_prob(args)
    args.resume = None
    if args.resume_from not in (None, 'auto'):
        args.resume_from = hub.resolve(args.resume_from, '--resume-from')
        args.resume = read_resume(args.resume_from)
    args.lock = None
    if is_first_process():
        args.lock = runner.claim_output_dir(
            args.output_dir, args.resume_from,
            checkpoint_bytes(args.base_channels, args.channel_multipliers))
    with runner.released_on_exit(args.lock, error_only=True):
        if args.resume_from == 'auto':
            path, args.resume = runner.newest_checkpoint(args.output_dir, read_resume)
            args.resume_from = None if path is None else str(path)
        args.lora = lora_run(args)
        args.origin = origin(args)
    return args


ORIGIN = ('finetuned_from', 'finetuned_from_sha256')


def origin(args):
    """What a run records of the model it started from: a finetune the file it started
    from (its hub name if it came from the hub) and the file's sha256; a continued run
    what the checkpoint it continues recorded. (A LoRA run names its base in its 'lora'
    record.) Hashed by the first process alone: it alone writes checkpoints."""
    resume = args.resume
    if resume is None or args.lora is not None:
        return {}
    if resume.kind != 'bare':
        return {key: resume.record[key] for key in ORIGIN if key in resume.record}
    if not is_first_process():
        return {}
    from ..files import sha256
    from ..models.hub import name_of
    return {'finetuned_from': name_of(args.resume_from),
            'finetuned_from_sha256': sha256(args.resume_from)}


CPU_EMA_OF_ADAPTERS = ('--ema-device cpu moves a full finetune\'s EMA off the GPU; a LoRA '
                       'run\'s EMA is its adapters\' (megabytes): drop --ema-device cpu.')


def check_lora_flags(args):
    if args.lora_rank is None and (args.lora_alpha is not None or args.lora_targets is not None):
        raise UserError('--lora-alpha and --lora-targets set up the adapters of a LoRA run: '
                        'pass --lora-rank too.')
    if args.lora_rank is not None and args.ema_device == 'cpu':
        raise UserError(CPU_EMA_OF_ADAPTERS)
    if args.lora_rank is not None and args.resume_from is None:
        raise UserError('--lora-rank trains adapters on a base model: pass it as --resume-from '
                        'BASE (a released state dict, a checkpoint or an export).')


def lora_run(args):
    """The Adapter a LoRA run trains (its settings; the weights come fresh, or from the
    checkpoint it continues), or None for a run that trains every weight. Sets args.base
    to the base model's DiffusionCheckpoint."""
    from ..models import lora
    args.base, resume = None, args.resume
    if resume is not None and resume.kind == 'lora':
        adapter = lora.from_checkpoint(resume)
        for flag, given, theirs in (
                ('--lora-rank', args.lora_rank, adapter.rank),
                ('--lora-alpha', args.lora_alpha and float(args.lora_alpha), adapter.alpha),
                ('--lora-targets', args.lora_targets and sorted(args.lora_targets),
                 sorted(adapter.targets))):
            if given is not None and given != theirs:
                shown = ','.join(theirs) if isinstance(theirs, list) else f'{theirs:g}'
                raise UserError(f'{flag}: {args.resume_from} continues a LoRA run with {flag} '
                                f'{shown}; drop the flag, or start another run into a new '
                                '--output-dir.')
        if args.ema_device == 'cpu':
            raise UserError(f'{args.resume_from} continues a LoRA run: {CPU_EMA_OF_ADAPTERS}')
        adapter.state = {}  # Lightning loads the adapters with the rest of the checkpoint
        args.base = resume.base
    elif args.lora_rank is None:
        return None
    elif resume is None:
        raise UserError(f'--lora-rank: --resume-from auto found no checkpoint in '
                        f'{Path(args.output_dir) / "checkpoints"} to continue, and a LoRA run '
                        'starts from a base model: pass it as --resume-from BASE.')
    else:
        adapter = lora.spec_of(args.lora_rank, args.lora_alpha, args.lora_targets,
                               args.resume_from, resume.model_ema)
        args.base = resume
    if args.fprecision not in LORA_BASE_DTYPES:
        raise UserError(f'--fprecision {args.fprecision} would make the LoRA adapters 16-bit '
                        'too (a GradScaler cannot step fp16 weights); pass 16 or bf16, which '
                        'keep the base in 16 bits and the adapters in fp32.')
    return adapter


def checkpoint_bytes(base_channels, channel_multipliers):
    """About what one checkpoint of a model of these widths takes on disk."""
    from ..models.unet import DiffusionModel
    with torch.device('meta'):
        params = sum(p.numel() for p in DiffusionModel(base_channels, channel_multipliers)
                     .parameters())
    return params * BYTES_PER_PARAMETER


def training_device_type(accelerator):
    """The device type Lightning trains on for --accelerator."""
    if accelerator in ('gpu', 'cuda'):
        return 'cuda'
    if accelerator == 'auto':
        if torch.cuda.is_available():
            return 'cuda'
        return 'mps' if torch.backends.mps.is_available() else 'cpu'
    return accelerator


def check_optimizer(args):
    from .optimizers import adamw8bit_unavailable
    if args.optimizer == 'adamw8bit':
        device_type = training_device_type(args.accelerator)
        reason = adamw8bit_unavailable(device_type)
        if reason is not None:
            raise UserError(f'--optimizer adamw8bit: {reason}; use --optimizer adamw on '
                            f'{device_type}.')


def check_buckets(args):
    """The bucket table batches are drawn by (None: square batches): the --aspect-buckets
    flags', for images of any input; a latent cache's own (cache_buckets)."""
    from .flags import bucket_table_of
    if args.cache is not None:
        return cache_buckets(args.cache, args.train_latents, bucket_table_of(args))
    return bucket_table_of(args)


def cache_buckets(manifest, root, table=None):
    """The buckets of a latent cache made with --aspect-buckets (None for a square one):
    its latents are made at their shapes, so they are what training draws by, whether or
    not --aspect-buckets is given; `table`, the one the flags give, must be the same."""
    cached = manifest.get('buckets')
    cached = cached and [tuple(b) for b in cached]
    if table is not None and cached is None:
        raise UserError(f'--aspect-buckets: the latent cache {root} was made without it (its '
                        'latents are square); make one with precompute_latents.py '
                        '--aspect-buckets, or train without the flag.')
    if table is not None and table != cached:
        raise UserError(f'--aspect-buckets: the latent cache {root} holds the buckets '
                        f'{show_buckets(cached)}, but the flags give {show_buckets(table)}; '
                        'drop --aspect-buckets (a cache trains on its own buckets), or make a '
                        'cache with these flags.')
    return cached


def show_buckets(table):
    return ' '.join(f'{w}x{h}' for w, h in table)


def check_lr_schedule(args):
    if args.lr_schedule == 'cosine' and not args.max_steps:
        raise UserError('--lr-schedule cosine decays over the run: it needs --max-steps.')
    if args.lr_min >= args.lr and args.lr_schedule != 'constant':
        raise UserError(f'--lr-min {args.lr_min:g} must be below --lr {args.lr:g}.')


def read_cache(args):
    """The --train-latents manifest, checked (on the first process: the others are started
    by it) to be made with this autoencoder, image size and CLOOB."""
    from ..data import latent_cache
    try:
        manifest = latent_cache.read_manifest(args.train_latents)
    except UserError as e:
        raise UserError(f'--train-latents: {e}') from None
    if args.frozen is not None:
        latent_cache.check_matches(manifest, dict(args.frozen, image_size=args.image_size),
                                   args.train_latents)
    return manifest


def check_text_prob(args):
    """Refuses --text-prob on data known to have no captions: a latent cache made without
    them (or before ccld read them), a table without a caption column. (Path lists and
    tar shards show their captions only as they are read.)"""
    from ..data.latent_cache import has_captions
    if not args.text_prob:
        return
    if args.cache is not None and not has_captions(args.cache):
        raise UserError(f'--text-prob {args.text_prob:g}: the latent cache {args.train_latents} '
                        'holds no captions; make it with this precompute_latents.py from '
                        'captioned images, or train with --text-prob 0.')
    if args.source is not None and not args.source.may_have_captions:
        raise UserError(f'--text-prob {args.text_prob:g}: {args.train_set} has no caption '
                        'column (caption or text); name it with --caption-column, or train '
                        'with --text-prob 0.')


def describe_frozen(args):
    """The autoencoder and CLOOB with the sha256 of their files, to check a cache against
    and to record in checkpoints (an export carries them; sample.py compares them). Read
    by the first process only: it alone checks and writes."""
    from ..models.autoencoder import describe as describe_autoencoder
    from ..models.cloob import describe as describe_cloob
    if not is_first_process():
        return None
    return {'autoencoder': describe_autoencoder(args.vqgan_model),
            'cloob': describe_cloob(args.cloob_checkpoint)}


def read_resume(path):
    """The --resume-from checkpoint, its weights checked (keys and shapes, no memory); a
    LoRA checkpoint with its base, checked to be the one it was trained on."""
    from ..models import lora
    from ..models.checkpoint_files import check_weights, read_checkpoint
    from ..models.student import is_student
    try:
        resume = read_checkpoint(path, lora=True)
        if resume.kind == 'lora':
            resume.base = lora.read_base(lora.from_checkpoint(resume), path)
            return resume
        check_weights(resume.model, path)
    except UserError as e:
        raise UserError(f'--resume-from: {e}') from None
    if is_student(resume.model):
        raise UserError(f'--resume-from: {path} is a distilled student (distill.py), which '
                        'this tool does not train; finetune its teacher and distil it again.')
    return resume


class TrainData:
    """Builds the training loader once the processes are up (litdata and the streamed
    sources split by each process's rank): a path list (split by the sampler Lightning
    adds), a streamed source (tar shards, parquet files, datasets), or a latent cache."""

    def __init__(self, args, seed):
        self.args, self.seed = args, seed

    def __call__(self, trainer):
        from ..data.latent_cache import make_bucketed_cache_loader, make_cache_loader
        from ..data.images import make_loader
        args = self.args
        buckets = getattr(args, 'buckets', None)  # (train_autoencoder: none)
        if args.cache is not None and buckets is not None:
            return make_bucketed_cache_loader(
                args.train_latents, args.batch_size, args.num_workers, self.seed,
                trainer.global_rank, trainer.world_size, init_loader_worker,
                args.prefetch_factor, epoch=trainer.current_epoch)
        if args.cache is not None:
            return make_cache_loader(args.train_latents, args.batch_size, args.num_workers,
                                     self.seed, init_loader_worker, args.prefetch_factor)
        buckets = getattr(args, 'buckets', None)  # (distill and train_autoencoder: none)
        if buckets is not None and args.source.paths is None:
            return args.source.bucket_loader(
                buckets, args.batch_size, args.num_workers, self.seed, trainer.global_rank,
                trainer.world_size, args.bucket_crop == 'random', args.random_flip,
                init_loader_worker, args.prefetch_factor, epoch=trainer.current_epoch)
        if args.source.paths is None:
            return args.source.stream_loader(
                args.image_size, args.batch_size, args.num_workers, self.seed,
                trainer.global_rank, trainer.world_size, init_loader_worker,
                args.prefetch_factor, args.random_flip, epoch=trainer.current_epoch)
        if buckets is not None:
            from ..data.bucketed import make_bucket_loader
            return make_bucket_loader(
                args.source.paths, args.source.texts, args.train_set, args.buckets,
                args.batch_size, args.num_workers, self.seed, trainer.global_rank,
                trainer.world_size, args.bucket_crop == 'random', args.random_flip,
                init_loader_worker, args.prefetch_factor, epoch=trainer.current_epoch)
        return make_loader(args.source.paths, args.image_size, args.batch_size,
                           args.num_workers, worker_init_fn=init_loader_worker,
                           prefetch_factor=args.prefetch_factor, random_flip=args.random_flip,
                           texts=args.source.texts)

    def describe(self):
        args = self.args
        if args.cache is not None and getattr(args, 'buckets', None) is not None:
            counts = ', '.join(f'{w}x{h}: {n}' for (w, h), n in
                               zip(args.buckets, args.cache['bucket_images']))
            return (f'{args.cache["images"]} cached latents from {args.train_latents}, on '
                    f'the aspect-ratio buckets it was made with ({counts})')
        if args.cache is not None:
            return f'{args.cache["images"]} cached latents from {args.train_latents}'
        return args.source.describe()

    def known_size(self):
        args = self.args
        if args.cache is not None:
            return args.cache['images']
        return args.source.known_images


def load_frozen_models(args):
    from ..models.autoencoder import load_autoencoder
    from ..models.cloob import load_cloob
    # Initialised before their weights load, as ever: the U-Net of a seeded fresh run is
    # drawn after them.
    ae_model = load_autoencoder(args.vqgan_model, init_weights=True)
    if ae_model.embed_dim != 4:
        raise UserError(f'--vqgan-model: {args.vqgan_model} has {ae_model.embed_dim} latent '
                        'channels; the diffusion model needs a KL f=8 autoencoder with 4.')
    cloob = load_cloob(args.cloob_checkpoint, init_weights=True)
    if cloob.embed_dim != 512:
        raise UserError(f'--cloob-checkpoint: embeddings are {cloob.embed_dim}-d; the diffusion '
                        'model needs 512.')
    return ae_model, cloob


def start_from(module, args, base, mults):
    """Says how `module` starts (a finetune's weights are its model's already: `run` built
    it from them); returns the checkpoint Lightning resumes from (None for a fresh run or
    a finetune)."""
    from pytorch_lightning.utilities import rank_zero_info
    resume = args.resume
    if resume is None:
        return None
    ckpt_path = None
    if resume.kind == 'lora':
        ckpt_path = args.resume_from
        rank_zero_info(f'--resume-from {args.resume_from}: {resume.description} of '
                       f'{args.lora.base}; resuming at step {resume.raw.get("global_step", "?")} '
                       f'with its optimizer state and EMA, lr {args.lr}.')
    elif args.lora is not None:
        trained = sum(p.numel() for p in module.trained_parameters())
        rank_zero_info(f'--resume-from {args.resume_from}: {resume.description}; training LoRA '
                       f'adapters (rank {args.lora.rank}, alpha {args.lora.alpha:g}, '
                       f'{",".join(args.lora.targets)}: {trained:,} weights) on its EMA weights, '
                       'frozen, from step 0.')
    elif resume.kind == 'bare':  # (its weights are the module's model and its EMA already)
        rank_zero_info(f'--resume-from {args.resume_from}: {resume.description}; '
                       'finetuning from its weights at step 0 with a fresh optimizer.')
    else:
        ckpt_path = args.resume_from
        step = resume.raw.get('global_step', '?')
        rank_zero_info(f'--resume-from {args.resume_from}: {resume.description}; resuming '
                       f'at step {step} with its optimizer state and EMA, lr {args.lr}.')
    if resume.autoencoder_scale is not None and \
            not math.isclose(resume.autoencoder_scale, args.autoencoder_scale, rel_tol=1e-6):
        rank_zero_info(f'note: the checkpoint was trained with autoencoder scale '
                       f'{resume.autoencoder_scale:g}; using --autoencoder-scale '
                       f'{args.autoencoder_scale:g}.')
    if [base, mults] != [args.base_channels, args.channel_multipliers]:
        rank_zero_info(f'note: using the checkpoint\'s widths: base channels {base}, '
                       f'multipliers {",".join(map(str, mults))}.')
    return ckpt_path


@runner.releasing_lock
def run(args):
    from pytorch_lightning.utilities import rank_zero_info

    from ..models.frozen_files import AUTOENCODER, CLOOB, recorded
    from ..models.unet import infer_widths
    from .demo_grids import DemoCallback, demo_latent_size
    from .diffusion_module import LightningDiffusion
    from ..sample.generate import latent_shape
    from .memory import MemoryReport, largest_batch, largest_size
    from .throughput import Throughput

    runner.quiet_lightning()
    output_dir = Path(args.output_dir)
    seed = runner.seed_run(args.seed)

    base, mults = args.base_channels, args.channel_multipliers
    weights = args.base.model_ema if args.lora is not None else \
        args.resume.model if args.resume is not None else None
    if weights is not None:
        base, mults = infer_widths(weights, mults)
    ae_model, cloob = load_frozen_models(args)
    # (before the module is built: trained from a cache, it drops the encoder)
    largest = largest_size(args.image_size, args.buckets)
    batch = largest_batch(args.batch_size, latent_shape(ae_model, largest), largest,
                          args.buckets is not None)
    data = TrainData(args, seed)
    record = {'autoencoder': recorded(AUTOENCODER, args.vqgan_model),
              'cloob_checkpoint': recorded(CLOOB, args.cloob_checkpoint),
              'image_size': args.image_size, 'random_flip': args.random_flip,
              'train_set': args.train_set or args.train_latents, 'train_images': data.known_size(),
              **args.origin}
    if args.buckets is not None:  # (a square run's record stays as it was)
        record['aspect_buckets'] = [list(b) for b in args.buckets]
    if args.text_prob:  # (a captionless run's record stays as it was)
        record['text_prob'] = args.text_prob
    # The file's own tensors, no initialised model, but the random numbers initialising
    # it drew are drawn all the same (init_draws): the loader's first shuffle, the noise
    # and a LoRA run's fresh adapters come from the random state left here, so a seeded
    # run draws what it always drew.
    model = model_ema = None
    if args.lora is not None:
        from ..models.lora import adapted_model
        record['lora'] = args.lora.spec()
        model = adapted_model(weights, args.lora, LORA_BASE_DTYPES[args.fprecision],
                              init_draws=True)
    elif args.resume is not None:
        # A finetune copies its weights into its EMA (the one copy it needs); a continued
        # run takes its EMA from the file too.
        from ..models.checkpoint_files import build_model
        model = build_model(weights, path=args.resume_from, init_draws=True)
        if args.resume.kind != 'bare':
            model_ema = build_model(args.resume.model_ema, path=args.resume_from)
    if args.frozen is not None:
        record.update(autoencoder_sha256=args.frozen['autoencoder']['sha256'],
                      autoencoder_encoder_sha256=args.frozen['autoencoder']['encoder_sha256'],
                      cloob_checkpoint_sha256=args.frozen['cloob']['sha256'])
    module = LightningDiffusion(ae_model, cloob, base, mults, args.autoencoder_scale, args.lr,
                                args.ema_decay_at, record, seed, grad_clip=args.grad_clip,
                                accumulate_grad_batches=args.accumulate_grad_batches,
                                max_bad_steps=args.max_bad_steps,
                                from_cache=args.cache is not None,
                                even_epochs=args.source is not None and args.source.uneven_shares,
                                compile=args.compile, channels_last=args.channels_last,
                                gradient_checkpointing=args.gradient_checkpointing,
                                optimizer=args.optimizer, ema_device=args.ema_device,
                                model=model, model_ema=model_ema, text_prob=args.text_prob,
                                lr_schedule=dict(warmup=args.lr_warmup_steps,
                                                 schedule=args.lr_schedule,
                                                 minimum=args.lr_min, total=args.max_steps))
    runner.set_tf32(args.tf32)
    ckpt_path = start_from(module, args, base, mults)
    del weights, model, model_ema  # (the module holds them)

    logger, where = runner.make_logger(args, output_dir, UNLOGGED)
    demo = DemoCallback(args.prompts, args.demo_every, output_dir / 'demos',
                        steps=args.demo_steps, latent_size=demo_latent_size(args), seed=seed,
                        method=args.demo_method, schedule=args.demo_schedule)
    known = data.known_size()
    steps_per_epoch = known // (args.batch_size * args.devices * args.num_nodes) if known else 50
    trainer = runner.make_trainer(
        args, PROG, [demo, Throughput(args.image_size // 8, args.peak_tflops),
                     MemoryReport(batch)], logger,
        log_every_n_steps=max(1, min(50, args.demo_every, steps_per_epoch)),
        # Lightning takes the checkpoint it resumes as it was read here: the module's
        # weights are its tensors already, so they load in place and the file is read once.
        resumed=(ckpt_path, args.resume.raw) if ckpt_path is not None else None)
    # The weights read are in the module now: a run of the 1.17B model would otherwise
    # hold them in CPU memory to its end.
    args.resume = args.base = None
    rank_zero_info(f'Training on {data.describe()}; checkpoints in {output_dir / "checkpoints"}, '
                   f'demo grids in {output_dir / "demos"}, logs to {where}. Seed {seed}.')
    if args.cache is not None and args.cache.get('caption_gap'):
        from ..data.gap import describe_gap
        rank_zero_info(f'{args.cache["captions"]} of the cached images have a caption; '
                       f'training with --text-prob {args.text_prob:g}. '
                       f'{describe_gap(args.cache["caption_gap"])}')
    runner.fit(trainer, module, data, ckpt_path, PROG)
    return trainer, module

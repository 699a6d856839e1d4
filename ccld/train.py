"""What train_latent_diffusion.py does once its flags are parsed: check every argument,
load the frozen models, set up Lightning, resume or finetune, and train."""

import logging
import math
import os
import random
import warnings
from pathlib import Path

import torch

from .errors import UserError

REQUIRED = ['vqgan_model', 'autoencoder_scale', 'train_set', 'demo_prompts']


def read_prompts(path):
    path = Path(path)
    if not path.is_file():
        raise UserError(f'--demo-prompts: {path} does not exist.')
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise UserError(f'--demo-prompts: {path} has no prompts in it (one per line).')
    return prompts


def validate(args):
    """Checks every argument before any model is loaded; raises UserError naming the flag.

    Adds the parsed train paths and prompts and the --resume-from checkpoint to `args`.
    """
    from cloob_training.pretrained import list_configs

    from .data import read_path_list

    for name in REQUIRED:
        if getattr(args, name) is None:
            raise UserError(f'--{name.replace("_", "-")} is required.')
    widths = [args.base_channels * m for m in args.channel_multipliers]
    if any(w % 64 for w in widths):
        raise UserError(f'--base-channels {args.base_channels} with --channel-multipliers '
                        f'{",".join(map(str, args.channel_multipliers))} gives widths '
                        f'{",".join(map(str, widths))}; each must be a multiple of 64 '
                        '(one attention head per 64 channels).')
    if args.image_size % 64:
        raise UserError(f'--image-size {args.image_size} must be a multiple of 64 (the latents '
                        'are 1/8 of it and the U-Net halves them three times).')
    for suffixes in (['.yaml'], ['.ckpt', '.safetensors']):
        if not any(Path(args.vqgan_model + s).is_file() for s in suffixes):
            raise UserError(f'--vqgan-model: {args.vqgan_model}{suffixes[0]} does not exist '
                            '(NAME means NAME.yaml + NAME.ckpt).')
    if args.cloob_checkpoint not in list_configs() and not Path(args.cloob_checkpoint).is_file():
        raise UserError(f'--cloob-checkpoint: {args.cloob_checkpoint} is neither a file nor a '
                        f'pretrained name ({", ".join(list_configs())}).')
    try:
        args.train_paths = read_path_list(args.train_set)
    except UserError as e:
        raise UserError(f'--train-set: {e}') from None
    args.prompts = read_prompts(args.demo_prompts)
    check_devices(args.accelerator, args.devices)
    args.resume = read_resume(args.resume_from) if args.resume_from else None
    return args


def check_devices(accelerator, devices):
    """GPUs asked for must exist; several processes on the CPU must be asked for."""
    if accelerator == 'mps' and not torch.backends.mps.is_available():
        raise UserError('--accelerator mps: MPS is not available here; use --accelerator cpu.')
    if accelerator in ('gpu', 'cuda') or (accelerator == 'auto' and devices > 1):
        available = torch.cuda.device_count()
        if available == 0:
            raise UserError(f'--num-gpus {devices}: this machine has no CUDA GPU; pass '
                            f'--accelerator cpu to run {devices} CPU process(es) instead.')
        if devices > available:
            raise UserError(f'--num-gpus {devices}: this machine has {available} CUDA GPU(s).')


def read_resume(path):
    """The --resume-from checkpoint, its weights checked against a model built on the
    meta device (keys and shapes, no memory)."""
    from .checkpoints import build_model, read_checkpoint
    try:
        resume = read_checkpoint(path)
        with torch.device('meta'), warnings.catch_warnings():
            warnings.simplefilter('ignore')  # loading into meta tensors is a no-op, as meant
            build_model(resume.model, path=path)
    except UserError as e:
        raise UserError(f'--resume-from: {e}') from None
    return resume


def make_logger(args, output_dir):
    from pytorch_lightning.loggers import CSVLogger, WandbLogger
    if args.wandb_project:
        logger = WandbLogger(project=args.wandb_project, save_dir=str(output_dir),
                             log_model=False, config=vars(args))
        where = f'wandb project {args.wandb_project}'
        if os.environ.get('WANDB_MODE') == 'offline':
            where += f' (offline, under {output_dir / "wandb"})'
    else:
        logger = CSVLogger(str(output_dir), name='logs')
        where = f'{logger.log_dir}/metrics.csv (pass --wandb-project to log to wandb)'
    return logger, where


def strategy_for(args):
    if args.strategy != 'auto' or (args.devices == 1 and args.num_nodes == 1):
        return args.strategy
    from pytorch_lightning.strategies import DDPStrategy
    return DDPStrategy(find_unused_parameters=False)


def _not_an_advert(record):
    """Drops Lightning's product tips from the log (one function, so adding it is idempotent)."""
    return not str(record.msg).startswith('💡 Tip')


def run(args):
    import pytorch_lightning as pl
    from pytorch_lightning.utilities import rank_zero_info

    from .autoencoder import load_autoencoder
    from .cloob import load_cloob
    from .data import make_loader
    from .demo import DemoCallback
    from .training import InterruptCheckpoint, LightningDiffusion
    from .unet import infer_widths

    # The frozen models are meant to stay in eval mode.
    warnings.filterwarnings('ignore', message='.*module\\(s\\) in eval mode')
    warnings.filterwarnings('ignore', message='.*isinstance\\(treespec, LeafSpec\\)')
    # The loader reshuffles on resume; the order of a random shuffle need not be restored.
    warnings.filterwarnings('ignore', message=".*dataloader is not resumable")
    logging.getLogger('pytorch_lightning.utilities.rank_zero').addFilter(_not_an_advert)
    output_dir = Path(args.output_dir)
    seed = args.seed
    if seed is None:  # processes started by the DDP launcher inherit rank zero's choice
        seed = int(os.environ.get('PL_GLOBAL_SEED', random.randrange(2 ** 31)))
    pl.seed_everything(seed, workers=True, verbose=False)

    resume = args.resume
    base, mults = args.base_channels, args.channel_multipliers
    if resume is not None:
        base, mults = infer_widths(resume.model, mults)

    ae_model = load_autoencoder(args.vqgan_model)
    if ae_model.embed_dim != 4:
        raise UserError(f'--vqgan-model: {args.vqgan_model} has {ae_model.embed_dim} latent '
                        'channels; the diffusion model needs a KL f=8 autoencoder with 4.')
    cloob = load_cloob(args.cloob_checkpoint)
    if cloob.embed_dim != 512:
        raise UserError(f'--cloob-checkpoint: embeddings are {cloob.embed_dim}-d; the diffusion '
                        'model needs 512.')

    record = {'autoencoder': args.vqgan_model, 'cloob_checkpoint': args.cloob_checkpoint,
              'image_size': args.image_size}
    module = LightningDiffusion(ae_model, cloob, base, mults, args.autoencoder_scale, args.lr,
                                args.ema_decay_at, record, seed)

    ckpt_path = None
    if resume is not None:
        if resume.kind == 'bare':
            module.model.load_state_dict(resume.model, strict=True)
            module.model_ema.load_state_dict(resume.model, strict=True)
            for m in (module.model, module.model_ema):
                m.autoencoder_scale.fill_(args.autoencoder_scale)
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

    logger, where = make_logger(args, output_dir)
    checkpoints = InterruptCheckpoint(dirpath=output_dir / 'checkpoints', filename='{step:08d}',
                                      every_n_train_steps=args.checkpoint_every, save_top_k=-1,
                                      save_last=True, save_on_exception=True)
    demo = DemoCallback(args.prompts, args.demo_every, output_dir / 'demos',
                        steps=args.demo_steps, latent_size=args.image_size // 8, seed=seed)
    steps_per_epoch = len(args.train_paths) // args.batch_size
    trainer = pl.Trainer(
        accelerator=args.accelerator, devices=args.devices, num_nodes=args.num_nodes,
        strategy=strategy_for(args), precision=args.fprecision,
        max_steps=args.max_steps or -1, max_epochs=-1,
        accumulate_grad_batches=args.accumulate_grad_batches,
        gradient_clip_val=args.grad_clip, callbacks=[checkpoints, demo], logger=logger,
        default_root_dir=str(output_dir),
        log_every_n_steps=max(1, min(50, args.demo_every, steps_per_epoch)),
    )
    rank_zero_info(f'Training on {len(args.train_paths)} images; checkpoints in '
                   f'{output_dir / "checkpoints"}, demo grids in {output_dir / "demos"}, '
                   f'logs to {where}. Seed {seed}.')
    loader = make_loader(args.train_paths, args.image_size, args.batch_size, args.num_workers)
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    last = output_dir / 'checkpoints' / 'last.ckpt'
    trainer.save_checkpoint(last, weights_only=False)
    rank_zero_info(f'Stopped at step {trainer.global_step}; the latest checkpoint is {last}.')
    return trainer, module

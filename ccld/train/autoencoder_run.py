"""What train_autoencoder.py does once its flags are parsed: check every argument, load
the autoencoder and its loss, train through the shared run machinery (runner.py), and
write the finetuned autoencoder as NAME.ckpt + NAME.yaml."""

import copy
import sys
from pathlib import Path

import torch

from ..cli import check_devices, count
from ..errors import UserError
from ..models import hub
from ..processes import is_first_process
from . import runner
from .autoencoder_flags import PROG

REQUIRED = ('train_set', 'vqgan_model', 'output_name')
LOSS_TARGET = 'ldm.modules.losses.LPIPSWithDiscriminator'
KL_F8_LOSS = {'disc_start': 50001, 'kl_weight': 1e-6, 'disc_weight': 0.5,
              'perceptual_weight': 1.0}
MIN_IMAGE_SIZE = 32  # the discriminator's receptive field, and LPIPS' four poolings
# What validate() adds to the flags that is no setting, left out of the wandb config.
UNLOGGED = ('source', 'cache', 'val_source', 'val_images', 'resume', 'start', 'config',
            'loss_settings', 'lpips_path')


def validate(args):
    """Checks every argument before any model is loaded; raises UserError naming the flag.

    Adds to `args` the training and validation sets, the starting autoencoder's config
    and description, the loss settings, the LPIPS weights file (fetched if need be), the
    validation images, the run checkpoint to resume, and, on the first process of a run,
    the output directory's lock.
    """
    from ..models.autoencoder import read_config
    from .run import check_lr_schedule

    for name in REQUIRED:
        if getattr(args, name) is None:
            raise UserError(f'--{name.replace("_", "-")} is required.')
    args.vqgan_model = hub.resolve_autoencoder(args.vqgan_model, '--vqgan-model')
    check_autoencoder_files(args.vqgan_model)
    args.config = read_config(f'{args.vqgan_model}.yaml')
    check_image_size(args.image_size, args.config)
    check_output_name(args)
    args.loss_settings = loss_settings(args.config, args)
    check_lr_schedule(args)
    args.cache = None  # (the shared training loader reads images only, here)
    args.source = read_source(args, args.train_set, '--train-set')
    args.val_source = read_source(args, args.val_set, '--val-set') if args.val_set else None
    check_devices(args.accelerator, args.devices)
    args.lpips_path = None
    if args.loss_settings['perceptual_weight'] > 0:
        from ..models.autoencoder import weights_path
        from ..models.perceptual import find_weights
        args.lpips_path = str(find_weights(args.lpips_weights, weights_path(args.vqgan_model)))
    args.start = args.val_images = None
    if is_first_process():  # it alone checks, validates and writes
        from ..models.autoencoder import describe
        from .reconstructions import read_images
        args.start = describe(args.vqgan_model)
        if args.val_source is not None:
            args.val_images, skipped = read_images(args.val_source, args.val_count,
                                                   args.image_size)
            if skipped:
                print(f'{PROG}: --val-set: skipped {count(skipped, "unreadable image")}.',
                      file=sys.stderr)
    args.resume = None
    if args.resume_from not in (None, 'auto'):
        args.resume_from = hub.resolve(args.resume_from, '--resume-from')
        args.resume = read_resume(args.resume_from)
    args.lock = None
    if is_first_process():
        args.lock = runner.claim_output_dir(args.output_dir, args.resume_from,
                                            checkpoint_bytes(args.config, args.loss_settings))
    with runner.released_on_exit(args.lock, error_only=True):
        if args.resume_from == 'auto':
            path, args.resume = runner.newest_checkpoint(args.output_dir, read_resume)
            args.resume_from = None if path is None else str(path)
        if args.resume is not None and args.start is not None:
            check_resume(args)
    return args


def check_autoencoder_files(name):
    for suffixes in (['.yaml'], ['.ckpt', '.safetensors']):
        if not any(Path(name + s).is_file() for s in suffixes):
            raise UserError(f'--vqgan-model: {name}{suffixes[0]} does not exist (NAME means '
                            'NAME.yaml + NAME.ckpt).')


def downsampling(config):
    """The autoencoder's factor from pixels to latents (8 for kl-f8)."""
    return 2 ** (len(config['model']['params']['ddconfig']['ch_mult']) - 1)


def check_image_size(image_size, config):
    factor = downsampling(config)
    if image_size % factor or image_size < MIN_IMAGE_SIZE:
        raise UserError(f'--image-size {image_size} must be a multiple of {factor} (the '
                        f'autoencoder\'s downsampling) and at least {MIN_IMAGE_SIZE}.')


def check_output_name(args):
    """NAME.ckpt + NAME.yaml must be new files in a writable directory (a run continued
    from --output-dir's checkpoints writes the files it wrote before), and not the
    starting autoencoder's."""
    from ..files import check_writable_dir
    name = Path(args.output_name)
    if name.resolve() == Path(args.vqgan_model).resolve():
        raise UserError('--output-name names the --vqgan-model it starts from; pass a new name '
                        '(the starting autoencoder is kept as it is).')
    check_writable_dir(name.parent, '--output-name')
    existing = [p for p in (Path(f'{name}.ckpt'), Path(f'{name}.yaml')) if p.exists()]
    continued = runner.continues_run(args.resume_from, [Path(args.output_dir) / 'checkpoints'])
    if existing and not continued:
        raise UserError(f'--output-name: {existing[0]} exists; pass a new name, or '
                        '--resume-from auto to continue the run that wrote it.')


def read_source(args, spec, flag):
    """The images `flag` names, read as training reads --train-set."""
    from ..data.sources import Source
    try:
        return Source(spec, image_column=args.image_column, split=args.dataset_split)
    except UserError as e:
        raise UserError(f'{flag}: {e}') from None


def loss_settings(config, args):
    """LPIPSWithDiscriminator's parameters: the config's lossconfig (kl-f8's when it names
    another loss, as inference configs' torch.nn.Identity), then the loss flags."""
    from ldm.modules.losses import LPIPSWithDiscriminator
    lossconfig = config['model']['params'].get('lossconfig') or {}
    params = lossconfig.get('params') or {} if lossconfig.get('target') == LOSS_TARGET else {}
    settings = {**KL_F8_LOSS, **params}
    for key in KL_F8_LOSS:
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    try:
        with torch.device('meta'):
            LPIPSWithDiscriminator(**dict(settings, perceptual_weight=0))
    except (TypeError, ValueError) as e:
        raise UserError(f'--vqgan-model: the lossconfig of {args.vqgan_model}.yaml does not '
                        f'build {LOSS_TARGET} ({e}).') from None
    return settings


def checkpoint_bytes(config, settings):
    """About what one run checkpoint takes: the weights, and Adam's two moments of all
    that may train (fp32)."""
    from ldm.modules.losses import LPIPSWithDiscriminator

    from ..models.autoencoder import build_autoencoder
    with torch.device('meta'):
        networks = [build_autoencoder(config),
                    LPIPSWithDiscriminator(**dict(settings, perceptual_weight=0))]
    return 12 * sum(p.numel() for n in networks for p in n.parameters())


def read_resume(path):
    """The record of a train_autoencoder.py run checkpoint (UserError for anything else)."""
    from ..models.checkpoint_files import safe_load
    try:
        checkpoint = safe_load(path)
    except UserError as e:
        raise UserError(f'--resume-from: {e}') from None
    if not isinstance(checkpoint, dict) or 'ccld_autoencoder' not in checkpoint:
        raise UserError(f'--resume-from: {path} is not a checkpoint of a train_autoencoder.py '
                        'run; to start from an autoencoder, pass it as --vqgan-model.')
    return dict(checkpoint['ccld_autoencoder'], step=checkpoint.get('global_step'))


def check_resume(args):
    """The run to continue must have started from --vqgan-model and train what this does."""
    record, start = args.resume, args.start
    if record['start']['sha256'] != start['sha256']:
        raise UserError(f'--resume-from {args.resume_from} continues a finetune of '
                        f'{record["start"]["name"]} (sha256 {record["start"]["sha256"][:12]}), '
                        f'but --vqgan-model gives {start["name"]} (sha256 '
                        f'{start["sha256"][:12]}); pass the one it started from.')
    trained = 'encoder and decoder' if args.full else 'decoder'
    if record['trained'] != trained:
        flag = '--full' if record['trained'] != 'decoder' else '--decoder-only'
        raise UserError(f'--resume-from {args.resume_from} trained the {record["trained"]}; '
                        f'pass {flag} to continue it, or start a new run.')


def build_loss(args):
    """The loss, its LPIPS from --lpips-weights' file (or none at --perceptual-weight 0)."""
    from ldm.modules.losses import LPIPSWithDiscriminator

    from ..models.perceptual import load_lpips
    lpips = load_lpips(args.lpips_path) if args.lpips_path else None
    return LPIPSWithDiscriminator(**args.loss_settings, perceptual_loss=lpips)


def start_loss_from(loss, checkpoint):
    """A fresh run's discriminator and log-variance start from the starting checkpoint's
    `loss.*` where it has them (CompVis releases do); returns a phrase saying which."""
    from ..models.autoencoder import read_weights
    state = read_weights(checkpoint)
    prefix = 'loss.discriminator.'
    disc = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if 'loss.logvar' in state:
        loss.logvar.data.copy_(state['loss.logvar'])
    if not disc:
        return 'a new discriminator'
    own = loss.discriminator.state_dict()
    if disc.keys() != own.keys() or any(v.shape != own[k].shape for k, v in disc.items()):
        return f'a new discriminator ({checkpoint}\'s does not fit these settings)'
    loss.discriminator.load_state_dict(disc)
    return f'the discriminator of {checkpoint}'


def describe_loss(args, disc_source):
    s = args.loss_settings
    perceptual = f' + {s["perceptual_weight"]:g} x LPIPS ({args.lpips_path})' \
        if args.lpips_path else ''
    return (f'L1{perceptual}, KL x {s["kl_weight"]:g}, {disc_source} from step '
            f'{s["disc_start"]} (weight {s["disc_weight"]:g})')


@runner.releasing_lock
def run(args):
    from pytorch_lightning.utilities import rank_zero_info

    from ..models.autoencoder import load_autoencoder, weights_path
    from .autoencoder_module import LightningAutoencoder
    from .reconstructions import Reconstructions
    from .run import TrainData
    from .throughput import Throughput

    runner.quiet_lightning()
    output_dir = Path(args.output_dir)
    seed = runner.seed_run(args.seed)
    autoencoder = load_autoencoder(args.vqgan_model, init_weights=True)  # (see its doc)
    loss = build_loss(args)
    disc_source = 'the discriminator of the checkpoint resumed' if args.resume_from else \
        start_loss_from(loss, weights_path(args.vqgan_model))
    record = {'start': args.start, 'image_size': args.image_size, 'loss': args.loss_settings,
              'output_name': str(args.output_name)}
    module = LightningAutoencoder(
        autoencoder, loss, train_encoder=args.full, lr=args.lr, record=record,
        grad_clip=args.grad_clip, accumulate_grad_batches=args.accumulate_grad_batches,
        max_bad_steps=args.max_bad_steps, even_epochs=args.source.uneven_shares,
        lr_schedule=dict(warmup=args.lr_warmup_steps, schedule=args.lr_schedule,
                         minimum=args.lr_min, total=args.max_steps))

    data = TrainData(args, seed)
    logger, where = runner.make_logger(args, output_dir, UNLOGGED)
    callbacks = [Throughput()]
    if args.val_source is not None:
        callbacks.append(Reconstructions(args.val_images, args.val_every,
                                         output_dir / 'reconstructions', args.batch_size,
                                         loss.perceptual_loss))
    known = data.known_size()
    steps_per_epoch = known // (args.batch_size * args.devices * args.num_nodes) if known else 50
    trainer = runner.make_trainer(args, PROG, callbacks, logger,
                                  log_every_n_steps=max(1, min(50, args.val_every,
                                                               steps_per_epoch)))
    if args.full:
        mode = (f'the encoder and decoder of {args.vqgan_model}: the latent space will change, '
                f'so U-Nets and latent caches made with {args.vqgan_model} will not fit '
                f'{args.output_name}; train them anew, with the scale printed at the end')
    else:
        mode = (f'the decoder of {args.vqgan_model} (its encoder is frozen, so the latents, '
                'the autoencoder scale, latent caches and U-Nets made with it stay valid)')
    rank_zero_info(f'Finetuning {mode}, on {data.describe()}. Loss: '
                   f'{describe_loss(args, disc_source)}. Checkpoints in '
                   f'{output_dir / "checkpoints"}, logs to {where}. Seed {seed}.')
    if args.val_source is None:
        rank_zero_info('No --val-set: no validation metrics or reconstruction grids.')
    try:
        runner.fit(trainer, module, data, args.resume_from, PROG)
    except SystemExit:  # stopped by a signal, after its checkpoint was saved
        if trainer.is_global_zero:
            write_output(module, args, trainer.global_step)
        raise
    if trainer.is_global_zero:
        write_output(module, args, trainer.global_step)
    return trainer, module


def write_output(module, args, steps):
    """NAME.ckpt (CompVis format: the autoencoder and its loss's weights, as CompVis saved
    them, so a later finetune from it finds its discriminator and LPIPS) + NAME.yaml (the
    starting config, and a `ccld` record of where it came from and how it was trained)."""
    from pytorch_lightning.utilities import rank_zero_info

    from ..models.autoencoder import encoder_digest, save_autoencoder
    start = args.start
    config = copy.deepcopy(args.config)
    encoder = encoder_digest(module.autoencoder.state_dict())
    lineage = {'finetuned_from': {k: start[k] for k in ('name', 'sha256', 'encoder_sha256')},
               'trained': module.record['trained'], 'steps': steps,
               'loss': dict(args.loss_settings), 'encoder_sha256': encoder,
               'same_encoder_as': [] if args.full else
               [*start['same_encoder_as'], start['sha256']]}
    if args.full:
        lineage['autoencoder_scale'] = scale = new_scale(module.autoencoder, args)
    config['ccld'] = lineage
    loss_state = {f'loss.{k}': v for k, v in module.loss.state_dict().items()}
    yaml_path, ckpt_path = save_autoencoder(module.autoencoder, config, args.output_name,
                                            loss_state)
    if args.full:
        what = (f'the encoder changed, so the latents did: its autoencoder scale is '
                f'{scale:.6g} (train with --autoencoder-scale {scale:.6g})')
    else:
        what = (f'the encoder is bit-identical to {start["name"]}\'s: its latent caches, scale '
                'and U-Nets stay valid')
    rank_zero_info(f'Wrote {ckpt_path} + {yaml_path} after {steps} steps ({what}); use it as '
                   f'--vqgan-model / --autoencoder {args.output_name}.')


def new_scale(autoencoder, args):
    """The finetuned autoencoder's scale on the training set (as compute_ae_scale.py
    measures it)."""
    from ..data.scale import estimate_scale
    autoencoder.eval()
    device = next(autoencoder.parameters()).device
    return estimate_scale(autoencoder, args.source, image_size=args.image_size,
                          num_workers=min(args.num_workers, 8), device=device,
                          progress=False).scale

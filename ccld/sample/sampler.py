"""From --checkpoint and the sampling flags to images, the one way every tool samples.

sample.py and evaluate.py both build each model and its settings here, so the same flags
give the same images in both, and whatever changes how a checkpoint samples (an adapter
loaded onto the model, a distilled student's own step count read from its record)
changes it for both at once: `load_sampler` is where a model is built and `settings_for`
where a checkpoint's record (and its adapters') completes the flags: the size, the
autoencoder scale, the frozen models (`frozen_models`) and a student's sampler
(students.py).
"""

import warnings
from dataclasses import dataclass, replace
from pathlib import Path

from .. import cli
from ..errors import UserError
from ..models import frozen_files, hub
from ..models.checkpoint_files import check_weights, read_checkpoint
from . import generate, students
from .flags import DEFAULT_AUTOENCODER, DEFAULT_BATCH_SIZE, DEFAULT_CLOOB, DEFAULT_SIZE


@dataclass(frozen=True)
class Settings:
    """How one checkpoint samples: the flags, completed by what the checkpoint records.
    Known before its model loads."""
    checkpoint: str         # the path as given
    description: str        # what kind of file it is
    autoencoder_scale: float
    size: tuple             # (width, height)
    method: str
    steps: int
    schedule: str
    eta: float
    cond_scale: float
    seed: int
    n: int
    lora: tuple = ()        # (adapter file, strength) pairs
    autoencoder: str = DEFAULT_AUTOENCODER  # its NAME (NAME.yaml + NAME.ckpt)
    cloob: str = DEFAULT_CLOOB              # a pretrained name or a .pkl

    @property
    def stochastic(self):
        """Whether the sampler draws noise at every step: then the images depend on how
        -n is cut into batches, not only on the seed."""
        return self.method == 'ddpm' or (self.method == 'ddim' and self.eta > 0)

    def metadata(self):
        """What the PNGs and reports record of them."""
        adapters = {'lora': ','.join(f'{short_name(path)}:{strength:g}'
                                     for path, strength in self.lora)} if self.lora else {}
        return {'seed': self.seed, 'n': self.n, 'method': self.method, 'steps': self.steps,
                'schedule': self.schedule, 'eta': self.eta, 'cond_scale': self.cond_scale,
                'autoencoder_scale': self.autoencoder_scale, **size_metadata(self.size),
                'checkpoint': short_name(self.checkpoint), **adapters}


def size_metadata(size):
    """What images record of their size: width and height, and 'size' as --size writes it
    (a square's as the one number it always was, for the readers of earlier images)."""
    width, height = cli.size_pair(size)
    return {'size': width if width == height else cli.size_text(size), 'width': width,
            'height': height}


def short_name(path):
    """How images name a model file: its pinned hub name if it came from the hub, else its
    file name."""
    return hub.name_of(path) if hub.cached_location(path) else Path(path).name


def resolve_model_names(args):
    """The --autoencoder and --lora hub names of the sampling flags, resolved to files in
    the hub cache (downloaded now); a hub name for --cloob-checkpoint refused. The
    --checkpoint(s), which each tool takes its own way, are the tool's to resolve; a
    frozen model flag left out stays None, for the one its checkpoint records
    (frozen_models, which resolves a recorded hub name the same way)."""
    hub.resolve_frozen_models(args, 'autoencoder')
    args.lora = [(hub.resolve(path, '--lora'), strength) for path, strength in args.lora]
    return args


def check_sampling_flags(args, strength=1.0):
    """The sampling flags' own checks, before any file is read; returns the device and
    the batch size to sample with."""
    generate.check_settings(args.method, args.eta, strength, args.schedule)
    if args.batch_size is None and args.n > DEFAULT_BATCH_SIZE:
        warnings.warn(f'sampling -n {args.n} in batches of {DEFAULT_BATCH_SIZE}; pass '
                      '--batch-size to change that (the images stay the same).')
    return args.device or cli.default_device(), args.batch_size or DEFAULT_BATCH_SIZE


def settings_for(args, checkpoint, ckpt, adapters=(), own=None):
    """The Settings of `checkpoint` (its DiffusionCheckpoint `ckpt`, with the Adapters of
    --lora, `adapters`) under the flags. A flag left out takes what an adapter records
    (its run's size and scale: "base + adapter" samples as the adapter's merged export
    does), else what the checkpoint records, else the default.

    `own` is given where a tool compares several checkpoints (evaluate.py's --checkpoint
    FILE:method=M,steps=N): this checkpoint's own (method, steps), None where not given,
    which override --method and --steps. Then the run's sampler flags are for the
    checkpoints that can take them: a progressive student keeps its own sampler."""
    recorded = [adapter.record for adapter in adapters] + [ckpt.record]
    scale = args.autoencoder_scale or \
        next((r['autoencoder_scale'] for r in recorded[:-1] if r.get('autoencoder_scale')),
             ckpt.autoencoder_scale)
    if scale is None:
        raise UserError(f'{checkpoint} records no autoencoder scale; pass the one it was '
                        'trained with as --autoencoder-scale.')
    size = args.size or next((r['image_size'] for r in recorded if r.get('image_size')),
                             DEFAULT_SIZE)
    method, steps, schedule, eta = args.method, args.steps, args.schedule, args.eta
    drop = '--method, --steps, --schedule and --eta'
    if own is not None:
        if students.is_progressive(ckpt.record):
            method, steps, schedule, eta = None, None, students.STUDENT_SCHEDULE, 0.0
            drop = 'its own method= and steps='
        method, steps = own[0] or method, own[1] or steps
    method, steps = students.sampler_for(ckpt.record, method, steps, schedule, eta, checkpoint,
                                         drop)
    autoencoder, cloob = frozen_models(args, checkpoint, ckpt, adapters)
    return Settings(checkpoint=str(checkpoint), description=ckpt.description,
                    autoencoder_scale=float(scale), size=cli.size_pair(size), method=method,
                    steps=steps, schedule=schedule, eta=eta, cond_scale=args.cond_scale,
                    seed=args.seed, n=args.n, lora=tuple(args.lora), autoencoder=autoencoder,
                    cloob=cloob)


def frozen_models(args, checkpoint, ckpt, adapters=()):
    """(autoencoder NAME, CLOOB) to sample `checkpoint` (its DiffusionCheckpoint `ckpt`,
    with the Adapters of --lora, `adapters`) with, as sample.py, evaluate.py and the web
    page choose them: --autoencoder and --cloob-checkpoint where given; else those an
    adapter records, else those the checkpoint records (a ccld training or distillation
    checkpoint, an export), each found as frozen_files.find finds it (a hub name resolved
    as the flag's would be: resolve_model_names); else kl_f8 and the LAION CLOOB.
    UserError naming the file when a recorded one is not to be found."""
    files = [(adapter.record, path) for adapter, (path, _) in zip(adapters, args.lora)]
    files.append((ckpt.record, checkpoint))
    chosen = []
    for kind, flag, given, default in (
            (frozen_files.AUTOENCODER, '--autoencoder NAME', args.autoencoder,
             DEFAULT_AUTOENCODER),
            (frozen_files.CLOOB, '--cloob-checkpoint', args.cloob_checkpoint, DEFAULT_CLOOB)):
        named = [(record[kind], path) for record, path in files if record.get(kind)]
        if given is not None or not named:
            chosen.append(given or default)
            continue
        value, path = named[0]
        what = 'autoencoder' if kind == frozen_files.AUTOENCODER else 'CLOOB'
        found = frozen_files.find(kind, value, Path(path).parent, f'{path} records the {what}')
        if found is None:
            raise UserError(f'{path} was trained with the {what} {value}, which is not there '
                            f'(nor beside {Path(path).name}); pass {flag} to sample with it '
                            'from where it is now.')
        chosen.append(found)
    return tuple(chosen)


def read_adapters(args, checkpoint, ckpt, other_bases='refuse'):
    """The --lora adapters with their strengths, each checked to be made for the model of
    `checkpoint` (its DiffusionCheckpoint `ckpt`); UserError if one is not, or with
    other_bases='skip' (the web page, which offers an adapter only with its base) that
    one left out. Returns (FILE, Adapter, strength) triples."""
    from ..models import lora
    adapters = []
    for path, strength in args.lora:
        adapter = lora.read(path)
        try:
            adapter.check_base(ckpt.model_ema, checkpoint, f'--lora: {path}')
        except UserError:
            if other_bases != 'skip':
                raise
            continue
        adapters.append((path, adapter, strength))
    return adapters


def check_checkpoint(args, checkpoint, own=None):
    """The Settings of `checkpoint` (its own sampler `own`: settings_for), checked to
    sample under the flags without building its model (the weights are matched against
    one on the meta device); UserError if not."""
    ckpt = read_checkpoint(checkpoint)
    check_weights(ckpt.model_ema, checkpoint, args.base_channels, args.channel_multipliers)
    adapters = read_adapters(args, checkpoint, ckpt)
    return settings_for(args, checkpoint, ckpt, [adapter for _, adapter, _ in adapters], own)


def load_sampler(args, checkpoint, device, own=None):
    """The frozen model of `checkpoint` on `device`, with the --lora adapters on it, and
    its Settings (its own sampler `own`: settings_for). Warns when it was trained with
    other frozen models than those chosen."""
    model, ckpt, adapters = load_model(args, checkpoint, device)
    settings = settings_for(args, checkpoint, ckpt, [adapter for _, adapter, _ in adapters], own)
    generate.check_frozen_models(ckpt.record, settings.autoencoder, settings.cloob, checkpoint)
    return model, settings


def load_model(args, checkpoint, device, other_bases='refuse'):
    """The frozen model of `checkpoint` on `device` with the --lora adapters on it (each
    at its strength; other_bases: read_adapters), its DiffusionCheckpoint without the
    weights (what settings_for reads: a tool that samples one model under several
    settings, the web page, keeps it) and the (FILE, Adapter, strength) put on it."""
    model, ckpt = generate.load_model(checkpoint, args.base_channels, args.channel_multipliers,
                                      device)
    adapters = read_adapters(args, checkpoint, ckpt, other_bases)
    if adapters:
        from ..models import lora
        lora.apply(model, [(adapter, strength) for _, adapter, strength in adapters]).to(device)
    ckpt = replace(ckpt, model={}, model_ema={}, raw=dict.fromkeys(ckpt.raw), base=None)
    return model, ckpt, adapters


def sample(model, settings, autoencoder, embeds, weights, *, batch_size, device, init=None,
           strength=1.0, progress=True, callback=None):
    """Yields the settings.n images of one set of prompts (CLOOB embeddings and their
    weights), batch_size at a time; see generate.generate (`callback`: after each step)."""
    return generate.generate(
        generate.guided_model_fn(model, embeds, weights), autoencoder,
        settings.autoencoder_scale, settings.n, settings.size, method=settings.method,
        steps=settings.steps, schedule=settings.schedule, eta=settings.eta, seed=settings.seed,
        batch_size=batch_size, init=init, strength=strength, device=device, progress=progress,
        callback=callback)

"""The models of the web page, loaded once at start, and the one job at a time it runs on
them: a request's fields are checked against the server's bounds, turned into Settings by
the same function as sample.py's flags (sampler.settings_for) and sampled by the same
call (sampler.sample), so that the page's images are sample.py's."""

import argparse
import json
import random
import shutil
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from .. import cli
from ..data.images import image_transform, load_image
from ..errors import UserError, reason
from ..files import check_writable_dir
from ..models import hub
from ..models.autoencoder import load_autoencoder
from ..models.cloob import load_cloob
from ..sample import generate, sampler
from ..sample.flags import DEFAULT_STRENGTH
from ..sample.png_files import parameters_text
from ..sample.prompts import parse_prompt, slug
from ..sample.run import image_metadata

NO_LORA = 'none'
# Uploads of more pixels are refused before they are decoded: a small PNG can unpack to
# gigabytes. (Gradio opens an upload before the engine sees it; Pillow's own limit, about
# 179 megapixels, refuses the largest there.)
MAX_UPLOAD_PIXELS = 50_000_000
# The progress bar moves at most this often (seconds): each move is a message to every page
# and client watching the job, which a fast sampler would otherwise send at every step.
PROGRESS_EVERY = 0.1


class Stopped(Exception):
    """Raised at a sampler step after Stop was pressed: it ends the job there."""


@dataclass
class Model:
    """One checkpoint of the model menu, loaded, with the adapters made for it."""
    name: str           # as the menu shows it
    path: str
    model: torch.nn.Module
    ckpt: object        # its DiffusionCheckpoint, without the weights (sampler.load_model)
    adapters: dict      # menu name -> (FILE, Adapter) of each --lora made for this model
    settings: object    # its Settings under the flags, without an adapter


@dataclass
class Result:
    """What a job made: its PNG files, the seed it used, a line about it, and the
    warnings the library gave on the way."""
    paths: list
    seed: int
    message: str
    warnings: list = field(default_factory=list)


def parse_size(value):
    """The size field of a request, as --size takes it (WxH, or one number for a square)
    -> (width, height)."""
    try:
        return cli.image_size(str(value).strip())
    except argparse.ArgumentTypeError as e:
        raise UserError(f'size {e}.') from None


def read_upload(path, what):
    """An uploaded image as an RGB PIL image (decoded as sample.py decodes a file), after
    its size in pixels is checked; UserError in one line if it is not a readable image."""
    try:
        with Image.open(path) as image:
            width, height = image.size
        if width * height > MAX_UPLOAD_PIXELS:
            raise Image.DecompressionBombError(f'{width}x{height} pixels')
        return load_image(path)
    except Image.DecompressionBombError as e:
        raise UserError(f'the {what} is too large ({reason(e)}); this server takes images of '
                        f'up to {MAX_UPLOAD_PIXELS // 1_000_000} megapixels.') from None
    except Exception as e:  # noqa: BLE001 - whatever fails to decode is "unreadable"
        raise UserError(f'cannot read the {what} ({type(e).__name__}: {reason(e)}); upload a '
                        'PNG, JPEG or WebP image.') from None


def menu_names(paths):
    """Menu names of model files: each one's short name (its file name, or its hub name),
    or the path as given where two would share one."""
    names = [sampler.short_name(path) for path in paths]
    return [name if names.count(name) == 1 else str(path) for name, path in zip(names, paths)]


def choose_adapter(model, index):
    """Makes the index-th adapter put on `model` (sampler.load_model: lora0, lora1, ...)
    the only one in use, or none (index None): the model then computes what the base, or
    the base with that one adapter, computes in sample.py."""
    from peft.tuners.lora import LoraLayer
    for module in model.modules():
        if isinstance(module, LoraLayer):
            if index is None:
                module._disable_adapters = True
            else:
                module._disable_adapters = False
                module.set_adapter([f'lora{index}'])
    model.requires_grad_(False)


def set_strength(model, index, strength):
    """Scales the index-th adapter of `model` by `strength`, as sample.py's FILE:STRENGTH."""
    from peft.tuners.lora import LoraLayer
    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.set_scale(f'lora{index}', strength)


class Engine:
    """Every model of the flags, loaded at start, and the job that runs one request."""

    def __init__(self, args):
        self.args = args
        self.device, self.batch_size = sampler.check_sampling_flags(args)
        if args.share_dir:
            check_writable_dir(args.share_dir, '--share-dir')
        args.checkpoint = [hub.resolve(path, '--checkpoint') for path in args.checkpoint]
        sampler.resolve_model_names(args)
        self.models = {}
        offered = set()
        lora_names = dict(zip((path for path, _ in args.lora),
                              menu_names([path for path, _ in args.lora])))
        for name, path in zip(menu_names(args.checkpoint), args.checkpoint):
            with_adapters = argparse.Namespace(**{**vars(args),
                                                  'lora': [(p, 1.0) for p, _ in args.lora]})
            model, ckpt, adapters = sampler.load_model(with_adapters, path, self.device,
                                                       other_bases='skip')
            fitting = {lora_names[file]: (file, adapter) for file, adapter, _ in adapters}
            offered.update(file for file, _, _ in adapters)
            self.models[name] = Model(name, path, model, ckpt, fitting, None)
            self.models[name].settings = self.settings_of(self.models[name], own=(None, None))
        for path, _ in args.lora:
            if path not in offered:
                warnings.warn(f'--lora {path} was made for none of the checkpoints; the page '
                              'does not offer it.')
        # The frozen models of every model and adapter, each loaded once.
        self.autoencoders, self.cloobs = {}, {}
        for entry in self.models.values():
            for adapter in [None, *entry.adapters]:
                settings = self.settings_of(entry, adapter, own=(None, None))
                generate.check_frozen_models(entry.ckpt.record, settings.autoencoder,
                                             settings.cloob, entry.path)
                if settings.autoencoder not in self.autoencoders:
                    self.autoencoders[settings.autoencoder] = load_autoencoder(
                        settings.autoencoder, device=self.device)
                if settings.cloob not in self.cloobs:
                    self.cloobs[settings.cloob] = load_cloob(settings.cloob, self.device)
        self.lock = threading.Lock()
        self.stop_asked = threading.Event()
        self.step = self.asked_at = 0
        self.jobs = 0
        self.out = tempfile.mkdtemp(prefix='ccld-app-')

    def request_args(self, **fields):
        """The flags, with a request's fields in place of theirs."""
        return argparse.Namespace(**{**vars(self.args), 'lora': [], **fields})

    def settings_of(self, entry, lora=None, strength=1.0, own=None, **fields):
        """The Settings of a model of the menu, with the adapter named `lora` (None: none)
        at `strength`, under the flags and the request's `fields`: sampler.settings_for,
        as for sample.py's flags. own=(None, None) for the defaults of the form: the
        sampler flags then apply to the models that take them, as in evaluate.py, and a
        student keeps its own."""
        adapters = [entry.adapters[lora]] if lora else []
        args = self.request_args(lora=[(file, strength) for file, _ in adapters], **fields)
        return sampler.settings_for(args, entry.path, entry.ckpt,
                                    [adapter for _, adapter in adapters], own)

    def defaults(self, name):
        """The form's values for a model of the menu: its Settings under the flags."""
        return self.models[name].settings

    def stop(self):
        """Ends the running job at its next sampler step."""
        self.asked_at = self.step
        self.stop_asked.set()

    def check(self, request):
        """A request's fields -> (model entry, adapter name or None, Settings, text
        prompts, image prompts as recorded, image prompts as images, init image,
        strength); UserError for anything out of the server's bounds or unreadable, before
        the device is touched."""
        args = self.args
        entry = self.models.get(request.get('model') or next(iter(self.models)))
        if entry is None:
            raise UserError(f'unknown model {request["model"]!r}; choose one of '
                            f'{", ".join(self.models)}.')
        lora = request.get('lora') or None
        lora = None if lora == NO_LORA else lora
        if lora is not None and lora not in entry.adapters:
            raise UserError(f'LoRA {lora!r} is not made for {entry.name}; choose one of '
                            f'{", ".join([NO_LORA, *entry.adapters])}.')
        n = int(request['n']) if request.get('n') is not None else args.n
        steps = request.get('steps')
        steps = int(steps) if steps else None
        size = parse_size(request['size']) if request.get('size') else None
        for what, value, bound, flag in (
                ('images', n, args.max_images, '--max-images'),
                ('steps', steps, args.max_steps, '--max-steps'),
                (f'pixels a side (size {cli.size_text(size)})' if size else '',
                 max(size) if size else None, args.max_size, '--max-size')):
            if value is not None and not 1 <= value <= bound:
                raise UserError(f'{value} {what} is outside what this server allows (1 to '
                                f'{bound}, its {flag}); ask for fewer.')
        seed = request.get('seed')
        try:
            seed = random.randrange(2 ** 32) if seed is None or int(seed) == -1 else \
                cli.seed(str(int(seed)))
        except argparse.ArgumentTypeError as e:
            raise UserError(f'seed {seed}: {e}; -1 draws a random one.') from None
        cond_scale = request.get('cond_scale')
        cond_scale = args.cond_scale if cond_scale is None else float(cond_scale)
        texts = [parse_prompt(line, cond_scale)
                 for line in (request.get('prompt') or '').splitlines() if line.strip()]
        image_prompts, images = [], []
        if request.get('image_prompt'):
            weight = request.get('image_weight')
            weight = cond_scale if weight is None else float(weight)
            image_prompts = [(Path(request['image_prompt']).name, weight)]
            images = [(read_upload(request['image_prompt'], 'image prompt'), weight)]
        init = read_upload(request['init_image'], 'init image') \
            if request.get('init_image') else None
        strength = request.get('strength')
        strength = (DEFAULT_STRENGTH if strength is None else float(strength)) if init else 1.0
        method = request.get('method') or None
        generate.check_settings(method, args.eta, strength, request.get('schedule') or
                                args.schedule)
        lora_strength = request.get('lora_strength')
        lora_strength = 1.0 if lora_strength is None else float(lora_strength)
        settings = self.settings_of(entry, lora, lora_strength,
                                    n=n, seed=seed, steps=steps, method=method, size=size,
                                    schedule=request.get('schedule') or args.schedule,
                                    cond_scale=cond_scale)
        generate.latent_shape(self.autoencoders[settings.autoencoder], settings.size)
        return entry, lora, settings, texts, image_prompts, images, init, strength

    def run(self, request, progress=None):
        """Samples one request (a dict of /generate's fields); returns a Result. UserError
        for a bad request; Stop ends it at the next step, with the images made by then."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            entry, lora, settings, texts, image_prompts, images, init, strength = \
                self.check(request)
            with self.lock:
                result = self.sample(entry, lora, settings, texts, image_prompts, images,
                                     init, strength, request, progress)
        result.warnings = list(dict.fromkeys(str(w.message) for w in caught))
        return result

    def sample(self, entry, lora, settings, texts, image_prompts, images, init, strength,
               request, progress):
        """Runs a checked request on the device (the lock held): the adapter chosen, the
        prompts embedded, the images sampled and written with their metadata."""
        self.stop_asked.clear()
        self.step = 0
        self.jobs += 1
        if not texts and not images:
            warnings.warn('no prompt given: sampling the model unguided; write a text prompt '
                          'or upload an image prompt to guide it.')
        model = entry.model
        if entry.adapters:
            index = list(entry.adapters).index(lora) if lora else None
            choose_adapter(model, index)
            if index is not None:
                set_strength(model, index, settings.lora[0][1])
        autoencoder = self.autoencoders[settings.autoencoder]
        cloob = self.cloobs[settings.cloob]
        embeds, weights = generate.embed_prompts(cloob, texts, images) \
            if texts or images else (None, [])
        init_name = Path(request['init_image']).name if init is not None else None
        metadata = {'prompts': json.dumps(texts),
                    **image_metadata(image_prompts, settings, init_name, strength)}
        metadata['parameters'] = parameters_text(metadata)
        init = image_transform(settings.size)(init) if init is not None else None
        total, shown = [0], [0.0]

        def step(info):
            total[0] = info['steps'] * info['batches']
            self.step = info['batch'] * info['steps'] + info['i'] + 1
            now = time.monotonic()
            if progress is not None and (now - shown[0] >= PROGRESS_EVERY or
                                         self.step == total[0]):
                shown[0] = now
                progress((self.step, total[0]), unit='steps')
            if self.stop_asked.is_set():
                raise Stopped

        prefix = f'{self.jobs:05}_{slug(texts[0][0]) if texts else "unguided"}'
        batches = sampler.sample(model, settings, autoencoder, embeds, weights,
                                 batch_size=self.batch_size, device=self.device, init=init,
                                 strength=strength, progress=False, callback=step)
        try:
            generate.write_samples(batches, self.out, prefix, metadata, grid_too=False)
            message = f'seed {settings.seed}'
        except Stopped:
            message = (f'stopped at step {self.step} of {total[0]} (Stop was pressed at step '
                       f'{self.asked_at}); seed {settings.seed}')
        finally:
            if self.device.type == 'cuda':
                torch.cuda.empty_cache()
        paths = sorted(Path(self.out).glob(f'{prefix}_*.png'))
        if self.args.share_dir:
            for path in paths:
                shutil.copyfile(path, Path(self.args.share_dir) / path.name)
        return Result([str(path) for path in paths], settings.seed, message)

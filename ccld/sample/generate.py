"""Prompts in, images out: the sampling pipeline behind sample.py.

Text and image prompts become weighted CLOOB embeddings, classifier-free guidance mixes
the model's predictions for them, a sampler turns seeded noise (or a noised init image)
into latents, and the autoencoder decodes those.
"""

import urllib.request
import warnings
from io import BytesIO
from pathlib import Path

import torch

from .. import cli
from ..models import latents
from ..models.checkpoint_files import build_model, read_checkpoint
from ..data.images import image_transform, load_image
from ..errors import UserError
from ..diffusion.guidance import cfg_model_fn
from .png_files import grid, save_png
from ..diffusion.sampling import METHODS, sample_latents
from ..diffusion.schedule import SCHEDULES, sampling_timesteps, t_to_alpha_sigma
from ..models.student import StudentModel
from ..models.unet import CLIP_EMBED_DIM, LATENT_CHANNELS
from . import students

UNET_DOWNSAMPLING = 8  # the U-Net halves its input three times


def read_image(source, what='image'):
    """An RGB PIL image from a path or an http(s) URL; UserError if it cannot be had."""
    try:
        if source.startswith(('http://', 'https://')):
            with urllib.request.urlopen(source, timeout=60) as response:
                return load_image(BytesIO(response.read()))
        return load_image(source)
    except Exception as e:  # noqa: BLE001 - any failure to fetch or decode means "unreadable"
        raise UserError(f'cannot read {what} {source} ({type(e).__name__}: {e}); pass a '
                        'readable image file or URL.') from None


def load_model(checkpoint, base_channels=None, channel_multipliers=None, device='cpu'):
    """A frozen DiffusionModel with a checkpoint's EMA weights, and the checkpoint.

    Widths come from the weights unless given (then they must fit). A distilled student
    knows the guidance range its record names. The weights go from the file to `device`
    tensor by tensor (checkpoint_files.build_model): no whole copy is made on the way.
    """
    ckpt = read_checkpoint(checkpoint, device=device)
    model = build_model(ckpt.model_ema, base_channels, channel_multipliers, checkpoint, device)
    if isinstance(model, StudentModel) and ckpt.record.get('guidance_range'):
        model.guidance_range = tuple(ckpt.record['guidance_range'])
    return model.eval().requires_grad_(False), ckpt


def latent_shape(autoencoder, image_size):
    """The latent [C, h, w] of an image of `image_size` (an int for a square, or (width,
    height)), checked against what the U-Net accepts."""
    return check_latent_shape(autoencoder.embed_dim, 2 ** (autoencoder.encoder.num_resolutions - 1),
                              image_size)


def check_latent_shape(channels, factor, image_size):
    """latent_shape for an autoencoder of `channels` latent channels that downsamples by
    `factor`, known from its config before it loads."""
    if channels != LATENT_CHANNELS:
        raise UserError(f'the autoencoder has {channels} latent channels; the '
                        f'diffusion model needs one with {LATENT_CHANNELS}, such as kl-f8.')
    multiple = factor * UNET_DOWNSAMPLING
    width, height = cli.size_pair(image_size)
    if width % multiple or height % multiple:
        nearest = cli.nearest_sizes(image_size, multiple, width == height)[0]
        raise UserError(f'image size {cli.size_text(image_size)} is not a multiple of {multiple} '
                        f'(the autoencoder downsamples by {factor} and the U-Net by '
                        f'{UNET_DOWNSAMPLING}); use e.g. {nearest}.')
    return LATENT_CHANNELS, height // factor, width // factor


@torch.no_grad()
def embed_prompts(cloob, texts, images):
    """(text, weight) and (PIL image, weight) pairs -> (embeddings [k, d], k weights).

    Image prompts are resized and center-cropped to CLOOB's input size, as the training
    images are before they are embedded.
    """
    embeds = []
    if texts:
        embeds.append(cloob.embed_texts([text for text, _ in texts]))
    if images:
        device = next(cloob.parameters()).device
        transform = image_transform(cloob.image_size)
        batch = torch.stack([transform(image) for image, _ in images]).to(device)
        embeds.append(cloob.embed_images(batch))
    return torch.cat(embeds), [weight for _, weight in [*texts, *images]]


def guided_model_fn(model, embeds, weights):
    """v(x, t) guided towards the weighted embeddings; unconditional when there are none.
    A distilled student gives the guided v itself, in one call instead of two."""
    if not weights:
        return lambda x, t: model(x, t, x.new_zeros([x.shape[0], CLIP_EMBED_DIM]))
    if isinstance(model, StudentModel):
        return students.guided_model_fn(model, embeds, weights)
    return cfg_model_fn(model, embeds, weights)


def check_settings(method, eta, strength, schedule='spliced'):
    """The sampling flags' own checks; method None is the checkpoint's default sampler
    (students.sampler_for)."""
    if method is not None and method not in METHODS:
        raise UserError(f'unknown sampling method {method!r}; use one of {", ".join(METHODS)}.')
    if schedule not in SCHEDULES:
        raise UserError(f'unknown schedule {schedule!r}; use one of {", ".join(SCHEDULES)}.')
    if not 0 <= eta <= 1:
        raise UserError(f'eta {eta} is outside [0, 1] (0 is deterministic DDIM, 1 is DDPM).')
    if not 0 < strength <= 1:
        raise UserError(f'strength {strength} is outside (0, 1] (1 starts from pure noise).')


@torch.no_grad()
def generate(model_fn, autoencoder, autoencoder_scale, n, image_size, *, method='plms',
             steps=50, schedule='spliced', eta=0.0, seed=0, batch_size=None, init=None,
             strength=1.0, device='cpu', progress=True, callback=None):
    """Yields n images [b, 3, H, W] in [0, 1], batch_size at a time; `image_size` is an
    int for a square or (W, H), the latents [4, H/8, W/8] through kl-f8.

    The noise of all n is drawn at once, right after torch.manual_seed(seed), as the
    original cfg_sample.py did; so a seed gives the original's images with the same
    models, and the same noise whatever the batch size. With `init` (a [3, H, W] image
    in [0, 1] of the output size), sampling starts from its latent noised to t =
    `strength`, over the timesteps of the `steps`-step schedule that are <= strength.
    `callback(info)` is called after every sampler step (sampling.sample_latents), info
    holding the step 'i' of 'steps' in the batch 'batch' of 'batches'.
    """
    check_settings(method, eta, strength, schedule)
    shape = latent_shape(autoencoder, image_size)
    ts = sampling_timesteps(steps, device, schedule)
    torch.manual_seed(seed)
    x = torch.randn([n, *shape], device=device)
    if init is not None:
        ts = ts[ts <= strength]
        if not len(ts):
            raise UserError(f'strength {strength} is below every timestep of the {steps}-step '
                            'schedule, so there is nothing to sample; raise the strength or '
                            'the steps.')
        x0 = latents.encode(autoencoder, init[None].to(device), autoencoder_scale)
        alpha, sigma = t_to_alpha_sigma(ts[0])
        x = x0 * alpha + x * sigma
    batch_size = batch_size or n
    batches = -(-n // batch_size)
    for batch, i in enumerate(range(0, n, batch_size)):
        step = None if callback is None else \
            (lambda info, b=batch: callback({**info, 'steps': len(ts), 'batch': b,
                                             'batches': batches}))
        out = sample_latents(model_fn, x[i:i + batch_size], ts, method, eta, progress, step)
        yield latents.decode(autoencoder, out, autoencoder_scale)


def sample_path(output_dir, prefix, index):
    return Path(output_dir) / f'{prefix}_{index:05}.png'


def grid_path(output_dir, prefix):
    return Path(output_dir) / f'{prefix}_grid.png'


def write_samples(batches, output_dir, prefix='out', metadata=None, grid_cols=None, *,
                  singles=True, grid_too=True, annotate=None):
    """Saves each image as PREFIX_00000.png, ... as it arrives, then all as PREFIX_grid.png
    (`singles` and `grid_too` choose which of the two are written).

    Every PNG carries `metadata` as text chunks; a single one also its index and what
    `annotate(batch)` (a list of dicts, one per image) says of it. Returns the paths.
    """
    metadata = metadata or {}
    images, paths, index = [], [], 0
    for batch in batches:
        notes = annotate(batch) if annotate else [{}] * len(batch)
        for image, note in zip(batch.cpu(), notes):
            if singles:
                paths.append(save_png(image, sample_path(output_dir, prefix, index),
                                      {**metadata, 'index': index, **note}))
            if grid_too:
                images.append(image)
            index += 1
    if grid_too:
        paths.append(save_png(grid(torch.stack(images), grid_cols),
                              grid_path(output_dir, prefix), metadata))
    return paths


def check_frozen_models(record, autoencoder, cloob_checkpoint, checkpoint):
    """Warns when a checkpoint's record names another autoencoder or CLOOB than the flags:
    sampling then runs, but the model sees latents and embeddings it was not trained on.

    Files are compared by content where the record has their sha256 and the file is
    here (an autoencoder by its encoder's: a decoder finetuned by train_autoencoder.py
    fits every U-Net its original does), else by name (the last part of the path, so a
    moved file still matches).
    """
    from ..models.autoencoder import describe as describe_autoencoder, same_encoder, weights_path
    from ..models.cloob import describe as describe_cloob
    from cloob_training.pretrained import list_configs

    def same_autoencoder(digest):
        recorded = {'sha256': digest, 'encoder_sha256': record.get('autoencoder_encoder_sha256')}
        return same_encoder(recorded, describe_autoencoder(autoencoder))

    given = {
        'autoencoder': ('--autoencoder', autoencoder, weights_path(autoencoder).is_file(),
                        same_autoencoder),
        'cloob_checkpoint': ('--cloob-checkpoint', cloob_checkpoint,
                             cloob_checkpoint in list_configs() or Path(cloob_checkpoint).is_file(),
                             lambda digest: describe_cloob(cloob_checkpoint)['sha256'] == digest),
    }
    for key, (flag, name, here, same_file) in given.items():
        recorded, digest = record.get(key), record.get(f'{key}_sha256')
        if recorded is None:
            continue
        if digest and here:
            same = same_file(digest)
        else:
            same = Path(str(recorded)).name == Path(name).name
        if not same:
            what = f'{recorded} (sha256 {digest[:12]})' if digest else recorded
            warnings.warn(f'{checkpoint} was trained with {key.replace("_", " ")} {what}, but '
                          f'{flag} gives {name}; pass the one it was trained with, or expect '
                          'images unlike its training.')

"""Writing sample grids and single samples as PNGs, with their settings as metadata."""

import math
from pathlib import Path

from PIL import Image, PngImagePlugin
from torchvision.utils import make_grid


def to_pil(image):
    """A [3, H, W] tensor in [0, 1] -> PIL image."""
    array = image.detach().float().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0)
    return Image.fromarray(array.cpu().numpy())


def grid(images, cols=None):
    """[n, 3, H, W] in [0, 1] -> one [3, rows*H, cols*W] image, no padding.

    `cols` defaults to a near-square layout.
    """
    cols = cols or math.ceil(math.sqrt(images.shape[0]))
    return make_grid(images, nrow=cols, padding=0)


def save_png(image, path, metadata=None):
    """Saves a [3, H, W] tensor or a PIL image; every metadata item becomes a PNG text
    chunk. The file is written whole or not at all (a kill mid-write leaves no PNG that a
    rerun would take for a finished one)."""
    from ..files import atomic_write
    info = PngImagePlugin.PngInfo()
    for key, value in (metadata or {}).items():
        info.add_text(str(key), str(value))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = image if isinstance(image, Image.Image) else to_pil(image)
    with atomic_write(path) as f:
        image.save(f, format='PNG', pnginfo=info)
    return path


def parameters_text(metadata):
    """The `parameters` text of a PNG's metadata (as the sampling tools record it) in the
    format AUTOMATIC1111's PNG-info readers show: the text prompts ("text:weight", one a
    line), then one line of "Key: value" settings."""
    import json
    prompts = '\n'.join(f'{text}:{weight:g}' for text, weight in
                        json.loads(metadata.get('prompts', '[]')))
    width, height = metadata['width'], metadata['height']
    checkpoint = str(metadata['checkpoint'])
    settings = {'Steps': metadata['steps'], 'Sampler': metadata['method'],
                'Schedule type': metadata['schedule'], 'CFG scale': f'{metadata["cond_scale"]:g}',
                'Seed': metadata['seed'], 'Size': f'{width}x{height}',
                'Model': checkpoint if checkpoint.startswith('hf://') else Path(checkpoint).stem}
    image_prompts = json.loads(metadata.get('image_prompts', '[]'))
    if image_prompts:
        settings['Image prompts'] = ' '.join(f'{Path(name).name}:{weight:g}'
                                             for name, weight in image_prompts)
    if 'strength' in metadata:
        settings['Denoising strength'] = f'{metadata["strength"]:g}'
    if metadata.get('lora'):
        settings['Lora'] = metadata['lora']
    return f'{prompts}\n' + ', '.join(f'{key}: {value}' for key, value in settings.items())


def read_text(path):
    """The text chunks of a PNG ({} for an image that has none)."""
    with Image.open(path) as image:
        return dict(getattr(image, 'text', {}) or {})

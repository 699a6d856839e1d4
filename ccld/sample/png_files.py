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

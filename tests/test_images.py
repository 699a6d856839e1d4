"""Training images: shorter side resized (Lanczos) and center-cropped, never squashed (SPEC 5).

The expected tensors are computed by hand with PIL and numpy."""

import numpy as np
import pytest
import torch
from PIL import Image

from ccld.data.images import ImagePathDataset, image_transform, load_image

SIZE = 32


def noise_image(width, height, mode='RGB', seed=0):
    """Random pixels, so that a squashed image and a cropped one differ everywhere."""
    channels = {'RGB': 3, 'RGBA': 4}.get(mode)
    shape = (height, width, channels) if channels else (height, width)
    pixels = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    return Image.fromarray(pixels, mode)


def by_hand(image, size):
    """Shorter side to `size` with Lanczos, the central size x size square, in [0, 1]."""
    image = image.convert('RGB')
    w, h = image.size
    short = min(w, h)
    scaled = image.resize((w * size // short, h * size // short), Image.LANCZOS)
    left, top = (scaled.width - size) // 2, (scaled.height - size) // 2
    crop = np.asarray(scaled.crop((left, top, left + size, top + size)), dtype=np.float32)
    return torch.from_numpy(crop / 255).permute(2, 0, 1)


@pytest.mark.parametrize('width, height', [(96, 64), (64, 112), (48, 48)])
def test_image_transform_resizes_the_shorter_side_and_center_crops(width, height):
    image = noise_image(width, height)
    out = image_transform(SIZE)(image)
    assert out.shape == (3, SIZE, SIZE)
    torch.testing.assert_close(out, by_hand(image, SIZE), rtol=0, atol=1e-6)


@pytest.mark.parametrize('mode', ['RGB', 'RGBA', 'L'])
def test_training_images_from_files_are_rgb_crops(tmp_path, mode):
    """What the training loader yields for a landscape file in any colour mode."""
    image = noise_image(80, 64, mode)
    path = tmp_path / f'{mode}.png'
    image.save(path)
    assert load_image(path).mode == 'RGB'
    key, item, _ = ImagePathDataset([path], image_size=SIZE)[0]
    assert key == path
    torch.testing.assert_close(item, by_hand(image, SIZE), rtol=0, atol=1e-6)

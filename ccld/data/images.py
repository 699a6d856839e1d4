"""The training images: path lists and image files, loaded so that bad files never stop a
run, and so that odd files (16-bit, rotated by EXIF) come out as the picture they show."""

import functools
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils import data
from torchvision import transforms
from torchvision.transforms import functional as F

from ..cli import size_pair
from ..errors import UserError
from ..files import read_text_lines

PATHS_CHECKED = 20  # how many paths of a list must include one that exists
UNREADABLE = 'unreadable'  # what a dataset yields for an image it could not read (not None:
#                           webdataset drops those, and batches must count what they lost)
IMAGE_EXTENSIONS = ('jpg', 'jpeg', 'png', 'webp', 'bmp', 'tif', 'tiff', 'gif')


class MissingImage(ValueError):
    """A sample or row that holds no image at all, such as the rows img2dataset writes for
    its failed downloads: skipped and counted like an unreadable image, but warned about
    once per process rather than once each, as a set may hold many."""

    def __init__(self):
        super().__init__('no image in the row')


def warn_skipped(key, error):
    """The warning for an image that is skipped because `error` made it unreadable."""
    if isinstance(error, MissingImage):  # one text from one line: Python warns once
        warnings.warn('skipping rows with no image in them (img2dataset writes its failed '
                      'downloads so); each is counted as skipped, without a warning of its own')
    else:
        warnings.warn(f'skipping unreadable image {key}: {type(error).__name__}: {error}')


def read_path_list(path):
    """One image path per line; blank lines skipped. Raises UserError if none."""
    paths = read_text_lines(path, 'path list')
    if not paths:
        raise UserError(f'path list {path} has no image paths in it.')
    return paths


def check_some_exist(paths, source):
    """UserError when none of the first PATHS_CHECKED paths exists: the data set is not
    mounted, or the list's paths are relative to another directory."""
    first = paths[:PATHS_CHECKED]
    if not any(Path(p).exists() for p in first):
        raise UserError(f'none of the first {len(first)} paths in {source} exists (e.g. '
                        f'{first[0]}); is the data set mounted, and are relative paths meant '
                        'from this directory?')


def image_transform(image_size, random_flip=False):
    """Resized to cover image_size (an int for a square, or (width, height)) and centre
    cropped to it (`cover`), to a [0, 1] tensor; with `random_flip`, mirrored left to right
    half of the time."""
    return transforms.Compose([
        functools.partial(cover, size=size_pair(image_size)),
        *([transforms.RandomHorizontalFlip()] if random_flip else []),
        transforms.ToTensor(),
    ])


def cover(image, size):
    """A PIL image resized (Lanczos) to the least that covers `size` (width, height), then
    centre-cropped to it: an image of another aspect ratio loses a band at two opposite
    edges, never a squash. For a square, torchvision's Resize(side) then CenterCrop(side)
    (the shorter side to it), to the pixel."""
    width, height = size
    w, h = image.size
    # As torchvision computes the longer side from the shorter (truncated, not rounded).
    new_w, new_h = (width, int(width * h / w)) if width * h >= height * w else \
        (int(height * w / h), height)
    image = F.resize(image, [new_h, new_w], interpolation=transforms.InterpolationMode.LANCZOS)
    return F.center_crop(image, [height, width])


def to_rgb(image):
    """An RGB image of what `image` shows. Integer modes deeper than 8 bits are scaled
    down (RGB conversion would clip them to white); float images are taken as [0, 1]."""
    if image.mode in ('I', 'I;16', 'I;16B', 'I;16L', 'I;16N', 'F'):
        array = np.asarray(image, dtype=np.float64)
        if image.mode == 'F':
            top = 1.0
        else:
            top = 65535.0 if image.mode.startswith('I;16') or array.max() > 255 else 255.0
        array = np.clip(array / top * 255, 0, 255).round().astype(np.uint8)
        image = Image.fromarray(array, 'L')
    elif image.mode == 'P' and 'transparency' in image.info:
        image = image.convert('RGBA')
    return image.convert('RGB')


def load_image(path):
    """An RGB PIL image, fully decoded (so truncated files fail here, not later), turned
    upright as its EXIF orientation says."""
    with Image.open(path) as image:
        image.load()
        return to_rgb(ImageOps.exif_transpose(image))


class ImagePathDataset(data.Dataset):
    """(path, image) from a list of paths; an unreadable one gives UNREADABLE and a warning."""

    def __init__(self, paths, image_size=256, random_flip=False):
        self.paths = list(paths)
        self.transform = image_transform(image_size, random_flip)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        path = self.paths[index]
        try:
            return path, self.transform(load_image(path))
        except Exception as e:  # noqa: BLE001 - any decoder failure means "skip this file"
            warn_skipped(path, e)
            return path, UNREADABLE


def collate_skipping_bad(batch):
    """(key, image) pairs -> the good images stacked, their keys, and how many were skipped.

    Returns {'images': [n, 3, H, W], 'keys': n keys, 'skipped': int}; n may be 0.
    """
    good = [(key, image) for key, image in batch if isinstance(image, torch.Tensor)]
    images = torch.stack([image for _, image in good]) if good else torch.empty(0)
    return {'images': images, 'keys': [key for key, _ in good],
            'skipped': len(batch) - len(good)}


def make_loader(paths, image_size, batch_size, num_workers, shuffle=True, seed=None,
                drop_last=True, worker_init_fn=None, prefetch_factor=2, random_flip=False):
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return data.DataLoader(
        ImagePathDataset(paths, image_size, random_flip),
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        collate_fn=collate_skipping_bad,
        drop_last=drop_last and len(paths) >= batch_size,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
        generator=generator,
        worker_init_fn=worker_init_fn,
        prefetch_factor=prefetch_factor if num_workers else None,
    )


def batched_loader(dataset, num_workers, worker_init_fn=None, prefetch_factor=2):
    """A loader of an iterable dataset whose workers batch themselves (streamed sources:
    they split their data across ranks and workers, so batch_size is theirs, not its)."""
    return data.DataLoader(dataset, batch_size=None, num_workers=num_workers,
                           persistent_workers=num_workers > 0,
                           prefetch_factor=prefetch_factor if num_workers else None,
                           pin_memory=torch.cuda.is_available(), worker_init_fn=worker_init_fn)

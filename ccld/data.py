"""The training set: a text file of image paths, loaded so that bad files never stop a run."""

import warnings
from pathlib import Path

import torch
from PIL import Image
from torch.utils import data
from torchvision import transforms

from .errors import UserError


def read_path_list(path):
    """One image path per line; blank lines skipped. Raises UserError if none."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f'path list {path} does not exist.')
    lines = [line.strip() for line in path.read_text(errors='replace').splitlines()]
    paths = [line for line in lines if line]
    if not paths:
        raise UserError(f'path list {path} has no image paths in it.')
    return paths


def image_transform(image_size):
    """Shorter side to image_size (Lanczos), center crop, to a [0, 1] tensor."""
    return transforms.Compose([
        transforms.Resize(image_size, interpolation=transforms.InterpolationMode.LANCZOS),
        transforms.CenterCrop(image_size),
        transforms.ToTensor(),
    ])


def load_image(path):
    """An RGB PIL image, fully decoded (so truncated files fail here, not later)."""
    with Image.open(path) as image:
        image.load()
        return image.convert('RGB')


class ImagePathDataset(data.Dataset):
    """Images from a list of paths; an unreadable one yields None and a warning."""

    def __init__(self, paths, image_size=256):
        self.paths = list(paths)
        self.transform = image_transform(image_size)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        path = self.paths[index]
        try:
            return self.transform(load_image(path))
        except Exception as e:  # noqa: BLE001 - any decoder failure means "skip this file"
            warnings.warn(f'skipping unreadable image {path}: {type(e).__name__}: {e}')
            return None


def collate_skipping_bad(batch):
    """Stacks the good images; reports how many were skipped.

    Returns {'images': [n, 3, H, W], 'skipped': int}; n may be 0.
    """
    good = [item for item in batch if item is not None]
    images = torch.stack(good) if good else torch.empty(0)
    return {'images': images, 'skipped': len(batch) - len(good)}


def make_loader(paths, image_size, batch_size, num_workers, shuffle=True, seed=None,
                drop_last=True):
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return data.DataLoader(
        ImagePathDataset(paths, image_size),
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        collate_fn=collate_skipping_bad,
        drop_last=drop_last and len(paths) >= batch_size,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
        generator=generator,
    )

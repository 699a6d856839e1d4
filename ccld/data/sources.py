"""Where training images come from: a text file of paths, or webdataset tar shards as
img2dataset writes them (`data/{00000..01023}.tar`, a directory of .tar files, or URLs
webdataset can open), streamed and split across ranks and loader workers.

Both kinds are cut into numbered units (a slice of the path list, or one tar file), the
granule that precompute_latents.py resumes by and that tar streaming splits by.
"""

import functools
import io
import itertools
import warnings
from pathlib import Path

import torch
from torch.utils import data

from .images import UNREADABLE, check_some_exist, image_transform, load_image, read_path_list
from ..errors import UserError

IMAGE_EXTENSIONS = ('jpg', 'jpeg', 'png', 'webp', 'bmp', 'tif', 'tiff', 'gif')


def is_tar_spec(spec):
    """Tar shards: a brace pattern, a .tar path or URL, or a directory of .tar files."""
    spec = str(spec)
    return '{' in spec or spec.endswith('.tar') or '://' in spec or spec.startswith('pipe:') \
        or Path(spec).is_dir()


def tar_urls(spec):
    """The shard URLs of a tar spec; a directory is listed once, for its .tar files only."""
    import webdataset as wds
    if Path(spec).is_dir():
        urls = sorted(str(p) for p in Path(spec).glob('*.tar'))
        if not urls:
            raise UserError(f'{spec} is a directory with no .tar shards in it.')
        return urls
    urls = wds.shardlists.expand_urls(str(spec))
    local = [u for u in urls if '://' not in u and not u.startswith('pipe:')]
    missing = [u for u in local if not Path(u).is_file()]
    if missing:
        raise UserError(f'{len(missing)} of the {len(urls)} shards of {spec} do not exist '
                        f'(e.g. {missing[0]}).')
    return urls


class Source:
    """A training set cut into units. `spec` is what the user passed."""

    def __init__(self, spec, unit_size=10_000):
        self.spec = str(spec)
        if is_tar_spec(spec):
            self.urls, self.paths = tar_urls(spec), None
            self.unit_size = None
        else:
            self.paths, self.urls = read_path_list(spec), None
            check_some_exist(self.paths, spec)
            self.unit_size = unit_size

    @property
    def is_tar(self):
        return self.urls is not None

    def __len__(self):
        """The number of units."""
        if self.is_tar:
            return len(self.urls)
        return -(-len(self.paths) // self.unit_size)

    @property
    def known_images(self):
        """The number of images, where it is known without reading the shards."""
        return None if self.is_tar else len(self.paths)

    def unit_size_of(self, unit):
        if self.is_tar:
            return None
        return len(self.paths[unit * self.unit_size:(unit + 1) * self.unit_size])

    def items(self, unit):
        """(key, PIL image or the exception that made it unreadable) of one unit, in order."""
        if self.is_tar:
            yield from tar_images(self.urls[unit])
            return
        for path in self.paths[unit * self.unit_size:(unit + 1) * self.unit_size]:
            try:
                yield path, load_image(path)
            except Exception as e:  # noqa: BLE001 - any decoder failure means "skip this file"
                yield path, e


def tar_images(url):
    """(key, PIL image or exception) for each sample of one tar shard."""
    import webdataset as wds
    for sample in wds.tarfile_samples([{'url': url}], handler=wds.warn_and_continue):
        key = f'{url}:{sample["__key__"]}'
        ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
        if ext is None:
            yield key, ValueError(f'no image among {sorted(k for k in sample if k[0] != "_")}')
            continue
        try:
            yield key, load_image(io.BytesIO(sample[ext]))
        except Exception as e:  # noqa: BLE001
            yield key, e


def transformed(items, image_size):
    """(key, [3, S, S] tensor or None) from (key, image or exception), warning for bad ones."""
    transform = image_transform(image_size)
    for key, image in items:
        if isinstance(image, Exception):
            warnings.warn(f'skipping unreadable image {key}: {type(image).__name__}: {image}')
            yield key, None
        else:
            yield key, transform(image)


def split(items, index, count):
    """Every count-th item from the index-th: one rank's or one worker's share."""
    return itertools.islice(items, index, None, count)


class TarImages(data.IterableDataset):
    """Training images streamed from tar shards, batched in the workers.

    Every epoch the shard order is reshuffled (the same on every rank, from the seed and
    the epoch), then dealt out to ranks and, within a rank, to loader workers: each
    shard is read by one worker of one rank, so each image is seen once per epoch. The
    ranks' shares can differ in length; training ends every rank's epoch when the first
    one runs out (LightningDiffusion's even_epochs).
    """

    def __init__(self, urls, image_size, batch_size, seed, rank, world_size, random_flip=False):
        super().__init__()
        import webdataset as wds
        from .images import collate_skipping_bad
        self.pipeline = wds.DataPipeline(
            wds.SimpleShardList(urls),
            wds.detshuffle(bufsize=len(urls), initial=len(urls), seed=seed),
            functools.partial(split, index=rank, count=world_size),
            wds.split_by_worker,
            wds.tarfile_to_samples(handler=wds.warn_and_continue),
            wds.map(functools.partial(decode_sample,
                                      transform=image_transform(image_size, random_flip))),
            wds.batched(batch_size, collation_fn=collate_skipping_bad),
        )

    def __iter__(self):
        return iter(self.pipeline)


def decode_sample(sample, transform):
    """A tar sample -> (key, its image as a [3, S, S] tensor, or UNREADABLE with a warning)."""
    key = f'{sample.get("__url__")}:{sample.get("__key__")}'
    ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    try:
        if ext is None:
            raise ValueError('no image file in the sample')
        return key, transform(load_image(io.BytesIO(sample[ext])))
    except Exception as e:  # noqa: BLE001
        warnings.warn(f'skipping unreadable image {key}: {type(e).__name__}: {e}')
        return key, UNREADABLE


def make_tar_loader(urls, image_size, batch_size, num_workers, seed, rank, world_size,
                    worker_init_fn=None, prefetch_factor=2, random_flip=False):
    """A loader of already batched tar images (batch_size=None: the workers batch)."""
    dataset = TarImages(urls, image_size, batch_size, seed, rank, world_size, random_flip)
    return data.DataLoader(dataset, batch_size=None, num_workers=num_workers,
                           persistent_workers=num_workers > 0,
                           prefetch_factor=prefetch_factor if num_workers else None,
                           pin_memory=torch.cuda.is_available(), worker_init_fn=worker_init_fn)

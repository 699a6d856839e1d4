"""Released CLOOB configs, checkpoint download and resolution of --cloob-checkpoint.

A checkpoint's sha256 is the hex after the last '-' of its file name. Downloads go to a temp
file next to the target and are renamed into place only once the hash is right, so a cut-off
or corrupt download is never found and used later.
"""

import hashlib
import json
import os
import urllib.request
from pathlib import Path

import torch
from tqdm import tqdm

from ccld.errors import UserError
from ccld.files import sha256

CONFIG_DIR = Path(__file__).parent / 'pretrained_configs'


def list_configs():
    return sorted(p.stem for p in CONFIG_DIR.glob('*.json'))


def get_config(name):
    if name not in list_configs():
        raise UserError(f'unknown CLOOB model {name!r}; valid names: {", ".join(list_configs())}')
    return _read_json(CONFIG_DIR / f'{name}.json')


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise UserError(f'cannot read CLOOB config {path}: {err}')


def _fetch(url, f):
    """Streams url into the open file f and returns the sha256 of what was written."""
    h = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=60) as response:
        total = int(response.headers.get('Content-Length', 0)) or None
        with tqdm(total=total, unit='B', unit_scale=True, desc=url.rsplit('/', 1)[-1]) as bar:
            for chunk in iter(lambda: response.read(1 << 20), b''):
                f.write(chunk)
                h.update(chunk)
                bar.update(len(chunk))
    return h.hexdigest()


def download_checkpoint(config, cache_dir=None):
    """Returns the local path of config['url'], downloading it into cache_dir (default: the
    torch hub checkpoints dir) unless a copy with the right hash is already there."""
    url = config['url']
    filename = url.rsplit('/', 1)[-1]
    expected = Path(filename).stem.rpartition('-')[2]
    cache_dir = Path(cache_dir or Path(torch.hub.get_dir()) / 'checkpoints')
    path = cache_dir / filename
    if path.exists():
        if sha256(path) == expected:
            return path
        path.unlink(missing_ok=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f'.{filename}.{os.getpid()}.part'  # per process: DDP ranks may race
    try:
        with open(tmp, 'wb') as f:
            try:
                digest = _fetch(url, f)
            except OSError as err:
                raise UserError(f'could not download the CLOOB checkpoint ({err}); fetch {url} by '
                                f'hand and pass the file with --cloob-checkpoint PATH') from None
        if digest != expected:
            raise UserError(f'the CLOOB checkpoint downloaded from {url} has sha256 {digest}, '
                            f'expected {expected}; try again later or fetch it by hand and pass '
                            f'it with --cloob-checkpoint PATH')
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def resolve_checkpoint(arg, cache_dir=None):
    """Returns (config, path) for a pretrained name (downloaded if needed) or a .pkl path whose
    config is the sibling .json of the same stem or is known from its released file name."""
    if arg in list_configs():
        config = get_config(arg)
        return config, download_checkpoint(config, cache_dir)
    path = Path(arg)
    if not path.is_file():
        why = 'is a directory' if path.is_dir() else 'not found'
        raise UserError(f'CLOOB checkpoint {arg} {why}; pass an existing .pkl or one of '
                        f'{", ".join(list_configs())}')
    if path.with_suffix('.json').is_file():
        return _read_json(path.with_suffix('.json')), path
    for name in list_configs():
        if path.stem == name or path.name.startswith(f'{name}-'):
            return get_config(name), path
    raise UserError(f'no config for CLOOB checkpoint {path}: put its config next to it as '
                    f'{path.with_suffix(".json").name}, or keep the released file name (starting '
                    f'with one of {", ".join(list_configs())})')

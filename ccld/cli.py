"""What every command-line entry point shares: user errors become one line and exit 2,
the types of its flags, and the checks of the files and devices they name."""

import argparse
import math
import os
import sys
import warnings
from pathlib import Path
from typing import NamedTuple

from .errors import RunError, UserError

# ccld.sampling.METHODS and ccld.schedule.SCHEDULES, named here so that --help and usage
# errors need not import torch (a test checks that they are the library's).
SAMPLING_METHODS = ('ddpm', 'ddim', 'prk', 'plms', 'pie', 'plms2', 'iplms', 'dpmpp_2m')
SCHEDULES = ('spliced', 'karras')
# ccld.models.lora's target groups, and those it targets by default.
LORA_TARGETS = ('conv', 'attention', 'mapping', 'modulation', 'skip')
DEFAULT_LORA_TARGETS = ('conv', 'attention', 'mapping')
IMAGES_HELP = ('a text file with one image path per line; webdataset tar shards '
               '(data/{00000..01023}.tar, or a directory of .tar files); parquet files with the '
               'images in a column (a .parquet file, a directory of them or a glob, as '
               'img2dataset --output_format parquet writes them); a directory written by '
               'datasets\' save_to_disk; or hf://OWNER/NAME, a Hugging Face hub dataset')
# Said of every flag that takes a model file (ccld.models.hub resolves the names).
HUB_FILE_HELP = ('; or hf://OWNER/NAME[@REVISION][/FILE], a file of a Hugging Face hub model '
                 'repository (without FILE: its one model file)')
AUTOENCODER_HELP = ('autoencoder NAME, for NAME.yaml + NAME.ckpt (or NAME.safetensors); or '
                    'hf://OWNER/NAME[@REVISION][/NAME], the pair in a Hugging Face hub repository')
CLOOB_HELP = 'pretrained CLOOB name, or a .pkl file (not from the hub: pickles can run code)'


def run(main, prog):
    """Calls main(); a UserError prints `prog: error: message` and exits with code 2, a
    RunError the same with code 1.

    Warnings print as one `prog: warning: message` line, without the source location.
    """
    warnings.formatwarning = lambda message, *args, **kwargs: f'{prog}: warning: {message}\n'
    try:
        main()
    except UserError as e:
        print(f'{prog}: error: {e}', file=sys.stderr)
        sys.exit(2)
    except RunError as e:
        print(f'{prog}: error: {e}', file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f'{prog}: interrupted', file=sys.stderr)
        sys.exit(130)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, unless it is just "not given" (None, False, [])."""

    def _get_help_string(self, action):
        unset = action.default is None or action.default is False or action.default == []
        return action.help if unset else super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """Reports a bad argument in one line that points to --help, not under the full usage."""

    def __init__(self, *args, formatter_class=HelpFormatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)

    def error(self, message):
        self.exit(2, f'{self.prog}: error: {message} (see {self.prog} --help)\n')


def count(n, noun, plural=None):
    """'1 image', '2 images': a number of things, in words that read right for 1."""
    return f'{n} {noun if n == 1 else plural or noun + "s"}'


def sample_command(checkpoint, *flags):
    """The sample.py command line, as the tools print it, that samples `checkpoint` with
    the `flags` (pairs of a flag and a path): every path absolute (a hub name, hf://...,
    as it is), so that it runs as printed from any folder. The checkpoint's record gives
    the rest (sample.py's defaults are the frozen models, scale and size it records)."""
    import shlex

    def absolute(path):
        return str(path) if str(path).startswith('hf://') else os.path.abspath(path)
    sample_py = Path(__file__).resolve().parents[1] / 'sample.py'
    words = ['python3', str(sample_py), 'a prompt', '--checkpoint', absolute(checkpoint)]
    for flag, path in flags:
        words += [flag, absolute(path)]
    return shlex.join(words)


def default_workers():
    """Image loading processes by default: one per CPU this process may use, at most 8."""
    usable = os.sched_getaffinity(0) if hasattr(os, 'sched_getaffinity') else None
    return min(8, len(usable) if usable else os.cpu_count() or 1)


def add_table_flags(group):
    """The flags of the images held in tables: parquet files and Hugging Face datasets."""
    group.add_argument('--image-column',
                       help='the column of parquet files or datasets that holds the images '
                       '(default: img2dataset\'s jpg, or the datasets Image column, found from '
                       'the schema)')
    group.add_argument('--dataset-split', default='train',
                       help='the split of a Hugging Face dataset (hf://OWNER/NAME, or a '
                       'save_to_disk directory of several splits)')
    return group


def whole_number(text, low, high=None):
    """int(text), which must lie in [low, high]."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected a whole number, got {text!r}') from None
    if value < low or (high is not None and value > high):
        bounds = f'at least {low}' if high is None else f'between {low} and {high}'
        raise argparse.ArgumentTypeError(f'must be {bounds}, got {value}')
    return value


def positive_int(text):
    return whole_number(text, 1)


def non_negative_int(text):
    try:
        return whole_number(text, 0)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f'expected a whole number >= 0, got {text!r}') from None


def seed(text):
    """A whole number torch accepts as a seed."""
    return whole_number(text, -2 ** 63, 2 ** 64 - 1)


def training_seed(text):
    """A seed for training, which also seeds numpy (0 to 2**32 - 1)."""
    return whole_number(text, 0, 2 ** 32 - 1)


def finite_float(text):
    """A number that is not inf or nan."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected a number, got {text!r}') from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f'expected a finite number, got {text!r}')
    return value


def positive_float(text):
    value = finite_float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f'must be greater than 0, got {value}')
    return value


def non_negative_float(text):
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f'must be 0 or more, got {value}')
    return value


def multipliers(text):
    """'4,4,8,8' -> [4, 4, 8, 8]; exactly four positive integers."""
    try:
        values = [int(part) for part in text.split(',')]
    except ValueError:
        values = []
    if len(values) != 4 or min(values) < 1:
        raise argparse.ArgumentTypeError(f'expected four positive integers like 4,4,8,8, '
                                         f'got {text!r}')
    return values


def lora_targets(text):
    """'conv,attention' -> ['conv', 'attention']: LoRA target groups (LORA_TARGETS)."""
    values = [part.strip() for part in text.split(',') if part.strip()]
    unknown = [v for v in values if v not in LORA_TARGETS]
    if not values or unknown:
        raise argparse.ArgumentTypeError(f'expected a comma-separated list of '
                                         f'{", ".join(LORA_TARGETS)}, got {text!r}')
    return list(dict.fromkeys(values))


def adapter_spec(text):
    """'FILE' or 'FILE:STRENGTH' -> (FILE, strength), strength 1 when not given."""
    path, colon, strength = text.rpartition(':')
    if colon:
        try:
            value = finite_float(strength)
        except argparse.ArgumentTypeError:
            value = None
        if value is not None:
            return path, value
    return text, 1.0


class CheckpointSpec(NamedTuple):
    """evaluate.py's --checkpoint: a file, with its own sampler and label where given."""
    path: str
    method: str = None
    steps: int = None
    label: str = None


def checkpoint_spec(text):
    """'FILE' or 'FILE:KEY=VALUE,...' with the keys method, steps and label -> a
    CheckpointSpec. A path may hold ':' itself (as adapter_spec's do), so what follows the
    last ':' is read as options only where each of its comma-separated pieces is
    KEY=VALUE and the whole text is not a file; then an unknown key or a bad value is an
    error, not a path that does not exist."""
    path, colon, tail = text.rpartition(':')
    pieces = tail.split(',')
    if not colon or not path or Path(text).exists() or not all('=' in p for p in pieces):
        return CheckpointSpec(text)
    options = {}
    for piece in pieces:
        key, _, value = (part.strip() for part in piece.partition('='))
        if key not in CheckpointSpec._fields[1:] or key in options:
            raise argparse.ArgumentTypeError(
                f'{text!r}: expected FILE:method=M,steps=N,label=NAME (each at most once), '
                f'got {key!r}')
        if key == 'method' and value not in SAMPLING_METHODS:
            raise argparse.ArgumentTypeError(f'{text!r}: method must be one of '
                                             f'{", ".join(SAMPLING_METHODS)}, got {value!r}')
        if key == 'steps':
            try:
                value = positive_int(value)
            except argparse.ArgumentTypeError as e:
                raise argparse.ArgumentTypeError(f'{text!r}: steps {e}') from None
        if key == 'label' and not value:
            raise argparse.ArgumentTypeError(f'{text!r}: the label is empty')
        options[key] = value
    return CheckpointSpec(path, **options)


def device(text):
    """'cpu', 'cuda', 'cuda:N' or 'mps', checked to exist on this machine."""
    import torch
    try:
        value = torch.device(text)
    except RuntimeError:
        value = None
    if value is None or value.type not in ('cpu', 'cuda', 'mps'):
        raise argparse.ArgumentTypeError(f'expected cpu, cuda, cuda:N or mps, got {text!r}')
    if value.type == 'cuda' and (value.index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f'{text} is not available here '
                                         f'({torch.cuda.device_count()} CUDA devices); '
                                         'use --device cpu')
    if value.type == 'mps' and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError('mps is not available here; use --device cpu')
    return value


def default_device():
    """The first GPU if there is one, else the CPU."""
    import torch
    return torch.device('cuda' if torch.cuda.is_available() else 'cpu')


# Image sides the autoencoder (kl-f8) and the U-Net can both take: the latents are 1/8 of
# the image and the U-Net halves them three times.
SIZE_MULTIPLE = 64


def image_size(text):
    """--size: 'WxH' (384x256) or one number N (an N x N square) -> (width, height), each
    side a multiple of SIZE_MULTIPLE; else the error names the nearest sizes that are."""
    try:
        sides = [int(part) for part in text.lower().split('x')]
    except ValueError:
        sides = []
    if len(sides) not in (1, 2) or min(sides) < 1:
        raise argparse.ArgumentTypeError(f'expected WIDTHxHEIGHT like 384x256, or one number '
                                         f'for a square, got {text!r}')
    width, height = size_pair(sides[0] if len(sides) == 1 else sides)
    if width % SIZE_MULTIPLE or height % SIZE_MULTIPLE:
        raise argparse.ArgumentTypeError(
            f'{text}: each side must be a multiple of {SIZE_MULTIPLE} for the autoencoder and '
            f'the U-Net; nearest valid sizes: '
            f'{", ".join(nearest_sizes((width, height), SIZE_MULTIPLE, len(sides) == 1))}')
    return width, height


def size_pair(size):
    """(width, height) of a size given as one number (a square, as checkpoint records
    store image_size) or as a (width, height) pair: where every size is normalised."""
    if isinstance(size, (tuple, list)):
        width, height = size
        return int(width), int(height)
    return int(size), int(size)


def size_text(size):
    """'256' for a square, '384x256' otherwise: how --size writes it."""
    width, height = size_pair(size)
    return str(width) if width == height else f'{width}x{height}'


def nearest_sizes(size, multiple, square=False):
    """The sizes nearest to `size` whose sides are multiples of `multiple` (each side
    rounded down and up), nearest first, as --size would be written; only squares where
    `square`."""
    def around(side):
        low = side // multiple * multiple
        return sorted({max(low, multiple), max(low + multiple * (side % multiple > 0), multiple)},
                      key=lambda s: abs(s - side))
    width, height = size_pair(size)
    if square:
        return [size_text(side) for side in around(width)]
    pairs = [(w, h) for w in around(width) for h in around(height)]
    pairs.sort(key=lambda pair: abs(pair[0] - width) + abs(pair[1] - height))
    return [f'{w}x{h}' for w, h in pairs]


def check_image_size(image_size):
    """Image sizes the autoencoder and the U-Net can both take."""
    if image_size % 64:
        raise UserError(f'--image-size {image_size} must be a multiple of 64 (the latents '
                        'are 1/8 of it and the U-Net halves them three times).')


def check_frozen_model_files(vqgan_model, cloob_checkpoint):
    """The autoencoder NAME and CLOOB named by the flags exist, before anything loads."""
    from cloob_training.pretrained import list_configs
    for suffixes in (['.yaml'], ['.ckpt', '.safetensors']):
        if not any(Path(vqgan_model + s).is_file() for s in suffixes):
            raise UserError(f'--vqgan-model: {vqgan_model}{suffixes[0]} does not exist '
                            '(NAME means NAME.yaml + NAME.ckpt).')
    if cloob_checkpoint not in list_configs() and not Path(cloob_checkpoint).is_file():
        raise UserError(f'--cloob-checkpoint: {cloob_checkpoint} is neither a file nor a '
                        f'pretrained name ({", ".join(list_configs())}).')


def check_devices(accelerator, devices):
    """GPUs asked for must exist; several processes on the CPU must be asked for."""
    import torch
    if accelerator == 'mps' and not torch.backends.mps.is_available():
        raise UserError('--accelerator mps: MPS is not available here; use --accelerator cpu.')
    if accelerator in ('gpu', 'cuda') or (accelerator == 'auto' and devices > 1):
        available = torch.cuda.device_count()
        if available == 0:
            raise UserError(f'--num-gpus {devices}: this machine has no CUDA GPU; pass '
                            f'--accelerator cpu to run {devices} CPU process(es) instead.')
        if devices > available:
            raise UserError(f'--num-gpus {devices}: this machine has {available} CUDA GPU(s).')

"""Reading the three kinds of diffusion checkpoint users own.

- 'bare': a released DiffusionModel state dict (yfcc_cfg, danbooru_cfg), .pth/.ckpt
  or .safetensors; also a model export (export_model.py), whose record comes from its
  safetensors metadata.
- 'original': a Lightning checkpoint written by the original training script
  (state_dict keys model./model_ema./ae_model./cloob., top-level scale_factor).
- 'ccld': a Lightning checkpoint written by our training script; it carries a 'ccld'
  record of what is needed to rebuild and sample.
- 'lora': a ccld checkpoint of a --lora-rank run: adapters only, its record naming the
  base (read only where asked for: it is no model by itself).
"""

import pickle
import re
import warnings
import zipfile
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from . import exports
from ..errors import UserError, reason as error_reason
from ..files import not_a_file
from .student import StudentModel, is_student
from .unet import DiffusionModel, infer_widths

KINDS = {
    'bare': 'a released model state dict',
    'original': "a checkpoint of the original training script",
    'ccld': 'a ccld training checkpoint',
    'lora': 'a LoRA training checkpoint',
}


@dataclass
class DiffusionCheckpoint:
    kind: str
    model: dict            # the trained weights
    model_ema: dict        # the averaged weights (== model for a bare state dict)
    autoencoder_scale: Optional[float]  # None when the checkpoint does not record it
    record: dict           # what the checkpoint says about itself (ccld kind and exports)
    raw: dict              # everything that was loaded
    base: Optional['DiffusionCheckpoint'] = None  # a LoRA checkpoint's base, once read

    @property
    def description(self):
        export = self.record.get('format') == exports.FORMAT
        if 'teacher' not in self.record:
            return 'a ccld model export' if export else KINDS[self.kind]
        steps = self.record.get('student_steps')
        student = f'a student distilled for {steps} step{"s" * (steps != 1)}' if steps else \
            'a guidance-distilled student'
        if export:
            return f'a ccld model export of {student}'
        return f'a distillation checkpoint of {student}' if 'optimizer_states' in self.raw \
            else student


def _legacy_globals():
    """What checkpoints of the original script (Lightning 1.5) may pickle besides tensors
    and plain containers: hyperparameters as an AttributeDict (read back as a plain dict:
    the safe unpickler fills no dict subclass) or argparse.Namespace, and callback states
    keyed by callback class. They are only rebuilt as data, no code of the file runs;
    anything else in a checkpoint is refused."""
    import argparse

    from pytorch_lightning.callbacks import ModelCheckpoint
    return [argparse.Namespace, (dict, 'pytorch_lightning.utilities.parsing.AttributeDict'),
            (ModelCheckpoint, 'pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint')]


def safe_load(path, mmap=True):
    """torch.load with weights_only=True (never full unpickling), allowing the few types
    that the original script's checkpoints hold. Raises UserError for anything unreadable.

    mmap: tensors stay in the file until used, so taking a training checkpoint's EMA
    weights or widths does not read its optimizer state into memory. Only files in
    torch.save's zip format can be mapped; older ones (and other pickles) are read whole.
    """
    if not_a_file(path):
        raise UserError(f'{path} {not_a_file(path)}.')
    zipped = zipfile.is_zipfile(path)
    with open(path, 'rb') as f:
        pickled = f.read(1) == b'\x80'  # the first opcode of pickle protocols 2 and later
    if not zipped and not pickled:
        raise UserError(f'{path}: cannot read it as a PyTorch checkpoint (it is neither '
                        "torch.save's zip format nor a pickle); it may be truncated or not a "
                        'checkpoint.')
    try:
        with torch.serialization.safe_globals(_legacy_globals()), warnings.catch_warnings():
            warnings.filterwarnings('ignore', message='Detected pickle protocol')
            return torch.load(path, map_location='cpu', weights_only=True,
                              mmap=mmap and zipped)
    except pickle.UnpicklingError as e:
        if not zipped and 'Unsupported operand' in str(e):  # a pickle torch.save did not write
            raise UserError(f'{path} is a plain pickle (a CLOOB .pkl?), not a PyTorch '
                            'checkpoint; pass a diffusion checkpoint.') from None
        found = re.search(r'WeightsUnpickler error: *(.+?)(\.\s|$)', str(e), re.S)
        if found:
            what = ' '.join(found.group(1).split())
            raise UserError(f'{path} holds objects other than weights ({what}); ccld loads '
                            'checkpoints without running code in them, so it is refused.') from None
        raise UserError(f'{path}: cannot read it as a PyTorch checkpoint ({e}).') from None
    except Exception as e:  # noqa: BLE001 - truncated, not a zip or pickle, wrong format...
        reason = error_reason(e)
        raise UserError(f'{path}: cannot read it as a PyTorch checkpoint ({reason}); it may be '
                        'truncated or not a checkpoint.') from None


def read_safetensors(path, device='cpu', convert=None):
    """The tensors and the metadata of a .safetensors file; UserError if it is not one.

    Each tensor is read into its own memory on `device` (pread, not a mapping whose pages
    would count twice once converted), then passed through `convert(key, tensor)` if
    given, before the next is read: an fp16 file read as fp32 never holds both copies.
    """
    from safetensors import safe_open
    convert = convert or (lambda key, tensor: tensor)
    try:
        with safe_open(str(path), 'pt', device=str(device), backend='pread') as f:
            return {key: convert(key, f.get_tensor(key)) for key in f.keys()}, \
                f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - truncated, not safetensors, bad header...
        reason = error_reason(e)
        raise UserError(f'{path}: cannot read it as safetensors ({reason}); it may be '
                        'truncated or not a safetensors file.') from None


def check_weights(state_dict, path, base_channels=None, channel_multipliers=None):
    """UserError unless `state_dict` loads into a DiffusionModel (of the given widths, where
    given): keys and shapes are checked against one built on the meta device, which takes
    no memory."""
    build_model(state_dict, base_channels, channel_multipliers, path, device='meta')


def _sub_state(state_dict, prefix):
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def read_checkpoint(path, lora=False, device='cpu'):
    """Reads a diffusion checkpoint of any kind without copying it: a torch file is mapped
    (its tensors read from the file when used), a .safetensors file read tensor by tensor
    onto `device`, an export's fp16 tensors turned into the fp32 the model computes in as
    they come. A LoRA checkpoint (adapters only) only with `lora`, else UserError saying
    what to do with it."""
    path = Path(path)
    if not_a_file(path):
        raise UserError(f'checkpoint {path} {not_a_file(path)}{checkpoint_in(path)}.')
    record = {}
    if path.suffix == '.safetensors':
        record = read_record(path)
        obj, _ = read_safetensors(path, device, _to_fp32 if record else None)
    else:
        obj = safe_load(path)
    if not isinstance(obj, dict):
        raise UserError(f'{path} is not a diffusion checkpoint (it holds a {type(obj).__name__}).')

    if 'state_dict' in obj and any(k.startswith(('model.', 'model_ema.'))
                                   for k in obj['state_dict']):
        state = obj['state_dict']
        model, model_ema = _sub_state(state, 'model.'), _sub_state(state, 'model_ema.')
        kind = 'ccld' if 'ccld' in obj else 'original'
        record = obj.get('ccld', {})
        if 'lora' in record:
            if not lora:
                raise UserError(f'{path} is a LoRA checkpoint: it holds adapters, not a model. '
                                'Export the adapter with export_model.py and sample its base '
                                'with --lora, or export_model.py --merge it into a model.')
            kind = 'lora'
        scale = record.get('autoencoder_scale', obj.get('scale_factor'))
        if scale is None and 'autoencoder_scale' in model_ema:
            scale = model_ema['autoencoder_scale']
        # A distilled student's file holds its averaged weights alone.
        model, model_ema = model or model_ema, model_ema or model
    elif 'net.0.main.0.weight' in obj:
        kind, model, model_ema = 'bare', obj, obj
        scale = record.get('autoencoder_scale', obj.get('autoencoder_scale'))
    else:
        raise UserError(f'{path} holds no diffusion model weights: expected a released state '
                        'dict, a training checkpoint or a model export.')
    scale = float(scale) if scale is not None else None
    return DiffusionCheckpoint(kind, model, model_ema, scale, record, obj)


def checkpoint_in(directory):
    """'; pass DIR/checkpoints/last.ckpt' where `directory` is a run's folder (or its
    checkpoints folder) given for a checkpoint, else ''."""
    for last in (Path(directory) / 'checkpoints' / 'last.ckpt', Path(directory) / 'last.ckpt'):
        if last.is_file():
            return f'; pass {last}, the newest checkpoint of the run there'
    return ''


def read_record(path):
    """What a checkpoint says about itself (a ccld checkpoint's record, an export's
    metadata) without reading its weights (torch files are mapped, not read); {} when it
    says nothing or does not exist (read_checkpoint then tells what is wrong)."""
    path = Path(path)
    if not path.is_file():
        return {}
    if path.suffix == '.safetensors':
        from safetensors import safe_open
        try:
            with safe_open(str(path), 'pt') as f:
                return exports.read_record(f.metadata() or {}, path)
        except UserError:
            raise
        except Exception:  # noqa: BLE001 - not safetensors: read_checkpoint says so
            return {}
    obj = safe_load(path)
    return obj.get('ccld', {}) if isinstance(obj, dict) else {}


def _to_fp32(key, tensor):
    """fp16 exports load into the fp32 model."""
    return tensor.float() if tensor.is_floating_point() else tensor


def build_model(state_dict, base_channels=None, channel_multipliers=None, path='checkpoint',
                device='cpu', init_draws=False):
    """A DiffusionModel with the widths the weights have, loaded strictly (a StudentModel
    when the weights have a guidance embedding), on `device`.

    The model is built on the meta device and takes the tensors of `state_dict` as its
    own (assign_weights): no initialised copy is made, and a mapped file's tensors stay
    in the file until used. Explicit widths override the inferred ones (and must fit the
    weights). With `init_draws`, the random numbers its initialisation would draw are
    drawn all the same (InitDraws), for a caller whose random stream goes on from there.
    """
    try:
        inferred = infer_widths(state_dict, channel_multipliers or (4, 4, 8, 8))
    except KeyError as e:
        raise UserError(f'{path} is missing {e} and is not a DiffusionModel checkpoint.') from None
    base = base_channels or inferred[0]
    mults = channel_multipliers or inferred[1]
    if base != inferred[0] and channel_multipliers is None:
        mults = [inferred[0] * m // base for m in inferred[1]]
    if [base * m for m in mults] != [inferred[0] * m for m in inferred[1]]:
        widths = ','.join(str(inferred[0] * m) for m in inferred[1])
        raise UserError(f'{path} has level widths {widths}, which base channels {base} and '
                        f'multipliers {",".join(map(str, mults))} do not give; drop the width '
                        'flags to use the widths of the weights.')
    if any(base * m % 64 for m in mults):
        raise UserError(f'{path}: level widths {",".join(str(base * m) for m in mults)} are not '
                        'multiples of 64, so it is not a DiffusionModel checkpoint.')
    with torch.device('meta'), InitDraws() if init_draws else nullcontext():
        model = (StudentModel if is_student(state_dict) else DiffusionModel)(base, mults)
    try:
        missing, unexpected = assign_weights(model, state_dict, device)
    except RuntimeError:
        raise UserError(f'{path}: the weights\' shapes match no DiffusionModel width '
                        f'(tried base channels {base}, multipliers '
                        f'{",".join(map(str, mults))}).') from None
    if missing or unexpected:
        names = (missing or unexpected)[:3]
        what = 'is missing' if missing else 'has unexpected'
        raise UserError(f'{path} {what} {len(missing or unexpected)} weights (e.g. '
                        f'{", ".join(names)}); it is not a complete DiffusionModel.')
    return model


class InitDraws(TorchDispatchMode):
    """Modules built on the meta device under this mode draw from the CPU generator what
    initialising them on the CPU would draw: each random op is run on a scratch tensor of
    its size (one tensor's memory at a time, dropped at once), then on the meta tensor.
    The random state after is the one an initialised model leaves."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if torch.Tag.nondeterministic_seeded in func.tags:
            if args and isinstance(args[0], torch.Tensor) and args[0].is_meta:  # uniform_...
                func(torch.empty_like(args[0], device='cpu'), *args[1:], **kwargs)
            elif kwargs.get('device') == torch.device('meta'):  # randn, rand...
                func(*args, **dict(kwargs, device=torch.device('cpu')))
        return func(*args, **kwargs)


def assign_weights(model, state_dict, device='cpu'):
    """Makes the tensors of `state_dict` the model's own, as load_state_dict(strict=False,
    assign=True) would, one at a time, each first put on `device` in the model's dtype (as
    load_state_dict's copy would convert it): a tensor that is there in that dtype already
    is not copied, and a model built on the meta device never holds weights of its own.
    Nothing is loaded when keys are missing or unexpected; returns (missing, unexpected)
    keys, and RuntimeError for a wrong shape, as load_state_dict does."""
    expected = model.state_dict(keep_vars=True)
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    if missing or unexpected:
        return missing, unexpected
    for key, current in expected.items():
        tensor = state_dict[key]
        if tensor.shape != current.shape:
            raise RuntimeError(f'{key} is {list(tensor.shape)}, the model has '
                               f'{list(current.shape)}')
        tensor = tensor.to(device, current.dtype)
        owner, _, name = key.rpartition('.')
        if isinstance(current, nn.Parameter):
            tensor = nn.Parameter(tensor, requires_grad=current.requires_grad)
        setattr(model.get_submodule(owner), name, tensor)
    return missing, unexpected

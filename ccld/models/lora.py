"""LoRA adapters on a DiffusionModel, with peft's LoRA layers (nn.Linear and nn.Conv2d).

A run that finetunes with LoRA trains small low-rank updates of chosen layers of a frozen
base model. What it saves names its base by path and by a digest of the base's weights,
so an adapter is only ever put on the model it was trained on. Here: which layers an
adapter targets, putting adapters on a model (to train, or to sample at a strength), their
weights in and out, folding them into the base, and the adapter file export_model.py
writes (safetensors, its settings in the metadata).

The digest is the sha256 of the base's weights rounded to fp16, key by key, so the fp32
and the fp16 export of one model are the same base.
"""

import hashlib
import logging
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .. import cli, software_version
from ..errors import UserError
from ..files import atomic_write, not_a_file
from . import exports, hub
from .unet import Modulation, ResLinearBlock, ResModConvBlock, SelfAttention2d, infer_widths

FORMAT = 'ccld-lora'
FORMAT_VERSION = '1'
TRAINED = 'default'  # peft's name of the adapter a run trains
DEFAULT_TARGETS = cli.DEFAULT_LORA_TARGETS
DTYPES = {'fp16': torch.float16, 'fp32': torch.float32}
# What an adapter file passes on from its run's record: sampling a base with it defaults
# to the size, scale and frozen models its run trained with.
CARRIED = ('image_size', 'autoencoder_scale', 'autoencoder', 'autoencoder_sha256',
           'autoencoder_encoder_sha256', 'cloob_checkpoint', 'cloob_checkpoint_sha256',
           'train_set', 'train_images')


def _peft():
    """peft, imported without the warning bitsandbytes logs on CPUs without its 4-bit
    kernels (which LoRA here never uses)."""
    logging.getLogger('bitsandbytes').setLevel(logging.ERROR)
    import peft
    return peft


def target_modules(model, targets):
    """The names of the layers of `model` that the target groups (cli.LORA_TARGETS) name:
    conv, the residual blocks' 3x3 convolutions; attention, the attention projections
    (1x1 convolutions); mapping, the mapping network's linears; modulation, the linears
    that predict each block's scales and shifts; skip, the blocks' 1x1 skip convolutions."""
    names = []
    for name, module in model.named_modules():
        at = f'{name}.' if name else ''
        if isinstance(module, ResModConvBlock):
            if 'conv' in targets:
                names += [f'{at}main.0', f'{at}main.4']
            if 'skip' in targets and isinstance(_unadapted(module.skip), nn.Conv2d):
                names.append(f'{at}skip')
        elif isinstance(module, SelfAttention2d) and 'attention' in targets:
            names += [f'{at}qkv_proj', f'{at}out_proj']
        elif isinstance(module, Modulation) and 'modulation' in targets:
            names.append(f'{at}layer')
        elif isinstance(module, ResLinearBlock) and 'mapping' in targets:
            names += [f'{at}main.0', f'{at}main.2']
            if isinstance(_unadapted(module.skip), nn.Linear):
                names.append(f'{at}skip')
    return names


def _unadapted(layer):
    """A layer itself, not the adapter layer peft may have put around it."""
    return layer.get_base_layer() if hasattr(layer, 'get_base_layer') else layer


def add_adapter(model, rank, alpha, targets, name=TRAINED):
    """Puts a fresh LoRA adapter (B = 0: the model's output is unchanged) on the targeted
    layers of `model`, in place; only adapter weights then train. Returns the model."""
    peft = _peft()
    pattern = '|'.join(re.escape(n) for n in target_modules(model, targets))
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=f'^(?:{pattern})$')
    with warnings.catch_warnings():  # (that a second adapter makes two: as meant)
        warnings.filterwarnings('ignore', message='Already found a `peft_config`')
        return peft.inject_adapter_in_model(config, model, adapter_name=name)


def freeze_base(model, dtype):
    """Casts the frozen (non-adapter) parameters of `model` to `dtype`, in place; adapter
    weights and buffers (the autoencoder scale, the Fourier matrices) stay as they are."""
    for p in model.parameters():
        if not p.requires_grad:
            p.data = p.data.to(dtype)
    return model


def is_adapter_key(key):
    return '.lora_A.' in key or '.lora_B.' in key


def adapter_state(state_dict, name=TRAINED):
    """The adapter `name`'s weights of an adapted model's state dict, under peft's keys
    (without the adapter's name)."""
    return {key.replace(f'.{name}.', '.'): value for key, value in state_dict.items()
            if is_adapter_key(key) and f'.{name}.' in key}


def load_adapter_state(model, state, name=TRAINED, path='adapter'):
    """Loads adapter weights (peft's keys) into the adapter `name` of `model`."""
    peft = _peft()
    expected = adapter_state(model.state_dict(), name)
    if set(state) != set(expected):
        raise UserError(f'{path} holds the weights of {len(state)} adapter tensors where its '
                        f'settings give {len(expected)}; it is damaged or not a ccld adapter.')
    peft.set_peft_model_state_dict(model, {k: v.float() for k, v in state.items()},
                                   adapter_name=name)


def merge(model):
    """Folds every active adapter into its layer and takes the adapters out: the model
    then has the original state-dict keys."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent, _, child = name.rpartition('.')
            setattr(model.get_submodule(parent), child, module.get_base_layer())
    if hasattr(model, 'peft_config'):
        del model.peft_config
    return model


def weights_digest(state_dict):
    """sha256 of a model's weights rounded to fp16, key by key (the autoencoder scale,
    which is no weight, left out)."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        if key == 'autoencoder_scale':
            continue
        h.update(key.encode())
        h.update(state_dict[key].detach().to(torch.float16).contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


@dataclass
class Adapter:
    """An adapter's settings and weights (peft's keys), and the base it was made for."""
    rank: int
    alpha: float
    targets: list
    base: str                 # the base's path when the adapter was trained
    base_sha256: str          # weights_digest of the base
    widths: tuple             # the base's (base_channels, channel_multipliers)
    state: dict = field(default_factory=dict)
    record: dict = field(default_factory=dict)  # what else the file or checkpoint says

    def spec(self):
        """The settings a run records in its checkpoints."""
        return {'rank': self.rank, 'alpha': self.alpha, 'targets': list(self.targets),
                'base': self.base, 'base_sha256': self.base_sha256}

    def check_base(self, state_dict, what, adapter_path):
        """UserError unless `state_dict` (the weights of `what`) is this adapter's base."""
        base, mults = infer_widths(state_dict, self.widths[1])
        widths = [base * m for m in mults]
        made_for = [self.widths[0] * m for m in self.widths[1]]
        if widths != made_for:
            raise UserError(f'{adapter_path} is an adapter for another base: it was made for '
                            f'level widths {",".join(map(str, made_for))}, and {what} has '
                            f'{",".join(map(str, widths))}.')
        digest = weights_digest(state_dict)
        if digest != self.base_sha256:
            raise UserError(f'{adapter_path} is an adapter for another base: it was made for '
                            f'{self.base} (weights sha256 {self.base_sha256[:12]}), and {what} '
                            f'holds other weights ({digest[:12]}).')


def spec_of(rank, alpha, targets, base_path, base_state):
    """A new run's Adapter settings, for the base at `base_path` (named by its absolute
    path, or its pinned hub name if it came from the hub) with weights `base_state`."""
    base = hub.name_of(base_path) if hub.cached_location(base_path) else \
        str(Path(base_path).resolve())
    return Adapter(rank, float(alpha if alpha is not None else rank),
                   list(targets or DEFAULT_TARGETS), base, weights_digest(base_state),
                   infer_widths(base_state))


def read_base(adapter, what):
    """The base model `adapter` was trained on, read from its path and checked to hold the
    weights it had then (UserError if not); `what` names the adapter's file."""
    from .checkpoint_files import check_weights, read_checkpoint
    try:
        base = read_checkpoint(hub.resolve(adapter.base, what))
    except UserError as e:
        back = '' if hub.is_hub_name(adapter.base) else '; put it back there'
        raise UserError(f'{what} adapts the base model {adapter.base}, which cannot be read '
                        f'({e}){back}.') from None
    adapter.check_base(base.model_ema, adapter.base, what)
    check_weights(base.model_ema, adapter.base)
    return base


def from_checkpoint(ckpt):
    """The adapter of a LoRA training checkpoint (its EMA weights)."""
    spec, record = ckpt.record['lora'], ckpt.record
    return Adapter(int(spec['rank']), float(spec['alpha']), list(spec['targets']), spec['base'],
                   spec['base_sha256'],
                   (record['base_channels'], list(record['channel_multipliers'])),
                   adapter_state(ckpt.model_ema), record)


def adapted_model(base_state, adapter, dtype=torch.float32, name=TRAINED, init_draws=False):
    """A DiffusionModel with the base's weights (strictly loaded), frozen in `dtype`, and
    the adapter's layers on it (its weights, if it holds any; else fresh ones), in fp32.
    `init_draws`: as build_model's (a training run's random stream goes on from here)."""
    from .checkpoint_files import build_model
    model = build_model(base_state, path=adapter.base, init_draws=init_draws)
    add_adapter(model, adapter.rank, adapter.alpha, adapter.targets, name)
    if adapter.state:
        load_adapter_state(model, adapter.state, name, adapter.base)
    return freeze_base(model, dtype)


def merged_checkpoint(ckpt, adapter, what):
    """The base of a LoRA checkpoint `ckpt` (read from its path, checked) with the adapter's
    EMA weights folded in, in fp32 under the original keys, as a DiffusionCheckpoint that
    carries the run's record and step."""
    from .checkpoint_files import DiffusionCheckpoint
    base = read_base(adapter, what)
    state = merge(adapted_model(base.model_ema, adapter)).state_dict()
    return DiffusionCheckpoint('bare', state, state, ckpt.autoencoder_scale, ckpt.record,
                               ckpt.raw)


def write(adapter, path, dtype='fp32', step=None):
    """Writes the adapter file atomically; returns the metadata written."""
    tensors = {key: value.to(DTYPES[dtype]).contiguous() for key, value in adapter.state.items()}
    metadata = {key: adapter.record.get(key) for key in CARRIED}
    metadata.update(format=FORMAT, format_version=FORMAT_VERSION, dtype=dtype,
                    rank=adapter.rank, alpha=adapter.alpha, targets=adapter.targets,
                    base=adapter.base, base_sha256=adapter.base_sha256,
                    base_channels=adapter.widths[0], channel_multipliers=adapter.widths[1],
                    step=step, software=f'ccld {software_version()}')
    from safetensors.torch import save
    with atomic_write(path) as f:
        f.write(save(tensors, exports.to_metadata(metadata)))
    return metadata


def read(path):
    """An adapter file as export_model.py writes it; UserError for anything else."""
    from .checkpoint_files import read_safetensors
    if not Path(path).is_file():
        file, _, strength = str(path).rpartition(':')
        if file and Path(file).is_file():
            raise UserError(f'--lora {path}: the strength after the colon, {strength!r}, must be '
                            'a number (FILE:STRENGTH, e.g. my_style.safetensors:0.8).')
        raise UserError(f'--lora: {path} {not_a_file(path)}.')
    state, meta = read_safetensors(path)
    if meta.get('format') != FORMAT:
        raise UserError(f'--lora: {path} is not a ccld LoRA adapter (export_model.py writes one '
                        'from the checkpoint of a --lora-rank run).')
    if meta.get('format_version') != FORMAT_VERSION:
        raise UserError(f'--lora: {path} is an adapter of format version '
                        f'{meta.get("format_version")}; this ccld reads version '
                        f'{FORMAT_VERSION}: update ccld.')
    return Adapter(int(meta['rank']), float(meta['alpha']), meta['targets'].split(','),
                   meta['base'], meta['base_sha256'],
                   (int(meta['base_channels']),
                    [int(m) for m in meta['channel_multipliers'].split(',')]),
                   {k: v.float() for k, v in state.items()},
                   {key: exports.PARSERS.get(key, str)(value) for key, value in meta.items()})


def apply(model, adapters):
    """Puts (Adapter, strength) pairs on `model` without merging them, each scaled by its
    strength (0: the base's output), all active at once; the model stays frozen."""
    _peft()
    from peft.functional import set_adapter
    from peft.tuners.lora import LoraLayer
    names = []
    for i, (adapter, strength) in enumerate(adapters):
        name = f'lora{i}'
        add_adapter(model, adapter.rank, adapter.alpha, adapter.targets, name)
        load_adapter_state(model, adapter.state, name, adapter.base)
        for module in model.modules():
            if isinstance(module, LoraLayer):
                module.set_scale(name, strength)
        names.append(name)
    if names:
        set_adapter(model, names, inference_mode=True)
    return model.requires_grad_(False)

"""Model exports: a diffusion model's EMA weights alone, as one .safetensors file whose
metadata says what sampling and finetuning need (widths, autoencoder scale, image size,
which autoencoder and CLOOB). It holds no optimizer state and no second copy of the
weights, so a 557M model is ~1.1 GB in fp16 against ~9 GB for its training checkpoint.
"""

import json
import struct

import torch

from .. import software_version
from ..errors import UserError
from ..files import atomic_write
from .unet import infer_widths

FORMAT = 'ccld-diffusion-model'
FORMAT_VERSION = '1'
DTYPES = {'fp16': torch.float16, 'fp32': torch.float32}
# What an export passes on from its checkpoint's 'ccld' record when it is there (a
# distilled student's teacher, step count and guidance range, the file a finetune started
# from and the training set included).
CARRIED = ('image_size', 'autoencoder', 'autoencoder_sha256', 'autoencoder_encoder_sha256',
           'cloob_checkpoint', 'cloob_checkpoint_sha256', 'step', 'teacher', 'teacher_sha256',
           'student_steps', 'guidance_range', 'finetuned_from', 'finetuned_from_sha256',
           'train_set', 'train_images')
# safetensors metadata is str -> str: how the fields that are not strings read back.
PARSERS = {'base_channels': int, 'channel_multipliers': lambda s: [int(m) for m in s.split(',')],
           'autoencoder_scale': float, 'image_size': int, 'step': int, 'student_steps': int,
           'guidance_range': lambda s: [float(w) for w in s.split(',')], 'train_images': int,
           'lora_rank': int, 'lora_alpha': float}


def to_metadata(record):
    return {key: ','.join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
            for key, value in record.items() if value is not None}


def read_record(metadata, path):
    """The record of an export from its safetensors metadata; {} for other safetensors."""
    if metadata.get('format') != FORMAT:
        return {}
    if metadata.get('format_version') != FORMAT_VERSION:
        raise UserError(f'{path} is a ccld model export of format version '
                        f'{metadata.get("format_version")}; this ccld reads version '
                        f'{FORMAT_VERSION}: update ccld.')
    return {key: PARSERS.get(key, str)(value) for key, value in metadata.items()}


def export(ckpt, path, dtype='fp16'):
    """Writes a DiffusionCheckpoint's EMA weights to `path` atomically, floating-point
    tensors in `dtype`; returns the record written as metadata.

    The autoencoder scale stays fp32 (fp16 would round 8.0779 to 8.0781, and every
    latent with it) and is also in the metadata.
    """
    if ckpt.autoencoder_scale is None:
        raise UserError(f'{path}: the checkpoint records no autoencoder scale, which sampling '
                        'needs; export one that was trained with --autoencoder-scale.')
    state = dict(ckpt.model_ema, autoencoder_scale=torch.tensor(ckpt.autoencoder_scale))

    def dtype_of(key, value):
        return DTYPES[dtype] if value.is_floating_point() and key != 'autoencoder_scale' \
            else value.dtype

    base, mults = infer_widths(state, ckpt.record.get('channel_multipliers', (4, 4, 8, 8)))
    record = {key: ckpt.record.get(key) for key in CARRIED}
    lora = ckpt.record.get('lora')
    if lora:  # a LoRA finetune folded into its base (export_model.py --merge)
        record.update(lora_rank=lora['rank'], lora_alpha=lora['alpha'], lora_base=lora['base'],
                      lora_base_sha256=lora['base_sha256'])
    record.update(format=FORMAT, format_version=FORMAT_VERSION, dtype=dtype,
                  base_channels=base, channel_multipliers=mults,
                  autoencoder_scale=ckpt.autoencoder_scale,
                  step=ckpt.raw.get('global_step', record['step']),
                  software=f'ccld {software_version()}')
    with atomic_write(path) as f:
        write_safetensors(f, state, to_metadata(record), dtype_of)
    return record


# safetensors' names of the dtypes, in the order of its Dtype enum (which orders the data).
SAFETENSORS_DTYPES = {torch.bool: 'BOOL', torch.uint8: 'U8', torch.int8: 'I8',
                      torch.int16: 'I16', torch.float16: 'F16', torch.bfloat16: 'BF16',
                      torch.int32: 'I32', torch.float32: 'F32', torch.float64: 'F64',
                      torch.int64: 'I64'}
_DTYPE_ORDER = list(SAFETENSORS_DTYPES)


def write_safetensors(f, tensors, metadata, dtype_of):
    """Writes `tensors` to the file object `f` as safetensors.torch.save would (the same
    bytes but for the order of the metadata, which safetensors takes from a hash map),
    each tensor turned into dtype_of(key, tensor) as it is written.

    safetensors' own writers need every tensor, converted, in memory at once (and save()
    a second copy as bytes); this holds one converted tensor at a time, so an export of a
    mapped checkpoint takes little memory beyond the checkpoint's pages.
    """
    dtypes = {key: dtype_of(key, value) for key, value in tensors.items()}
    order = sorted(tensors, key=lambda key: (-_DTYPE_ORDER.index(dtypes[key]), key))
    header, offset = {'__metadata__': metadata} if metadata else {}, 0
    for key in order:
        size = tensors[key].numel() * dtypes[key].itemsize
        header[key] = {'dtype': SAFETENSORS_DTYPES[dtypes[key]],
                       'shape': list(tensors[key].shape), 'data_offsets': [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(',', ':'), ensure_ascii=False).encode()
    encoded += b' ' * (-len(encoded) % 8)
    f.write(struct.pack('<Q', len(encoded)) + encoded)
    for key in order:
        value = tensors[key].detach().to('cpu', dtypes[key]).contiguous()
        f.write(value.reshape(-1).view(torch.uint8).numpy().data if value.numel() else b'')

"""What a training run's model states take on each device, counted from the tensors.

The states are the trained model's parameters (and buffers), their gradients, the
optimizer's state, the EMA copy (with the CPU EMA's copy buffers) and the frozen models.
Gradients and optimizer state are made by the first step; before it they are counted
per parameter as they will be allocated (exact for AdamW and 8-bit AdamW), after it from
the tensors themselves.
"""

import os
import warnings

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info

from .optimizers import expected_state_bytes

ROWS = ('parameters', 'gradients', 'optimizer state', 'EMA', 'frozen models')


def tensor_bytes(tensors):
    """{device: bytes} of `tensors`, each storage counted once (optimizers share some)."""
    total, seen = {}, set()
    for t in tensors:
        if t is None or t.device.type == 'meta':
            continue
        key = (str(t.device), t.untyped_storage().data_ptr())
        if key in seen and t.numel():
            continue
        seen.add(key)
        total[str(t.device)] = total.get(str(t.device), 0) + t.numel() * t.element_size()
    return total


def module_tensors(module):
    return [*module.parameters(), *module.buffers()]


def optimizer_tensors(optimizer):
    return [v for state in optimizer.state.values() for v in state.values()
            if isinstance(v, torch.Tensor)]


def model_state_bytes(module, optimizer, gradients=None):
    """{row: {device: bytes}} for a LightningDiffusion `module` and its optimizer, from
    the tensors there are now; `gradients` ({device: bytes}, counted from the gradients
    when they last existed) else those of the trainable parameters, and the optimizer's
    state, when it has none yet, as it will be allocated (None if unknown)."""
    trainable = [p for p in module.model.parameters() if p.requires_grad]
    if gradients is None:
        gradients = {}
        for p in trainable:
            gradients[str(p.device)] = gradients.get(str(p.device), 0) + \
                p.numel() * p.element_size()
    optimizer_state = tensor_bytes(optimizer_tensors(optimizer)) if optimizer.state else \
        expected_state_bytes(optimizer)
    shared = {t.untyped_storage().data_ptr() for t in module_tensors(module.model)}
    ema = tensor_bytes([t for t in module_tensors(module.model_ema)
                        if t.untyped_storage().data_ptr() not in shared])
    if module.offloaded_ema is not None:
        ema['cpu'] = ema.get('cpu', 0) + module.offloaded_ema.nbytes()
    frozen = [t for name in module.frozen for t in module_tensors(getattr(module, name))]
    return {'parameters': tensor_bytes(module_tensors(module.model)), 'gradients': gradients,
            'optimizer state': optimizer_state, 'EMA': ema, 'frozen models': tensor_bytes(frozen)}


def totals(states):
    """{device: bytes} of all the rows together."""
    total = {}
    for row in states.values():
        for device, n in (row or {}).items():
            total[device] = total.get(device, 0) + n
    return total


def device_memory(device):
    """A device's memory in bytes (a CPU's: the machine's RAM), or None if unknown."""
    device = torch.device(device)
    if device.type == 'cuda':
        return torch.cuda.get_device_properties(device).total_memory
    if device.type == 'cpu':
        return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
    return None


def gb(n):
    return '-' if n is None else f'{n / 1e9:.3f}'


def table(states, heading):
    """The rows, a total and each device's memory, in GB (10^9 bytes), a column a device."""
    total = totals(states)
    devices = sorted(total, key=lambda d: (d == 'cpu', d))
    lines = [heading, f'  {"GB":<16}' + ''.join(f'{d:>12}' for d in devices)]
    for name, row in [*states.items(), ('total', total)]:
        lines.append(f'  {name:<16}' + ''.join(
            f'{gb(None if row is None else row.get(d, 0)):>12}' for d in devices))
    memory = ''.join(f'{gb(device_memory(d)):>12}' for d in devices)
    lines.append(f'  {"device memory":<16}{memory}')
    if 'cpu' in devices:
        lines.append("  (cpu's device memory: all of this machine's RAM, shared with every "
                     'process on it)')
    return '\n'.join(lines)


def over_budget(states):
    """[(device, bytes of the states, bytes of the device)] where the states alone do not fit."""
    return [(d, n, device_memory(d)) for d, n in totals(states).items()
            if device_memory(d) is not None and n > device_memory(d)]


def largest_size(image_size, buckets=None):
    """(width, height) of the most pixels a step trains on, whose activations take the
    most memory: under --aspect-buckets the bucket of most pixels (of two, the wider),
    else the square."""
    if not buckets:
        return image_size, image_size
    return tuple(max(buckets, key=lambda b: (b[0] * b[1], b[0])))


def largest_batch(batch_size, latent_shape, size, bucketed):
    """What the table says of the largest batch: its latents' shape and its size."""
    shape = ' x '.join(str(n) for n in (batch_size, *latent_shape))
    return f'{shape} latents ({size[0]}x{size[1]} px{", the largest bucket" if bucketed else ""})'


class MemoryReport(pl.Callback):
    """Prints the model states of each device when training starts (warning when they
    exceed a device's memory, before the first step) and again, counted from the
    tensors, after the first optimizer step; `batch` (largest_batch) is the largest batch
    a step trains on, whose activations come on top."""

    def __init__(self, batch=None):
        self.batch = batch
        self.gradients = None
        self.printed_after_step = False
        self.at_start = self.after_step = None

    def on_train_start(self, trainer, module):
        optimizer = trainer.optimizers[0]
        self.at_start = model_state_bytes(module, optimizer)
        how = 'counted from the tensors' if optimizer.state else \
            'counted per trainable parameter as the first step will allocate it'
        rank_zero_info(table(self.at_start, 'Model states at the start (parameters, EMA and '
                                            'frozen models counted from the tensors; gradients '
                                            f'and optimizer state {how}):') +
                       (f'\n  activations come on top, of batches of up to {self.batch}'
                        if self.batch else ''))
        before = f'the activations of batches of up to {self.batch}' if self.batch else \
            'any activation'
        if trainer.is_global_zero:
            for device, n, memory in over_budget(self.at_start):
                warnings.warn(f'the model states alone take {n / 1e9:.1f} GB on {device}, '
                              f'which has {memory / 1e9:.1f} GB, before {before}: '
                              'try --optimizer adamw8bit, --ema-device cpu, '
                              '--gradient-checkpointing or a smaller --batch-size.')

    def on_before_optimizer_step(self, trainer, module, optimizer):
        if self.gradients is None:
            self.gradients = tensor_bytes([p.grad for p in module.model.parameters()])

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if self.printed_after_step or self.gradients is None:
            return
        self.printed_after_step = True
        self.after_step = model_state_bytes(module, trainer.optimizers[0], self.gradients)
        rank_zero_info(table(self.after_step, 'Model states after the first optimizer step '
                                              '(counted from the tensors):'))

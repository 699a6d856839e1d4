"""The optimizers --optimizer names, and the memory their state takes.

adamw is torch's AdamW, two moments in the parameters' dtype. adamw8bit is bitsandbytes'
block-wise 8-bit AdamW: the two moments as uint8 codes with one fp32 scale (absmax) per
block of 256 values (tensors under 4096 values keep fp32 moments), a quarter of the
memory at much the same result.
"""

import math

import torch

OPTIMIZERS = ('adamw', 'adamw8bit')
WEIGHT_DECAY = 0.01
# bitsandbytes' 8-bit optimizers: block size, the smallest tensor with 8-bit state (its
# min_8bit_size default) and the two 256-entry fp32 code books shared by every tensor.
BLOCK = 256
MIN_8BIT_SIZE = 4096
QMAP_BYTES = 2 * 256 * 4
BNB_KERNEL = 'bitsandbytes::optimizer_update_8bit_blockwise'


def adamw8bit_unavailable(device_type):
    """Why bitsandbytes' 8-bit AdamW cannot step on this device type ('cpu', 'cuda', ...),
    or None when it can: the package imports, has its update kernel for the device, and
    (on a GPU) its native library loaded."""
    try:
        import bitsandbytes  # noqa: F401
        from bitsandbytes.cextension import ErrorHandlerMockBNBNativeLibrary, lib
    except ImportError as e:
        return f'bitsandbytes is not installed ({e}); pip install bitsandbytes'
    key = {'cuda': 'CUDA', 'cpu': 'CPU', 'mps': 'MPS', 'xpu': 'XPU'}.get(device_type, device_type)
    if not torch._C._dispatch_has_kernel_for_dispatch_key(BNB_KERNEL, key):
        return f'bitsandbytes has no 8-bit AdamW for {device_type} devices'
    if device_type == 'cuda' and isinstance(lib, ErrorHandlerMockBNBNativeLibrary):
        return 'bitsandbytes could not load its CUDA library (python -m bitsandbytes says why)'
    return None


def make_optimizer(name, params, lr, fused=None):
    """The --optimizer `name` over `params`, with the original's weight decay."""
    if name == 'adamw8bit':
        import bitsandbytes
        return bitsandbytes.optim.AdamW8bit(params, lr=lr, weight_decay=WEIGHT_DECAY)
    return torch.optim.AdamW(params, lr=lr, weight_decay=WEIGHT_DECAY, fused=fused)


def expected_state_bytes(optimizer):
    """{device: bytes} that `optimizer` (AdamW or AdamW8bit) will hold once it has stepped
    (its state is made in the first step), counted per trainable parameter as each
    allocates it; None for another optimizer. torch's AdamW keeps two moments in the
    parameter's dtype and its step count as an fp32 scalar, on the parameter's device when
    fused or capturable, else on the CPU."""
    kind = type(optimizer).__name__
    if kind not in ('AdamW', 'AdamW8bit'):
        return None
    total = {}

    def add(device, n):
        total[str(device)] = total.get(str(device), 0) + n
    step_on_device = optimizer.defaults.get('fused') or optimizer.defaults.get('capturable')
    code_books = set()
    for group in optimizer.param_groups:
        for p in group['params']:
            if not p.requires_grad:  # (never has a gradient: no state is made for it)
                continue
            n = p.numel()
            if kind == 'AdamW':
                add(p.device, 2 * n * p.element_size())
                add(p.device if step_on_device else 'cpu', 4)
            elif n < MIN_8BIT_SIZE:
                add(p.device, 2 * n * 4)
            else:
                add(p.device, 2 * n + 2 * 4 * math.ceil(n / BLOCK))
                code_books.add(str(p.device))
    for device in code_books:
        add(device, QMAP_BYTES)
    return total

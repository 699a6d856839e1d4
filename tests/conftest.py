import math
import zlib
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / 'fixtures'


def fill_value(name, shape):
    """The deterministic fill rule of SPEC section 0, for tensors of ndim >= 1."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    shape = list(shape)
    if len(shape) >= 2:
        return torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))
    return 0.1 * torch.randn(shape, generator=g)


def fill_state_dict(module, scalars=None):
    """Fills every tensor of a module's state dict by the fill rule, in place."""
    scalars = scalars or {}
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if tensor.ndim == 0:
                tensor.fill_(scalars[name])
            else:
                tensor.copy_(fill_value(name, tensor.shape))
    return module


@pytest.fixture
def load_fixture():
    return lambda name: torch.load(FIXTURES / name, weights_only=False)

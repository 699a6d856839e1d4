import fcntl
import math
import os
import zlib
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / 'fixtures'

# The tests run tiny models, for which one intra-op thread is about as fast as two on a
# quiet machine; on a loaded one, OpenMP threads spinning against each other make a tiny
# U-Net forward ~100x slower. The CLI subprocesses inherit the variable.
os.environ.setdefault('OMP_NUM_THREADS', '1')
torch.set_num_threads(int(os.environ['OMP_NUM_THREADS']))


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


def made_once(tmp_path_factory, name, make):
    """make()'s value, made once in a test run and shared by pytest-xdist's workers through
    a file (their base temporary directories share a parent of this run's own)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get('PYTEST_XDIST_WORKER'):
        root = root.parent
    path = root / f'{name}.pt'
    with open(root / f'{name}.lock', 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            torch.save(make(), path)
    return torch.load(path, weights_only=False)


@pytest.fixture(scope='session')
def learned_from_latents(tmp_path_factory):
    """tests/learning.py's training on the latents themselves (seed 0): one run shared by
    the learning tests, the distillation test that takes it as its teacher and the LoRA
    test that finetunes it."""
    import learning

    def train():
        data, embeds = learning.problem()
        run = learning.train(learning.direct_batches(data, embeds))
        run.data, run.embeds = data, embeds
        return run
    return made_once(tmp_path_factory, 'learned_from_latents', train)


@pytest.fixture
def load_fixture():
    return lambda name: torch.load(FIXTURES / name, weights_only=False)

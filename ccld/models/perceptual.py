"""LPIPS, the perceptual distance of the autoencoder loss and of its validation, and the
files its weights come from.

The network is the lpips package's VGG16 LPIPS (the same network, input scaling and
linear layers as taming-transformers', whose vgg.pth the package ships), built without
weights and loaded from one file, which may be:

- a CompVis autoencoder checkpoint holding `loss.perceptual_loss.*` (kl-f8's model.ckpt
  does: CompVis saved the loss with the model);
- an LPIPS state dict (`net.slice*`, `lin*`: the lpips package's or taming's format);
- torchvision's VGG16 ImageNet weights (vgg16-397923af.pth), with the linear layers the
  lpips package ships.

Without --lpips-weights the starting autoencoder's checkpoint is used when it holds
them, else torchvision's file in the torch hub cache, downloaded there on first use.
"""

import warnings
from pathlib import Path

import torch

from ..errors import UserError
from ..files import not_a_file

VGG16_FILE = 'vgg16-397923af.pth'
VGG16_URL = f'https://download.pytorch.org/models/{VGG16_FILE}'
COMPVIS_PREFIX = 'loss.perceptual_loss.'


def build_lpips(device=None):
    """LPIPS (VGG16) with random weights and no download; on the meta device (no memory,
    no time spent on an initialisation that loading replaces) with device='meta'."""
    import lpips
    with warnings.catch_warnings(), torch.device(device or 'cpu'):
        warnings.simplefilter('ignore')  # torchvision's notes on its `pretrained` argument
        model = lpips.LPIPS(net='vgg', pretrained=False, pnet_rand=True, verbose=False)
    return model.to(device or 'cpu')  # (its scaling constants are made on the CPU)


def scaling_constants():
    """The input shift and scale of LPIPS, constants of the method."""
    import lpips
    return {f'scaling_layer.{k}': v for k, v in lpips.lpips.ScalingLayer().state_dict().items()}


def bundled_linear_layers():
    """The LPIPS linear layers that ship with the lpips package (v0.1, VGG)."""
    import lpips
    path = Path(lpips.__file__).parent / 'weights' / 'v0.1' / 'vgg.pth'
    return torch.load(path, map_location='cpu', weights_only=True)


def holds_lpips(state):
    """Whether a state dict holds an LPIPS VGG trunk, in any of the accepted forms."""
    return any(k.startswith((f'{COMPVIS_PREFIX}net.', 'net.slice1.', 'features.0.'))
               for k in state)


def source_keys(key):
    """Where the LPIPS state key `key` may be found in a file, in order of preference."""
    parts = key.split('.')
    if parts[0] == 'net':  # net.sliceN.I.weight is VGG16's features.I.weight
        return [key, f'features.{".".join(parts[2:])}']
    if parts[0] == 'lins':  # lins.N is linN: one module under two names
        return [key, f'lin{parts[1]}.{".".join(parts[2:])}']
    if parts[0].startswith('lin'):
        return [key, f'lins.{parts[0][3:]}.{".".join(parts[1:])}']
    return [key]


def lpips_state(state, path):
    """A complete state dict for `build_lpips()` from the tensors of a weights file."""
    if any(k.startswith(COMPVIS_PREFIX) for k in state):
        state = {k[len(COMPVIS_PREFIX):]: v for k, v in state.items()
                 if k.startswith(COMPVIS_PREFIX)}
    if not holds_lpips(state):
        raise UserError(f'--lpips-weights: {path} holds no LPIPS VGG16 weights (neither '
                        f'{COMPVIS_PREFIX}*, net.slice*.* nor torchvision\'s features.*); pass '
                        f'{VGG16_FILE} from {VGG16_URL}.')
    fallbacks = {}  # the shipped linear layers, and the scaling constants
    full = {}
    for key in build_lpips('meta').state_dict():
        found = next((state[k] for k in source_keys(key) if k in state), None)
        if found is None and not fallbacks:
            fallbacks = {**bundled_linear_layers(), **scaling_constants()}
        if found is None:
            found = next((fallbacks[k] for k in source_keys(key) if k in fallbacks), None)
        if found is None:
            raise UserError(f'--lpips-weights: {path} lacks the LPIPS weight {key}; pass a '
                            f'complete file ({VGG16_FILE} from {VGG16_URL}).')
        full[key] = found
    return full


def load_lpips(path, device='cpu'):
    """LPIPS with its weights from `path` (any of the kinds above), frozen, in eval mode."""
    from .autoencoder import read_weights
    state = lpips_state(read_weights(path, 'LPIPS weights'), path)
    model = build_lpips('meta').to_empty(device='cpu')
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        reason = str(e).strip().splitlines()[1] if '\n' in str(e) else str(e)
        raise UserError(f'--lpips-weights: {path} does not fit LPIPS VGG16 ({reason.strip()}).')
    return model.eval().requires_grad_(False).to(device)


def hub_file():
    """Where torchvision keeps (and LPIPS looks for) the VGG16 ImageNet weights."""
    return Path(torch.hub.get_dir()) / 'checkpoints' / VGG16_FILE


def fetch_vgg16():
    """torchvision's VGG16 weights in the torch hub cache, downloaded if not there yet;
    offline, a one-line UserError saying what to fetch and where to put it."""
    dest = hub_file()
    if dest.is_file():
        return dest
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(VGG16_URL, str(dest), hash_prefix=VGG16_FILE[6:14])
    except (OSError, RuntimeError) as e:
        reason = str(getattr(e, 'reason', None) or e).strip().splitlines()
        raise UserError(f'LPIPS needs torchvision\'s VGG16 ImageNet weights and they could not '
                        f'be downloaded ({reason[0] if reason else type(e).__name__}): fetch '
                        f'{VGG16_URL} into {dest.parent}/, or pass it (or a CompVis '
                        'autoencoder checkpoint holding loss.perceptual_loss.*) as '
                        '--lpips-weights FILE; --perceptual-weight 0 trains without LPIPS.'
                        ) from None
    return dest


def find_weights(lpips_weights, autoencoder_checkpoint):
    """The file LPIPS loads from: --lpips-weights, else the starting autoencoder's
    checkpoint when it holds LPIPS, else torchvision's VGG16 (fetched if need be)."""
    from .autoencoder import read_weights
    if lpips_weights is not None:
        if not_a_file(lpips_weights):
            raise UserError(f'--lpips-weights: {lpips_weights} {not_a_file(lpips_weights)}; pass '
                            f'{VGG16_FILE} (from {VGG16_URL}) or a CompVis autoencoder '
                            'checkpoint holding loss.perceptual_loss.*.')
        return Path(lpips_weights)
    if holds_lpips(read_weights(autoencoder_checkpoint)):
        return Path(autoencoder_checkpoint)
    return fetch_vgg16()

"""The networks whose features the Frechet distance and KID compare.

- inception: torch-fidelity's InceptionV3 ('inception-v3-compat'), the network of the
  original TensorFlow FID with its weights and its bilinear resize to 299 px, whose
  values match the reference implementation's; so numbers compare with papers'. Its
  weights (95 MB) download into the torch hub cache on first use; `--inception-weights`
  names a copy fetched by hand.
- cloob: the image tower of the CLOOB the user samples with (512-d embeddings); no
  download, and closer to what the model was trained to follow than ImageNet features.

Both take 8-bit images [n, 3, S, S], as the PNGs hold them (generated images are read
back from their files, reference images are brought to the same size and 8 bits), and
return float64 features [n, d].
"""

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError, reason as error_reason
from ..files import not_a_file, sha256

FEATURES = ('inception', 'cloob')
INCEPTION_URL = ('https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/'
                 'weights-inception-2015-12-05-6726825d.pth')  # torch-fidelity's own
INCEPTION_NAME = 'inception-v3-compat'
INCEPTION_FEATURE = '2048'  # the pool features FID is defined on


@dataclass
class FeatureNetwork:
    """A feature network: `identity` names it in reports and cache keys."""
    identity: dict
    embed: object  # uint8 [n, 3, S, S] on the CPU -> float64 [n, d] on the CPU

    @torch.no_grad()
    def __call__(self, images):
        return self.embed(images).double().cpu()


def inception_weights(path=None):
    """The InceptionV3 weights file: `path` (--inception-weights) checked to hold them,
    or torch-fidelity's file in the torch hub cache, downloaded there if missing.
    UserError, in one line saying what to fetch, when that fails (offline)."""
    if path is None:
        path = Path(torch.hub.get_dir()) / 'checkpoints' / INCEPTION_URL.rsplit('/', 1)[-1]
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            try:  # to a temp file beside it, renamed when complete
                torch.hub.download_url_to_file(INCEPTION_URL, str(path), progress=True)
            except OSError as e:  # URLError, HTTPError, refused, no route...
                reason = str(getattr(e, 'reason', e)).strip() or type(e).__name__
                raise UserError(f'--features inception: could not download the Inception '
                                f'weights ({reason}); fetch {INCEPTION_URL} by hand and pass '
                                f'it with --inception-weights PATH, or use --features '
                                'cloob.') from None
        return path
    path = Path(path)
    if not_a_file(path):
        raise UserError(f'--inception-weights {path} {not_a_file(path)}; pass torch-fidelity\'s '
                        f'{INCEPTION_URL.rsplit("/", 1)[-1]} ({INCEPTION_URL}).')
    return path


def check_inception_weights(path):
    """UserError unless `path` holds the InceptionV3 weights, read without running code
    in the file and matched key for key against the network on the meta device."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    try:
        torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated, not torch.save's format, code in it
        reason = error_reason(e)
        raise UserError(f'--inception-weights {path}: cannot read it as weights ({reason}); '
                        f'pass torch-fidelity\'s {INCEPTION_URL.rsplit("/", 1)[-1]}.') from None
    try:
        with torch.device('meta'), warnings.catch_warnings():
            warnings.simplefilter('ignore')  # loading into meta tensors is a no-op, as meant
            FeatureExtractorInceptionV3(INCEPTION_NAME, [INCEPTION_FEATURE],
                                        feature_extractor_weights_path=str(path))
    except RuntimeError as e:
        what = ' '.join(str(e).split())[:200]
        raise UserError(f'--inception-weights {path} does not hold torch-fidelity\'s '
                        f'InceptionV3 weights ({what}).') from None


def inception(weights, device):
    """torch-fidelity's InceptionV3 from the weights file, pool features (2048-d)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    net = FeatureExtractorInceptionV3(INCEPTION_NAME, [INCEPTION_FEATURE],
                                      feature_extractor_weights_path=str(weights)).to(device)
    return FeatureNetwork(
        {'network': INCEPTION_NAME, 'feature': INCEPTION_FEATURE, 'sha256': sha256(weights)},
        lambda images: net(images.to(device))[0])


def cloob_image_tower(cloob, description):
    """The image embeddings of a loaded CLOOBEmbedder; `description` identifies its file."""
    device = next(cloob.parameters()).device
    return FeatureNetwork({'network': 'cloob-image-tower', **description},
                          lambda images: cloob.embed_images(images.to(device).float() / 255))

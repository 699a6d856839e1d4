"""ccld.latents: images in [0, 1] <-> the diffusion model's scaled latents (SPEC 2 and 4).

The expected values come from the golden autoencoder fixture and from a stub whose
posterior is its input, never from ccld.latents itself.
"""

import pytest
import torch

from ccld.models import latents
from conftest import FIXTURES, fill_value
from ldm.models.autoencoder import AutoencoderKL

SCALE = 4.0


class Posterior:
    """A posterior with no spread: every sample is the mean."""

    def __init__(self, mean):
        self.mean = mean

    def sample(self, generator=None):
        return self.mean.clone()

    def mode(self):
        return self.mean.clone()


class IdentityAutoencoder:
    """encode's posterior is its input and decode returns its input, so what
    latents.encode/decode do around the autoencoder shows in closed form."""

    def encode(self, x):
        return Posterior(x)

    def decode(self, z):
        return z.clone()


@pytest.fixture(scope='module')
def golden():
    return torch.load(FIXTURES / 'autoencoder_golden.pt', weights_only=True)


@pytest.fixture(scope='module')
def golden_autoencoder(golden):
    model = AutoencoderKL(**golden['config']['model']['params'])
    model.load_state_dict({k: fill_value(k, v.shape) for k, v in model.state_dict().items()})
    return model.eval().requires_grad_(False)


def test_encode_maps_images_to_minus_one_one_and_divides_by_the_scale():
    images = torch.rand(2, 3, 8, 8)
    z = latents.encode(IdentityAutoencoder(), images, SCALE)
    torch.testing.assert_close(z, (images * 2 - 1) / SCALE, rtol=0, atol=1e-6)


def test_decode_multiplies_by_the_scale_and_maps_back_to_zero_one():
    z = torch.rand(2, 3, 8, 8) * 0.4 - 0.2  # decodes to (0.1, 0.9): nothing is clamped
    images = latents.decode(IdentityAutoencoder(), z, SCALE)
    torch.testing.assert_close(images, (z * SCALE + 1) / 2, rtol=0, atol=1e-6)


def test_decode_clamps_to_zero_one():
    z = torch.tensor([-1.0, -0.3, 0.0, 0.3, 1.0]).view(1, 1, 1, 5)
    images = latents.decode(IdentityAutoencoder(), z, 1.0)
    torch.testing.assert_close(images, torch.tensor([0.0, 0.35, 0.5, 0.65, 1.0]).view(1, 1, 1, 5))


def test_encode_is_a_posterior_sample_of_the_golden_autoencoder_over_the_scale(
        golden, golden_autoencoder):
    """SPEC 2: x0 = AE.encode(img * 2 - 1).sample() / scale, with the golden posterior
    (its images are in [-1, 1]; the ones given to encode are in [0, 1])."""
    images = (golden['images'] + 1) / 2
    z = latents.encode(golden_autoencoder, images, SCALE, torch.Generator().manual_seed(3))
    noise = torch.randn(golden['mean'].shape, generator=torch.Generator().manual_seed(3))
    expected = (golden['mean'] + torch.exp(golden['logvar'] / 2) * noise) / SCALE
    torch.testing.assert_close(z, expected, rtol=1e-4, atol=1e-5)


def test_decode_of_the_golden_latents_gives_the_golden_images(golden, golden_autoencoder):
    images = latents.decode(golden_autoencoder, golden['mean'] / SCALE, SCALE)
    expected = ((golden['decoded_mean'] + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(images, expected, rtol=1e-4, atol=1e-5)

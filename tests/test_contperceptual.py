"""latent-diffusion's KL autoencoder loss (ldm.modules.losses.LPIPSWithDiscriminator) and
the LPIPS weights it runs with (ccld.models.perceptual), against hand computations and
independent ones written here."""

import math

import pytest
import torch
import torch.nn.functional as F

from ccld.errors import UserError
from ccld.models import perceptual
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.losses import LPIPSWithDiscriminator


class MeanSquare(torch.nn.Module):
    """A stand-in perceptual distance with a closed form: mean squared difference per image."""

    def forward(self, a, b):
        return (a - b).square().mean(dim=(1, 2, 3), keepdim=True)


def posterior(mean, logvar):
    return DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1))


def test_kl_is_zero_for_a_standard_normal_posterior_and_the_closed_form_otherwise():
    zeros = torch.zeros(2, 4, 3, 3)
    assert torch.equal(posterior(zeros, zeros).kl(), torch.zeros(2))
    torch.manual_seed(0)
    mean, logvar = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    q = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    expected = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0))
    torch.testing.assert_close(posterior(mean, logvar).kl(), expected.sum(dim=(1, 2, 3)))


def test_the_adaptive_weight_is_the_ratio_of_gradient_norms_at_the_last_layer():
    loss = LPIPSWithDiscriminator(disc_start=0, disc_weight=0.5, perceptual_weight=0)
    w = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    a, b = torch.tensor([[3.0, 0.0], [0.0, 4.0]]), torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    nll, g_loss = (w * a).sum(), (w * w * b).sum()  # gradients: a (norm 5), 2wb (norm 4)
    weight = loss.adaptive_weight(nll, g_loss, w)
    assert weight.item() == pytest.approx(0.5 * 5 / (4 + 1e-4))
    # Clamped to 1e4 when the adversarial gradient vanishes.
    assert loss.adaptive_weight(nll, (w * 0).sum(), w).item() == pytest.approx(0.5 * 1e4)


def known_batch():
    torch.manual_seed(1)
    inputs = torch.rand(2, 3, 32, 32) * 2 - 1
    reconstructions = (inputs + 0.1 * torch.randn_like(inputs)).requires_grad_()
    mean, logvar = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4) * 0.1
    return inputs, reconstructions, posterior(mean, logvar)


def test_before_disc_start_the_loss_is_the_nll_and_kl_and_the_discriminator_is_not_run():
    loss = LPIPSWithDiscriminator(disc_start=10, kl_weight=1e-3, perceptual_weight=0.25,
                                  logvar_init=0.3, perceptual_loss=MeanSquare())
    loss.discriminator.forward = lambda x: pytest.fail('the discriminator ran before disc_start')
    inputs, reconstructions, q = known_batch()
    value, log = loss.generator_loss(inputs, reconstructions, q, step=9, last_layer=None)
    # Independently: per pixel |x - x'| + 0.25 * the image's mean squared difference, over
    # exp(0.3), plus 0.3, summed per image and averaged; KL in closed form, summed per image.
    per_image_ms = (inputs - reconstructions).square().mean(dim=(1, 2, 3))
    rec = (inputs - reconstructions).abs() + 0.25 * per_image_ms[:, None, None, None]
    nll = ((rec / math.exp(0.3) + 0.3).sum() / 2)
    kl = 0.5 * (q.mean ** 2 + q.logvar.exp() - 1 - q.logvar).sum() / 2
    torch.testing.assert_close(value, nll + 1e-3 * kl)
    torch.testing.assert_close(log['kl_loss'], kl)
    assert 'g_loss' not in log and 'd_weight' not in log


def test_from_disc_start_the_adversarial_term_joins_at_the_adaptive_weight():
    torch.manual_seed(2)
    loss = LPIPSWithDiscriminator(disc_start=5, kl_weight=1e-6, disc_weight=0.5,
                                  perceptual_weight=0)
    last_layer = torch.nn.Parameter(torch.randn(3, 3, 3, 3) * 0.1)
    inputs = torch.rand(2, 3, 32, 32) * 2 - 1
    reconstructions = F.conv2d(inputs, last_layer, padding=1)  # a one-layer "decoder"
    q = posterior(torch.zeros(2, 4, 4, 4), torch.zeros(2, 4, 4, 4))
    value, log = loss.generator_loss(inputs, reconstructions, q, step=5, last_layer=last_layer)
    nll = ((inputs - reconstructions).abs().sum() / 2)
    g_loss = -loss.discriminator(reconstructions).mean()
    nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    d_weight = 0.5 * nll_grad.norm() / (g_grad.norm() + 1e-4)
    torch.testing.assert_close(value, nll + d_weight * g_loss)
    torch.testing.assert_close(log['d_weight'], d_weight)


def test_the_discriminator_loss_is_the_hinge_loss_and_zero_before_disc_start():
    torch.manual_seed(3)
    loss = LPIPSWithDiscriminator(disc_start=4, perceptual_weight=0).eval()  # (BN: fixed stats)
    real, fake = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    value, log = loss.discriminator_loss(real, fake, step=4)
    lr, lf = loss.discriminator(real), loss.discriminator(fake)
    expected = 0.5 * (torch.relu(1 - lr).mean() + torch.relu(1 + lf).mean())
    torch.testing.assert_close(value, expected)
    assert loss.discriminator_loss(real, fake, step=3)[0].item() == 0


def test_the_discriminator_loss_trains_the_discriminator_alone():
    """Its backward reaches every discriminator weight and leaves the images alone: the
    decoder must not get the gradient of the discriminator's loss."""
    loss = LPIPSWithDiscriminator(disc_start=0, perceptual_weight=0)
    inputs, reconstructions, _ = known_batch()
    inputs.requires_grad_()
    value, _ = loss.discriminator_loss(inputs, reconstructions, step=0)
    value.backward()
    assert reconstructions.grad is None and inputs.grad is None
    assert all(p.grad is not None and p.grad.abs().max() > 0
               for p in loss.discriminator.parameters())


def random_lpips_state(seed=0):
    """Random LPIPS weights (the scaling layer's constants kept)."""
    g = torch.Generator().manual_seed(seed)
    state = {k: 0.05 * torch.randn(v.shape, generator=g)
             for k, v in perceptual.build_lpips('meta').state_dict().items()}
    for i in range(5):  # one module under two names
        state[f'lins.{i}.model.1.weight'] = state[f'lin{i}.model.1.weight']
    return dict(state, **perceptual.scaling_constants())


@pytest.fixture(scope='module')
def lpips_files(tmp_path_factory):
    """One set of random LPIPS weights in the three kinds of file accepted."""
    d = tmp_path_factory.mktemp('lpips')
    state = random_lpips_state()
    torch.save(state, d / 'lpips.pth')  # the lpips package's own format
    compvis = {f'loss.perceptual_loss.{k}': v for k, v in state.items()
               if not k.startswith('lins.')}  # (taming's LPIPS has no `lins` alias)
    torch.save({'state_dict': {'encoder.conv_in.weight': torch.zeros(1), **compvis}},
               d / 'compvis.ckpt')
    trunk = {f'features.{k.split(".", 2)[2]}': v for k, v in state.items()
             if k.startswith('net.')}
    torch.save(trunk, d / perceptual.VGG16_FILE)  # torchvision's VGG16 (its features)
    return d, state


def test_lpips_loads_from_each_kind_of_file_and_is_the_same_network(lpips_files):
    d, state = lpips_files
    torch.manual_seed(4)
    a, b = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    own, compvis = (perceptual.load_lpips(d / n) for n in ('lpips.pth', 'compvis.ckpt'))
    torch.testing.assert_close(own(a, b), compvis(a, b))
    for key, value in state.items():
        assert torch.equal(own.state_dict()[key], value), key
    # torchvision's file gives the trunk; the linear layers are those the lpips package ships.
    trunk = perceptual.load_lpips(d / perceptual.VGG16_FILE)
    shipped = perceptual.bundled_linear_layers()
    assert torch.equal(trunk.state_dict()['net.slice3.10.weight'], state['net.slice3.10.weight'])
    assert torch.equal(trunk.state_dict()['lin2.model.1.weight'], shipped['lin2.model.1.weight'])
    assert not any(p.requires_grad for p in trunk.parameters()) and not trunk.training


def test_a_file_without_lpips_weights_is_one_line(tmp_path):
    torch.save({'state_dict': {'encoder.conv_in.weight': torch.zeros(1)}}, tmp_path / 'ae.ckpt')
    with pytest.raises(UserError, match='holds no LPIPS VGG16 weights') as e:
        perceptual.load_lpips(tmp_path / 'ae.ckpt')
    assert '\n' not in str(e.value) and perceptual.VGG16_URL in str(e.value)

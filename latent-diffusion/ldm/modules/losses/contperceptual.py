"""The loss CompVis trained its KL autoencoders with, as their configs name it
(`ldm.modules.losses.LPIPSWithDiscriminator`).

The autoencoder's side is a Laplace-like negative log-likelihood of the reconstruction,
(|x - x'| + w_p * LPIPS(x, x')) / exp(logvar) + logvar summed over pixels, plus a small KL
term towards N(0, I); from `disc_start` on, a PatchGAN discriminator's hinge loss joins
it, weighted so that its gradient at the decoder's last layer is `disc_weight` times the
reconstruction's. The discriminator and its losses are taming-transformers'; LPIPS is
passed in (the caller owns where its weights come from, so nothing downloads here).
"""

import torch
from torch import nn
from taming.modules.discriminator.model import NLayerDiscriminator, weights_init
from taming.modules.losses.vqperceptual import adopt_weight, hinge_d_loss, vanilla_d_loss

DISC_LOSSES = {'hinge': hinge_d_loss, 'vanilla': vanilla_d_loss}


class LPIPSWithDiscriminator(nn.Module):
    """The parameters are CompVis' (so their configs' `lossconfig.params` build it), and
    `perceptual_loss`, a module mapping two image batches in [-1, 1] to one distance per
    image ([n, 1, 1, 1], as LPIPS does); it may be None when `perceptual_weight` is 0.
    `pixelloss_weight` is accepted and, as in CompVis' code, not used.
    """

    def __init__(self, disc_start, logvar_init=0.0, kl_weight=1.0, pixelloss_weight=1.0,
                 disc_num_layers=3, disc_in_channels=3, disc_factor=1.0, disc_weight=1.0,
                 perceptual_weight=1.0, use_actnorm=False, disc_conditional=False,
                 disc_loss='hinge', perceptual_loss=None):
        super().__init__()
        if disc_conditional:
            raise ValueError('a conditional discriminator is not supported')
        if disc_loss not in DISC_LOSSES:
            raise ValueError(f'disc_loss must be one of {", ".join(DISC_LOSSES)}, '
                             f'not {disc_loss!r}')
        if perceptual_weight > 0 and perceptual_loss is None:
            raise ValueError('perceptual_weight > 0 needs a perceptual_loss module')
        self.disc_start = disc_start
        self.kl_weight = kl_weight
        self.disc_factor = disc_factor
        self.disc_weight = disc_weight
        self.perceptual_weight = perceptual_weight
        self.perceptual_loss = perceptual_loss
        if perceptual_loss is not None:
            perceptual_loss.requires_grad_(False).eval()
        self.logvar = nn.Parameter(torch.full((), float(logvar_init)))
        self.discriminator = NLayerDiscriminator(input_nc=disc_in_channels,
                                                 n_layers=disc_num_layers,
                                                 use_actnorm=use_actnorm).apply(weights_init)
        self.disc_loss = DISC_LOSSES[disc_loss]

    def train(self, mode=True):
        super().train(mode)
        if self.perceptual_loss is not None:
            self.perceptual_loss.eval()  # a fixed metric: its dropout stays off
        return self

    def disc_factor_at(self, step):
        """The discriminator's weight at `step`: 0 before disc_start, then disc_factor."""
        return adopt_weight(self.disc_factor, step, threshold=self.disc_start)

    def reconstruction_loss(self, inputs, reconstructions):
        """Per pixel: |x - x'| plus the image's LPIPS distance times perceptual_weight."""
        loss = (inputs - reconstructions).abs()
        if self.perceptual_weight > 0:
            loss = loss + self.perceptual_weight * self.perceptual_loss(
                inputs.contiguous(), reconstructions.contiguous())
        return loss

    def nll(self, rec_loss):
        """The reconstruction's negative log-likelihood under the learned log-variance,
        summed over each image's pixels and averaged over the batch."""
        return (rec_loss / self.logvar.exp() + self.logvar).sum() / rec_loss.shape[0]

    def adaptive_weight(self, nll, g_loss, last_layer):
        """disc_weight times |grad nll| / |grad g_loss| at `last_layer` (the decoder's
        output convolution), so that the adversarial term pulls on the decoder as hard as
        the reconstruction does, whatever their scales."""
        nll_grad, = torch.autograd.grad(nll, last_layer, retain_graph=True)
        g_grad, = torch.autograd.grad(g_loss, last_layer, retain_graph=True)
        ratio = nll_grad.norm() / (g_grad.norm() + 1e-4)
        return ratio.clamp(0.0, 1e4).detach() * self.disc_weight

    def generator_loss(self, inputs, reconstructions, posterior, step, last_layer):
        """The autoencoder's loss and what to log. Before disc_start the discriminator is
        not run at all, so it neither shapes this loss nor sees the images."""
        rec_loss = self.reconstruction_loss(inputs, reconstructions)
        nll = self.nll(rec_loss)
        kl = posterior.kl().sum() / posterior.mean.shape[0]
        loss = nll + self.kl_weight * kl
        log = {'rec_loss': rec_loss.detach().mean(), 'nll_loss': nll.detach(),
               'kl_loss': kl.detach(), 'logvar': self.logvar.detach()}
        factor = self.disc_factor_at(step)
        if factor > 0:
            g_loss = -self.discriminator(reconstructions.contiguous()).mean()
            d_weight = self.adaptive_weight(nll, g_loss, last_layer)
            loss = loss + d_weight * factor * g_loss
            log.update(g_loss=g_loss.detach(), d_weight=d_weight)
        return loss, dict(log, total_loss=loss.detach())

    def discriminator_loss(self, inputs, reconstructions, step):
        """The discriminator's loss on real images against (detached) reconstructions."""
        logits_real = self.discriminator(inputs.contiguous().detach())
        logits_fake = self.discriminator(reconstructions.contiguous().detach())
        loss = self.disc_factor_at(step) * self.disc_loss(logits_real, logits_fake)
        return loss, {'disc_loss': loss.detach(), 'logits_real': logits_real.detach().mean(),
                      'logits_fake': logits_fake.detach().mean()}

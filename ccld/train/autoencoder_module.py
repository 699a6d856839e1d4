"""The LightningModule that finetunes a KL autoencoder with latent-diffusion's loss
(ldm.modules.losses.LPIPSWithDiscriminator): the autoencoder against L1 + LPIPS, KL and,
from --disc-start on, a PatchGAN discriminator, which trains beside it.

Decoder-only (the default), the encoder and quant_conv are frozen: they get no gradient,
so they stay bit-identical, and with them the latents every cache and U-Net was made on.
"""

from contextlib import nullcontext

import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import ParallelStrategy

from ..errors import RunError
from .diffusion_module import LightningDiffusion, gather_objects

ENCODER = ('encoder', 'quant_conv')
DECODER = ('decoder', 'post_quant_conv')
BETAS = (0.5, 0.9)  # CompVis' Adam for both networks


def grad_norm(parameters):
    """The total 2-norm of the gradients of `parameters` (0 when none has one)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else torch.tensor(0.0)


class LightningAutoencoder(pl.LightningModule):
    """Holds the `autoencoder` and its `loss` (learned log-variance, discriminator, and a
    frozen LPIPS that is left out of checkpoints and rebuilt from its file).

    Optimisation is manual, so that a step with non-finite gradients can be skipped (no
    update, not counted as a step). Each step runs the autoencoder once; its loss and,
    from disc_start on, the discriminator's (on the same, detached, reconstructions) are
    backpropagated together before anything is updated. One Adam holds the two networks
    as two parameter groups: Adam keeps its state per parameter and passes over those
    without a gradient, so each network is updated exactly as by an Adam of its own,
    while Lightning counts one step per batch (it counts a step per optimizer, which
    would halve --max-steps and shift --disc-start). Before disc_start the discriminator
    is never run: it neither shapes the autoencoder's loss nor changes, running
    statistics included.
    """

    def __init__(self, autoencoder, loss, train_encoder=False, lr=1e-5, record=None,
                 grad_clip=None, accumulate_grad_batches=1, max_bad_steps=50,
                 even_epochs=False, lr_schedule=None):
        super().__init__()
        self.automatic_optimization = False
        self.autoencoder = autoencoder.train()
        self.loss = loss
        self.train_encoder = train_encoder
        for name in ENCODER + DECODER:
            trained = train_encoder or name in DECODER
            getattr(autoencoder, name).requires_grad_(trained)
        self.lr = lr
        self.lr_schedule = lr_schedule or {}
        self.grad_clip = grad_clip
        self.accumulate = accumulate_grad_batches
        self.max_bad_steps = max_bad_steps
        self.even_epochs = even_epochs
        self.record = dict(record or {}, trained='encoder and decoder' if train_encoder
                           else 'decoder')
        self.skipped_images = 0
        self.skipped_steps = 0
        self.bad_steps_in_a_row = 0
        self.micro_batches = 0
        self.examples_seen = self.files_tried = 0
        self.saved_random = None

    # What keeps a run by hand going through bad data and bad steps, on schedule, with
    # even epochs across ranks on streamed data: LightningDiffusion's, shared as they are
    # (they read only the counters and settings set above, and random_state below).
    on_train_start = LightningDiffusion.on_train_start
    set_learning_rate = LightningDiffusion.set_learning_rate
    on_train_batch_start = LightningDiffusion.on_train_batch_start
    on_train_batch_end = LightningDiffusion.on_train_batch_end
    check_for_data = LightningDiffusion.check_for_data
    count_bad_step = LightningDiffusion.count_bad_step
    scaled_gradients = LightningDiffusion.scaled_gradients

    @property
    def discriminator(self):
        return self.loss.discriminator

    def autoencoder_parameters(self):
        """What the autoencoder's side of the loss trains: the decoder (and with
        --full the encoder) and the loss's log-variance."""
        names = ENCODER + DECODER if self.train_encoder else DECODER
        modules = [getattr(self.autoencoder, name) for name in names]
        return [p for m in modules for p in m.parameters()] + [self.loss.logvar]

    def train(self, mode=True):
        super().train(mode)
        if not self.train_encoder:
            for name in ENCODER:
                getattr(self.autoencoder, name).eval()
        return self

    def configure_optimizers(self):
        groups = [{'params': self.autoencoder_parameters(), 'name': 'autoencoder'},
                  {'params': list(self.discriminator.parameters()), 'name': 'discriminator'}]
        return torch.optim.Adam(groups, lr=self.lr, betas=BETAS)

    # This rank's torch generators (posterior samples), saved with checkpoints so that a
    # resumed run draws what an uninterrupted one would have.
    random_state = LightningDiffusion.generator_state
    restore_random = LightningDiffusion.restore_generators

    def reconstruct(self, images):
        """Images in [0, 1] -> (the posterior, a reconstruction in [-1, 1] of a sample)."""
        with torch.set_grad_enabled(self.train_encoder and torch.is_grad_enabled()):
            posterior = self.autoencoder.encode(images * 2 - 1)
        return posterior, self.autoencoder.decode(posterior.sample())

    def training_step(self, batch, batch_idx):
        self.skipped_images += batch.get('skipped', 0)
        self.log('train/skipped_images', float(self.skipped_images), reduce_fx='sum',
                 sync_dist=True)
        n = len(batch['images'])
        self.check_for_data(n, n + batch.get('skipped', 0))
        step = self.global_step
        disc_on = self.loss.disc_factor_at(step) > 0
        if n:
            loss = self.loss_of(batch['images'], step, disc_on)
        else:
            # Every file of this batch was unreadable. A zero loss that still reaches every
            # trained weight keeps this rank in step with the others' all-reduce under DDP.
            trained = self.autoencoder_parameters() + list(self.discriminator.parameters())
            loss = sum(p.sum() for p in trained) * 0.0
        self.micro_batches += 1
        stepping = self.micro_batches % self.accumulate == 0
        strategy = self.trainer.strategy  # (only parallel strategies have a sync to skip)
        skip_sync = not stepping and isinstance(strategy, ParallelStrategy)
        with strategy.block_backward_sync() if skip_sync else nullcontext():
            self.manual_backward(loss / self.accumulate)
        if stepping:
            self.optimizer_step_or_skip(disc_on)

    def loss_of(self, images, step, disc_on):
        """The autoencoder's loss plus the discriminator's (before disc_start, a zero that
        reaches its weights without running it, for DDP). One backward pass of the sum
        gives each network the gradient of its own loss alone: the autoencoder's is taken
        with the discriminator's weights frozen, and the discriminator's from detached
        images (DDP allows one backward pass per step)."""
        x = images * 2 - 1
        posterior, reconstructions = self.reconstruct(images)
        self.discriminator.requires_grad_(False)  # its loss alone trains it
        try:
            ae_loss, log = self.loss.generator_loss(x, reconstructions, posterior, step,
                                                    self.autoencoder.decoder.conv_out.weight)
        finally:
            self.discriminator.requires_grad_(True)
        if disc_on:
            disc_loss, disc_log = self.loss.discriminator_loss(x, reconstructions, step)
            log.update(disc_log)
        else:
            disc_loss = sum(p.sum() for p in self.discriminator.parameters()) * 0.0
        # latent-diffusion's loss sums over each image's pixels (a 256 px image's is ~2e5
        # times a pixel's): train/loss is it per pixel, which compares across image sizes
        # and with rec_loss; train/total_loss, nll_loss and kl_loss are CompVis's, summed.
        self.log('train/loss', log['total_loss'] / x[0].numel(), prog_bar=True)
        self.log_dict({f'train/{k}': v for k, v in log.items()})
        return ae_loss + disc_loss

    def optimizer_step_or_skip(self, disc_on):
        """Steps both networks (the discriminator from disc_start on), unless a gradient is
        not finite, or all of the autoencoder's are zero (no rank had a readable image)."""
        optimizer = self.optimizers()
        if not disc_on:
            for p in self.discriminator.parameters():
                p.grad = None  # (the zero that kept DDP whole): Adam leaves it untouched
        norms = torch.stack([grad_norm(self.autoencoder_parameters()),
                             grad_norm(self.discriminator.parameters())])
        finite = bool(torch.isfinite(norms).all())
        # 16-bit: gradients are still scaled here; the GradScaler skips a non-finite step
        # itself (and lowers its scale), so it is given the step.
        if norms[0] == 0 or not (finite or self.scaled_gradients):
            optimizer.zero_grad(set_to_none=True)
            if not finite:
                self.count_bad_step()
            return
        self.log('train/lr', self.set_learning_rate())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if not finite:
            self.count_bad_step()
            return
        self.bad_steps_in_a_row = 0

    def on_before_optimizer_step(self, optimizer):
        # Inside optimizer.step(), where 16-bit gradients are unscaled: each network's
        # gradient is clipped to --grad-clip on its own.
        if self.grad_clip:
            for group in optimizer.param_groups:
                torch.nn.utils.clip_grad_norm_(group['params'], self.grad_clip)

    def on_save_checkpoint(self, checkpoint):
        state = checkpoint['state_dict']
        for key in [k for k in state if k.startswith('loss.perceptual_loss.')]:
            del state[key]
        bad = [k for k, v in state.items()
               if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise RunError(f'{bad[0]} holds non-finite values at step {self.global_step}; not '
                           'writing a checkpoint of it.')
        checkpoint['ccld_autoencoder'] = dict(self.record)
        checkpoint['ccld_random'] = gather_objects(self.random_state())

    def on_load_checkpoint(self, checkpoint):
        # LPIPS comes from its weights file, as in a fresh run.
        state = checkpoint['state_dict']
        for key in [k for k in state if k.startswith('loss.perceptual_loss.')]:
            del state[key]
        for key, value in self.state_dict().items():
            if key.startswith('loss.perceptual_loss.'):
                state[key] = value
        self.saved_random = checkpoint.get('ccld_random')

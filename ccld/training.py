"""The LightningModule: v-objective training of a DiffusionModel in a frozen autoencoder's
latent space, conditioned on frozen CLOOB image embeddings."""

import copy

import pytorch_lightning as pl
import torch
from torch.nn import functional as F

from . import latents
from .ema import ema_decay, ema_update
from .schedule import t_to_alpha_sigma
from .unet import DiffusionModel

FROZEN = ('ae_model', 'cloob')
COND_DROPOUT = 0.2


def v_objective(model, x0, cond, t):
    """MSE between the predicted and the true v for clean latents `x0` noised to times `t`.

    Each example's condition is zeroed with probability COND_DROPOUT, so the same model
    also learns the unconditional v that classifier-free guidance needs.
    """
    keep = torch.rand(x0.shape[0], device=x0.device) >= COND_DROPOUT
    cond = cond * keep[:, None].to(cond.dtype)
    alphas, sigmas = (s[:, None, None, None] for s in t_to_alpha_sigma(t))
    noise = torch.randn_like(x0)
    noised = x0 * alphas + noise * sigmas
    target = noise * alphas - x0 * sigmas
    return F.mse_loss(model(noised, t, cond).float(), target)


class LightningDiffusion(pl.LightningModule):
    """Holds the trained `model`, its EMA copy `model_ema`, and the frozen `ae_model`
    and `cloob`. The frozen models stay in eval mode and are left out of checkpoints;
    they are rebuilt from the files named in the checkpoint's 'ccld' record.
    """

    def __init__(self, ae_model, cloob, base_channels=128, channel_multipliers=(4, 4, 8, 8),
                 autoencoder_scale=1.0, lr=3e-5, ema_decay_at=200_000, record=None,
                 seed=0):
        super().__init__()
        self.ae_model = ae_model.requires_grad_(False).eval()
        self.cloob = cloob.requires_grad_(False).eval()
        self.model = DiffusionModel(base_channels, channel_multipliers, autoencoder_scale)
        self.model_ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.lr = lr
        self.ema_decay_at = ema_decay_at
        self.seed = seed
        self.record = dict(record or {}, base_channels=base_channels,
                           channel_multipliers=list(channel_multipliers),
                           autoencoder_scale=float(autoencoder_scale))
        self.skipped_images = 0
        self.rng = None

    def train(self, mode=True):
        super().train(mode)
        for name in (*FROZEN, 'model_ema'):
            getattr(self, name).eval()
        return self

    def setup(self, stage):
        # One scrambled Sobol sequence per rank, so ranks draw different timesteps.
        self.rng = torch.quasirandom.SobolEngine(1, scramble=True,
                                                 seed=self.seed + self.global_rank)

    def configure_optimizers(self):
        # The fused kernel updates every parameter in one pass (3.4x faster optimizer steps
        # than the default on a 2-core CPU for the tiny test model).
        fused = self.device.type in ('cuda', 'cpu') or None
        return torch.optim.AdamW(self.model.parameters(), lr=self.lr, weight_decay=0.01,
                                 fused=fused)

    def on_train_start(self):
        # --lr wins over the LR stored in a resumed checkpoint.
        for optimizer in self.trainer.optimizers:
            for group in optimizer.param_groups:
                group['lr'] = self.lr

    def training_step(self, batch, batch_idx):
        self.skipped_images += batch['skipped']
        self.log('train/skipped_images', float(self.skipped_images), reduce_fx='sum',
                 sync_dist=True)
        images = batch['images']
        if images.shape[0] == 0:
            # Every file of this batch was unreadable. A zero loss that still reaches every
            # weight keeps this rank in step with the others' gradient all-reduce under DDP.
            return sum(p.sum() for p in self.model.parameters()) * 0.0
        loss = self.v_loss(images)
        self.log('train/loss', loss, prog_bar=True)
        return loss

    def v_loss(self, images):
        """The v-objective on the latents of `images`, conditioned on their CLOOB embeddings."""
        with torch.no_grad():
            x0 = latents.encode(self.ae_model, images, self.model.autoencoder_scale)
            cond = self.cloob.embed_images(images)
        t = self.rng.draw(images.shape[0])[:, 0].to(self.device)
        return v_objective(self.model, x0, cond, t)

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        ema_update(self.model, self.model_ema, ema_decay(self.global_step, self.ema_decay_at))

    def on_save_checkpoint(self, checkpoint):
        state = checkpoint['state_dict']
        for key in [k for k in state if k.startswith(tuple(f'{m}.' for m in FROZEN))]:
            del state[key]
        checkpoint['ccld'] = dict(self.record)

    def on_load_checkpoint(self, checkpoint):
        # Frozen weights come from the files given on the command line, not the checkpoint.
        state = checkpoint['state_dict']
        for key in [k for k in state if k.startswith(tuple(f'{m}.' for m in FROZEN))]:
            del state[key]
        for name in FROZEN:
            for key, value in getattr(self, name).state_dict().items():
                state[f'{name}.{key}'] = value
        # So does the autoencoder scale: --autoencoder-scale is required, and wins.
        for name in ('model', 'model_ema'):
            state[f'{name}.autoencoder_scale'] = getattr(self, name).autoencoder_scale.clone()


class InterruptCheckpoint(pl.callbacks.ModelCheckpoint):
    """Checkpoints every N steps, and also when the run is stopped with Ctrl-C, so that
    stopping loses nothing. Other exceptions save nothing: under DDP they may hit one rank
    only, and the collective save would then hang instead of failing.
    """

    def on_exception(self, trainer, module, exception):
        if isinstance(exception, KeyboardInterrupt):
            super().on_exception(trainer, module, exception)

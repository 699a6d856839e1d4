"""Validation of an autoencoder finetune: held-out images through the autoencoder every
--val-every steps, and at step 0 (the starting autoencoder, to compare against), as L1,
PSNR and LPIPS in the logs and a grid of inputs above their reconstructions.

Reconstructions decode the posterior mean, so the numbers move only with the weights.
"""

import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info

from ..data.sources import transformed
from ..errors import UserError
from ..sample import png_files

GRID_COLS = 8
LABELS = {'val/l1': 'L1 {:.4f}', 'val/psnr': 'PSNR {:.2f} dB', 'val/lpips': 'LPIPS {:.4f}'}


def read_images(source, count, image_size):
    """The first `count` readable images of a Source, as [n, 3, S, S] in [0, 1], and how
    many unreadable ones were skipped on the way."""
    images, skipped = [], 0
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # counted instead, one line for all of them
        for unit in range(len(source)):
            for _, image, _ in transformed(source.items(unit), image_size):
                if image is None:
                    skipped += 1
                    continue
                images.append(image)
                if len(images) == count:
                    return torch.stack(images), skipped
    if not images:
        raise UserError(f'--val-set: none of the {skipped} images of {source.spec} could be '
                        'read; pass a list of image paths or tar shards of images.')
    return torch.stack(images), skipped


@torch.no_grad()
def reconstruct(autoencoder, images, batch_size):
    """Images in [0, 1] -> their reconstructions from the posterior mean, in [0, 1]."""
    device = next(autoencoder.parameters()).device
    out = []
    for batch in images.split(batch_size):
        decoded = autoencoder.decode(autoencoder.encode(batch.to(device) * 2 - 1).mode())
        out.append(((decoded.float() + 1) / 2).clamp(0, 1).cpu())
    return torch.cat(out)


@torch.no_grad()
def metrics(images, reconstructions, lpips=None, batch_size=16):
    """Mean L1 (in [0, 1] units), mean per-image PSNR (dB, peak 1) and, with an LPIPS
    module, mean LPIPS of reconstructions against their images."""
    error = (images - reconstructions).flatten(1)
    mse = error.square().mean(1).clamp_min(1e-10)
    result = {'val/l1': error.abs().mean().item(),
              'val/psnr': (10 * torch.log10(1 / mse)).mean().item()}
    if lpips is not None:
        device = next(lpips.parameters()).device
        distances = [lpips(a.to(device) * 2 - 1, b.to(device) * 2 - 1).flatten().cpu()
                     for a, b in zip(images.split(batch_size), reconstructions.split(batch_size))]
        result['val/lpips'] = torch.cat(distances).mean().item()
    return result


def comparison_grid(images, reconstructions, cols=GRID_COLS):
    """Up to `cols` inputs in the top row, their reconstructions below."""
    k = min(cols, len(images))
    return png_files.grid(torch.cat([images[:k], reconstructions[:k]]), k)


class Reconstructions(pl.Callback):
    """Rank zero validates `images` at step 0 of a fresh run, every `every` steps and at
    the end, logs val/l1, val/psnr and val/lpips (with an LPIPS module), and writes
    OUT_DIR/reconstructions_STEP.png (also logged to wandb). The other ranks go on to the
    next step and wait for it there."""

    def __init__(self, images, every, out_dir, batch_size, lpips=None):
        self.images, self.every, self.out_dir = images, every, Path(out_dir)
        self.batch_size, self.lpips = batch_size, lpips
        self.last_step = None

    def on_train_start(self, trainer, module):
        if trainer.global_step == 0:
            self.validate(trainer, module)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step % self.every == 0:
            self.validate(trainer, module)

    def on_train_end(self, trainer, module):
        self.validate(trainer, module)  # the weights NAME.ckpt gets, at any step

    def validate(self, trainer, module):
        step = trainer.global_step
        if step == self.last_step:
            return
        self.last_step = step
        if not trainer.is_global_zero:
            return
        autoencoder = module.autoencoder
        autoencoder.eval()
        try:
            reconstructions = reconstruct(autoencoder, self.images, self.batch_size)
        finally:
            module.train()
        values = metrics(self.images, reconstructions, self.lpips, self.batch_size)
        path = png_files.save_png(comparison_grid(self.images, reconstructions),
                                  self.out_dir / f'reconstructions_{step:08}.png',
                                  {'step': step, **{k: f'{v:.4f}' for k, v in values.items()}})
        for logger in trainer.loggers:
            logger.log_metrics(values, step=step)
            log_image(logger, path, step)
        shown = ', '.join(LABELS[k].format(v) for k, v in values.items())
        rank_zero_info(f'step {step}: validation {shown} ({path})')


def log_image(logger, path, step):
    """Sends the grid to wandb; the PNG on disk is the record."""
    from pytorch_lightning.loggers import WandbLogger
    if isinstance(logger, WandbLogger):
        import wandb
        logger.log_metrics({'val/reconstructions': wandb.Image(str(path))}, step=step)

"""Training speed in the logs and on the progress bar: images/s over all ranks, and the
U-Net's TFLOP/s per device and model FLOP utilisation (MFU) against the device's peak.

The U-Net's forward+backward FLOPs per image are counted once, on the meta device, with
torch's flop counter; the frozen models are left out (a cache run has none). The clock
is read only on logging steps, so the GPU is synchronised once per log interval.
"""

from time import perf_counter

import pytorch_lightning as pl
import torch
from lightning_fabric.utilities.throughput import Throughput as Meter
from lightning_fabric.utilities.throughput import get_available_flops, measure_flops

from ..models.unet import CLIP_EMBED_DIM, LATENT_CHANNELS, DiffusionModel

UPDATES_PER_WINDOW = 5


def training_flops_per_image(base_channels, channel_multipliers, latent_size,
                             extra_forwards=0):
    """FLOPs of the U-Net's forward and backward pass for one latent, plus
    `extra_forwards` forward passes (a distillation's teacher)."""
    with torch.device('meta'):
        model = DiffusionModel(base_channels, channel_multipliers)
        x = torch.empty(1, LATENT_CHANNELS, latent_size, latent_size)
        t, cond = torch.empty(1), torch.empty(1, CLIP_EMBED_DIM)
    flops = measure_flops(model, lambda: model(x, t, cond), loss_fn=torch.Tensor.sum)
    if extra_forwards:
        flops += extra_forwards * measure_flops(model, lambda: model(x, t, cond))
    return flops


def compute_dtype(precision):
    """The dtype the matrix units run in for a Lightning precision string."""
    if precision.startswith('bf16'):
        return torch.bfloat16
    if precision.startswith('16'):
        return torch.float16
    return torch.float64 if precision.startswith('64') else torch.float32


class Throughput(pl.Callback):
    """Logs perf/images_per_sec (all ranks), perf/tflops_per_device and, where the peak
    is known (a table of data-centre and consumer GPUs, or --peak-tflops), perf/mfu.
    Without a `latent_size` (a module that trains no U-Net), images/s only.
    `extra_forwards`: U-Net forward passes per image besides the trained one's (a
    distillation's teacher calls)."""

    def __init__(self, latent_size=None, peak_tflops=None, extra_forwards=0):
        self.latent_size = latent_size
        self.peak_tflops = peak_tflops
        self.extra_forwards = extra_forwards

    def setup(self, trainer, module, stage):
        peak = self.peak_tflops * 1e12 if self.peak_tflops else get_available_flops(
            trainer.strategy.root_device, compute_dtype(str(trainer.precision)))
        self.meter = Meter(available_flops=peak, world_size=trainer.world_size,
                           window_size=UPDATES_PER_WINDOW)
        self.flops_per_image = None
        if self.latent_size is not None:
            record = module.record
            self.flops_per_image = training_flops_per_image(
                record['base_channels'], record['channel_multipliers'], self.latent_size,
                self.extra_forwards)

    def on_train_start(self, trainer, module):
        self.start, self.batches, self.images, self.since_update = perf_counter(), 0, 0, 0

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        from .diffusion_module import batch_size_of
        n = batch_size_of(batch)
        self.batches, self.images, self.since_update = (self.batches + 1, self.images + n,
                                                        self.since_update + n)
        if self.batches % trainer.log_every_n_steps:
            return
        if module.device.type == 'cuda':
            torch.cuda.synchronize(module.device)
        # (the meter insists on samples >= batches; batches of unreadable files have none)
        flops = None if self.flops_per_image is None else self.flops_per_image * self.since_update
        self.meter.update(time=perf_counter() - self.start, batches=self.batches,
                          samples=max(self.images, self.batches), flops=flops)
        self.since_update = 0
        metrics = self.meter.compute()
        per_device = metrics.get('device/samples_per_sec')
        if per_device is None:  # the window is not full yet
            return
        logged = {'perf/images_per_sec': per_device * trainer.world_size}
        if 'device/flops_per_sec' in metrics:
            logged['perf/tflops_per_device'] = metrics['device/flops_per_sec'] / 1e12
        if 'device/mfu' in metrics:
            logged['perf/mfu'] = metrics['device/mfu']
        module.log_dict(logged)
        module.log('img/s', logged['perf/images_per_sec'], prog_bar=True, logger=False)

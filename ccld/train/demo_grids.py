"""Demo grids rendered with the EMA model while training, the run's main diagnostic."""

import html
from contextlib import contextmanager, nullcontext
from pathlib import Path

import pytorch_lightning as pl
import torch

from ..cli import size_pair
from ..models import latents
from ..sample import png_files
from ..diffusion.sampling import sample_latents
from ..diffusion.schedule import sampling_timesteps
from ..sample.cloob_score import cloob_scores
from ..sample.generate import guided_model_fn
from ..models.unet import LATENT_CHANNELS

GRID_COLS = 4


@torch.no_grad()
def render(model, ae_model, text_embeds, latent_shape, steps=50, cond_scale=3.0, seed=0,
           method='plms', schedule='spliced'):
    """One sample per prompt embedding, guided at `cond_scale`; images in [0, 1].

    The original drew them with PLMS, 50 steps on the spliced schedule (the defaults). A
    distilled student takes cond_scale as its w and makes one call a step.
    """
    device = text_embeds.device
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn([text_embeds.shape[0], *latent_shape], generator=generator).to(device)
    model_fn = guided_model_fn(model, text_embeds[None], [cond_scale])
    out = sample_latents(model_fn, x, sampling_timesteps(steps, device, schedule), method,
                         progress=False)
    return latents.decode(ae_model, out, model.autoencoder_scale)


def demo_latent_size(args):
    """The demo latents' (width, height) under the flags: --demo-size, else the square
    --image-size, through kl-f8."""
    width, height = size_pair(args.demo_size or args.image_size)
    return width // 8, height // 8


def prompts_html(prompts, cols=GRID_COLS):
    rows = [f'({i // cols}, {i % cols}) {html.escape(p)}' for i, p in enumerate(prompts)]
    return '<pre>' + '\n'.join(rows) + '</pre>'


class DemoCallback(pl.Callback):
    """On the first step and every `every` steps, rank zero renders, saves and logs a grid
    and its CLOOB score (demo/cloob_score: how closely the images follow their prompts).

    The demo draws its noise from its own generator inside a forked RNG, so it does not
    change the training random stream.
    """

    def __init__(self, prompts, every, out_dir, steps=50, latent_size=32, seed=0,
                 method='plms', schedule='spliced'):
        """`latent_size`: the latents' sides, one number (square) or (width, height)."""
        self.prompts = list(prompts)
        self.every = every
        self.out_dir = Path(out_dir)
        self.steps = steps
        self.method = method
        self.schedule = schedule
        self.latent_size = size_pair(latent_size)
        self.seed = seed
        self.last_step = None
        self.text_embeds = None

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step == self.last_step or (self.last_step is not None and step % self.every):
            return
        self.last_step = step
        if trainer.is_global_zero:
            self.render_and_log(trainer, module, step)

    def render_and_log(self, trainer, module, step):
        devices = [module.device] if module.device.type == 'cuda' else []
        with torch.random.fork_rng(devices=devices):
            if self.text_embeds is None:
                self.text_embeds = module.cloob.embed_texts(self.prompts)
            shape = [LATENT_CHANNELS, self.latent_size[1], self.latent_size[0]]
            with ema_model(module) as ema, sampling_context(trainer, ema):
                samples = render(ema, module.ae_model, self.text_embeds, shape, self.steps,
                                 seed=self.seed, method=self.method,
                                 schedule=self.schedule).float()
            with image_tower(module) as cloob:
                score = cloob_scores(cloob, samples, self.text_embeds).mean().item()
        grid = png_files.grid(samples, GRID_COLS)
        path = png_files.save_png(grid, self.out_dir / f'demo_{step:08}.png',
                                  {'step': step, 'prompts': '\n'.join(self.prompts),
                                   'cloob_score': f'{score:.4f}'})
        for logger in trainer.loggers:
            logger.log_metrics({'demo/cloob_score': score}, step=step)
            log_grid(logger, path, self.prompts, step)


def sampling_context(trainer, model):
    """Where `model` samples: under the training precision's autocast when its frozen
    weights are 16-bit (a LoRA run's base), which fp32 inputs could not meet otherwise."""
    if any(p.dtype in (torch.float16, torch.bfloat16) for p in model.parameters()):
        return trainer.precision_plugin.forward_context()
    return nullcontext()


@contextmanager
def ema_model(module):
    """The run's EMA model on the module's device: a CPU EMA (--ema-device cpu) visits it
    while the grid is drawn."""
    if module.offloaded_ema is None:
        yield module.model_ema
        return
    with module.offloaded_ema.visiting(module.device) as ema:
        yield ema


@contextmanager
def image_tower(module):
    """The run's CLOOB with its image tower on the module's device. Training from a
    latent cache keeps the tower on the CPU (the U-Net gets the GPU memory); it visits
    the device only while the demo is scored."""
    cloob, spare = module.cloob, module.spare_image_tower
    if spare is None:
        yield cloob
        return
    cloob.model.image_encoder = spare[0].to(module.device)
    try:
        yield cloob
    finally:
        cloob.model.image_encoder = None
        spare[0].to('cpu')


def log_grid(logger, path, prompts, step):
    """Sends the grid to loggers that can show images; the PNG on disk is the record."""
    from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger
    if isinstance(logger, WandbLogger):
        import wandb
        logger.log_metrics({'demo_grid': wandb.Image(str(path)),
                            'prompts': wandb.Html(prompts_html(prompts))}, step=step)
    elif isinstance(logger, TensorBoardLogger):
        import numpy as np
        from PIL import Image
        logger.experiment.add_image('demo_grid', np.asarray(Image.open(path)), step,
                                    dataformats='HWC')
        logger.experiment.add_text('prompts', prompts_html(prompts), step)

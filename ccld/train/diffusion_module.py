"""The LightningModule: v-objective training of a DiffusionModel in a frozen autoencoder's
latent space, conditioned on frozen CLOOB image embeddings.

Batches come either as images (encoded here, every step, as the original did) or from a
latent cache (posterior mean and std and the CLOOB embedding, precomputed once). Either
way the model sees a fresh posterior sample each step.
"""

import copy
import math
from contextlib import nullcontext

import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import ParallelStrategy
from pytorch_lightning.utilities import rank_zero_warn

from ..data.captions import choose_text
from ..diffusion.objective import v_objective
from ..errors import RunError
from ..models.latents import posterior_sample
from ..models.unet import DiffusionModel
from .ema import OffloadedEma, averaged_copy, ema_decay, ema_update
from .optimizers import make_optimizer

FROZEN = ('ae_model', 'cloob')
COMPILE_BACKEND = 'inductor'
NO_DATA_BATCHES = 20  # stop a run whose first batches hold no readable image


@torch.no_grad()
def latents_and_conditions(batch, ae_model, cloob, scale, text_prob=0.0):
    """Scaled posterior samples and CLOOB image embeddings of a batch of images (encoded
    here, as the original did every step) or of cached means, stds and embeddings; with
    `text_prob`, some conditions are their captions' text embeddings (with_captions)."""
    if 'images' in batch:
        images = batch['images']
        posterior = ae_model.encode(images * 2 - 1)
        mean, std = posterior.mean, posterior.std
        cond = cloob.embed_images(images)
    else:
        mean, std, cond = batch['mean'].float(), batch['std'].float(), batch['embed'].float()
    if text_prob:  # (nothing drawn at 0: the run is the captionless one, bit for bit)
        cond = with_captions(cond, batch, cloob, text_prob)
    return posterior_sample(mean, std, scale), cond


def with_captions(cond, batch, cloob, p):
    """The image embeddings `cond` with each example that has a caption switched to its
    caption's CLOOB text embedding with probability p: the cached one, or (a batch of
    images) one embedded here, for the chosen captions alone. Condition dropout comes
    after this, as without captions."""
    if 'text_embed' in batch:
        chosen = choose_text(batch['has_text'].to(cond.device), p)
        return torch.where(chosen[:, None], batch['text_embed'].to(cond), cond)
    texts = batch.get('captions') or [None] * len(cond)
    chosen = choose_text(torch.tensor([t is not None for t in texts], device=cond.device), p)
    if not chosen.any():
        return cond
    cond = cond.clone()
    cond[chosen] = cloob.embed_texts([t for t, c in zip(texts, chosen.tolist()) if c]).to(cond)
    return cond


def learning_rate(step, base, warmup=0, schedule='constant', minimum=0.0, total=None):
    """The LR of optimizer step `step` (from 0): linear from 0 over `warmup` steps, then
    constant, a cosine decay to `minimum` at step `total`, or an inverse-square-root
    decay (from the end of the warmup, floored at `minimum`)."""
    if step < warmup:
        return base * step / warmup
    if schedule == 'constant':
        return base
    if schedule == 'cosine':
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return minimum + (base - minimum) * 0.5 * (1 + math.cos(math.pi * progress))
    start = max(warmup, 1)
    return max(minimum, base * math.sqrt(start / max(step, start)))


def batch_size_of(batch):
    """The number of usable examples in a batch of images or of cached latents."""
    return len(batch['images'] if 'images' in batch else batch['mean'])


class LightningDiffusion(pl.LightningModule):
    """Holds the trained `model`, its EMA copy `model_ema`, and the frozen `ae_model`
    and `cloob`. The frozen models stay in eval mode and are left out of checkpoints;
    they are rebuilt from the files named in the checkpoint's 'ccld' record.

    Optimisation is manual, so that a step whose loss or gradients are not finite can be
    skipped outright: no optimizer update, no EMA update, and no step counted.
    With `from_cache`, the autoencoder's encoder is dropped and CLOOB's image tower kept
    off the device: the cache holds what they would compute, and their memory goes to
    the U-Net.
    With `even_epochs` (streamed data, whose ranks' shares differ in length), every rank
    ends its epoch after the batch on which the first one ran out; a rank that stopped
    while the others went on would leave them waiting in a gradient all-reduce forever.
    `model` trains a given DiffusionModel (a distillation's student, a finetune's or a
    continued run's weights) instead of a fresh one of the given widths, and `model_ema`
    is its average where there is one already (a continued run's, from its checkpoint),
    else a copy of it; `frozen` names the submodules left out of checkpoints.
    `text_prob` is how often an example with a caption is conditioned on its text
    embedding instead (data/captions.py).
    `optimizer` is one of optimizers.OPTIMIZERS; with `ema_device` 'cpu' the EMA stays in
    CPU memory (ema.OffloadedEma) wherever the model trains, still saved as model_ema.
    Parameters of `model` that do not train (a LoRA run's base, see models/lora.py) are
    left out too, and come back from the model given on load: a LoRA run's checkpoints
    hold its adapters, their EMA and their optimizer state.
    """

    frozen = FROZEN

    def __init__(self, ae_model, cloob, base_channels=128, channel_multipliers=(4, 4, 8, 8),
                 autoencoder_scale=1.0, lr=3e-5, ema_decay_at=200_000, record=None,
                 seed=0, grad_clip=None, accumulate_grad_batches=1, max_bad_steps=50,
                 from_cache=False, even_epochs=False, compile=False, channels_last=False,
                 gradient_checkpointing=False, lr_schedule=None, model=None, model_ema=None,
                 optimizer='adamw', ema_device=None, text_prob=0.0):
        super().__init__()
        self.automatic_optimization = False
        self.spare_image_tower = None
        if from_cache:
            ae_model.encoder = ae_model.quant_conv = None
            # In a tuple, not a submodule, so that Lightning leaves it on the CPU; the
            # demo borrows it to score its grids.
            self.spare_image_tower = (cloob.model.image_encoder,)
            cloob.model.image_encoder = None
        self.ae_model = ae_model.requires_grad_(False).eval()
        self.cloob = cloob.requires_grad_(False).eval()
        self.model = model if model is not None else DiffusionModel(base_channels,
                                                                    channel_multipliers)
        self.model.autoencoder_scale.fill_(autoencoder_scale)
        if model_ema is None:
            self.model_ema = averaged_copy(self.model)
        else:
            self.model_ema = model_ema.requires_grad_(False).eval()
            self.model_ema.autoencoder_scale.fill_(autoencoder_scale)
        self.offloaded_ema = None
        if ema_device == 'cpu':
            self.offloaded_ema = OffloadedEma(self.model_ema)
            # DDP would broadcast it from rank 0's GPU; every rank starts with the same.
            self._ddp_params_and_buffers_to_ignore = [
                f'model_ema.{name}' for name in OffloadedEma.tensors(self.model_ema)]
        self.optimizer_name = optimizer
        # Speed options change how the trained model runs, never its weights' names or
        # format: Module.compile works in place (no _orig_mod. keys), and the EMA copy,
        # which the demo grids use, stays a plain module.
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model.to(memory_format=self.memory_format)
        self.model.set_gradient_checkpointing(gradient_checkpointing)
        if compile:
            self.model.compile(backend=COMPILE_BACKEND)
        self.text_prob = text_prob
        self.lr = lr
        self.lr_schedule = lr_schedule or {}
        self.ema_decay_at = ema_decay_at
        self.seed = seed
        self.grad_clip = grad_clip
        self.accumulate = accumulate_grad_batches
        self.max_bad_steps = max_bad_steps
        self.even_epochs = even_epochs
        self.record = dict(record or {}, base_channels=base_channels,
                           channel_multipliers=list(channel_multipliers),
                           autoencoder_scale=float(autoencoder_scale))
        self.skipped_images = 0
        self.skipped_steps = 0
        self.bad_steps_in_a_row = 0
        self.micro_batches = 0
        self.examples_seen = self.files_tried = 0
        self.rng = None
        self.saved_random = None

    def _apply(self, fn, recurse=True):
        # Moving the module to its device (or dtype) leaves a CPU EMA where it is.
        if self.offloaded_ema is None:
            return super()._apply(fn, recurse)
        ema = self._modules.pop('model_ema')
        try:
            return super()._apply(fn, recurse)
        finally:
            self._modules['model_ema'] = ema

    def train(self, mode=True):
        super().train(mode)
        for name in (*self.frozen, 'model_ema'):
            getattr(self, name).eval()
        return self

    def setup(self, stage):
        # One scrambled Sobol sequence per rank, so ranks draw different timesteps.
        self.rng = torch.quasirandom.SobolEngine(1, scramble=True,
                                                 seed=self.seed + self.global_rank)

    def configure_optimizers(self):
        # The fused kernel updates every parameter in one pass (3.4x faster optimizer steps
        # than the default on a 2-core CPU for the tiny test model). 16-bit training keeps
        # the plain kernel: the fused one unscales inside step(), after clipping would run.
        fused = (self.device.type in ('cuda', 'cpu') and not self.scaled_gradients) or None
        return make_optimizer(self.optimizer_name, self.trained_parameters(), self.lr, fused)

    def trained_parameters(self):
        return [p for p in self.model.parameters() if p.requires_grad]

    def frozen_weights(self):
        """The state-dict keys of the model's parameters that do not train, in both copies."""
        names = [n for n, p in self.model.named_parameters() if not p.requires_grad]
        return [f'{m}.{n}' for m in ('model', 'model_ema') for n in names]

    def random_state(self):
        """This rank's random state: torch's generators, and how far its timestep sequence
        has gone. Saved with checkpoints, so a resumed run draws what an uninterrupted one
        would have."""
        return {**self.generator_state(), 'sobol': int(self.rng.num_generated)}

    def restore_random(self, states):
        state = self.restore_generators(states)
        if state is not None:
            self.rng.reset()
            self.rng.fast_forward(state['sobol'])

    def generator_state(self):
        """This rank's torch generators (the CPU's, and its GPU's)."""
        state = {'torch': torch.get_rng_state()}
        if self.device.type == 'cuda':
            state['cuda'] = torch.cuda.get_rng_state(self.device)
        return state

    def restore_generators(self, states):
        """Restores this rank's torch generators from every rank's saved `states`; returns
        this rank's state, or None (drawing afresh) when another number of ranks saved it."""
        if len(states) != self.trainer.world_size:
            rank_zero_warn(f'the checkpoint holds the random state of {len(states)} processes '
                           f'and this run has {self.trainer.world_size}; drawing afresh.')
            return None
        state = states[self.global_rank]
        torch.set_rng_state(state['torch'])
        if 'cuda' in state and self.device.type == 'cuda':
            torch.cuda.set_rng_state(state['cuda'], self.device)
        return state

    def on_train_start(self):
        self.set_learning_rate()  # --lr wins over the LR stored in a resumed checkpoint

    def set_learning_rate(self):
        """Sets the LR of this step; it follows from the step alone, so a resumed run (at
        any --lr) is on schedule."""
        lr = learning_rate(self.global_step, self.lr, **self.lr_schedule)
        for optimizer in self.trainer.optimizers:
            for group in optimizer.param_groups:
                group['lr'] = lr
        return lr

    def on_train_batch_start(self, batch, batch_idx):
        if self.saved_random is not None:
            # Restored here, not earlier: making the loader's iterator draws a seed.
            self.restore_random(self.saved_random)
            self.saved_random = None

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.even_epochs:
            # Every rank's epoch ends after this batch, without taking another: Lightning
            # broadcasts before each one, so a rank that went on to fetch one more (and
            # found the epoch over) would be a collective ahead of the rank that ran out,
            # and the two would wait for each other forever.
            progress = self.trainer.fit_loop.epoch_loop.batch_progress
            flag = torch.tensor([int(progress.is_last_batch)], device=self.device)
            progress.is_last_batch = bool(self.trainer.strategy.reduce(flag, reduce_op='max'))

    def training_step(self, batch, batch_idx):
        self.skipped_images += batch.get('skipped', 0)
        self.log('train/skipped_images', float(self.skipped_images), reduce_fx='sum',
                 sync_dist=True)
        n = batch_size_of(batch)
        self.check_for_data(n, n + batch.get('skipped', 0))
        if n:
            loss = self.v_loss(batch)
            self.log('train/loss', loss, prog_bar=True)
        else:
            # Every file of this batch was unreadable. A zero loss that still reaches every
            # weight keeps this rank in step with the others' gradient all-reduce under DDP.
            loss = sum(p.sum() for p in self.model.parameters()) * 0.0
        self.micro_batches += 1
        stepping = self.micro_batches % self.accumulate == 0
        strategy = self.trainer.strategy  # (only parallel strategies have a sync to skip)
        skip_sync = not stepping and isinstance(strategy, ParallelStrategy)
        with strategy.block_backward_sync() if skip_sync else nullcontext():
            self.manual_backward(loss / self.accumulate)
        if stepping:
            self.optimizer_step_or_skip()

    def v_loss(self, batch):
        """The v-objective on a batch of images or of cached latents."""
        x0, cond = latents_and_conditions(batch, self.ae_model, self.cloob,
                                          self.model.autoencoder_scale, self.text_prob)
        x0 = x0.contiguous(memory_format=self.memory_format)
        t = self.rng.draw(x0.shape[0])[:, 0].to(self.device)
        return v_objective(self.model, x0, cond, t)

    def optimizer_step_or_skip(self):
        """Steps the optimizer and the EMA, unless the gradients are not finite (or all zero:
        no rank had a readable image). Gradients are already all-reduced here, so every
        rank reaches the same decision without talking to the others."""
        optimizer = self.optimizers()
        norm = grad_norm(self.model)
        finite = bool(torch.isfinite(norm))
        # 16-bit: gradients are still scaled here; the GradScaler skips a non-finite step
        # itself (and lowers its scale), so it is given the step.
        if norm == 0 or not (finite or self.scaled_gradients):
            optimizer.zero_grad(set_to_none=True)
            if not finite:
                self.count_bad_step()
            return
        step = self.global_step
        self.log('train/lr', self.set_learning_rate())
        if self.offloaded_ema is not None:
            self.offloaded_ema.fence()  # the last weights are copied before they change
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if not finite:
            self.count_bad_step()
            return
        self.bad_steps_in_a_row = 0
        if self.offloaded_ema is not None:
            self.offloaded_ema.update(self.model, self.ema_decay(step))
        else:
            ema_update(self.model, self.model_ema, self.ema_decay(step))

    def ema_decay(self, step):
        """The EMA decay after optimizer step `step`."""
        return ema_decay(step, self.ema_decay_at)

    @property
    def scaled_gradients(self):
        return getattr(self.trainer.precision_plugin, 'scaler', None) is not None

    def on_before_optimizer_step(self, optimizer):
        # Called inside optimizer.step(), where 16-bit gradients are unscaled, so that
        # clipping sees their true norm.
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)

    def count_bad_step(self):
        self.skipped_steps += 1
        self.bad_steps_in_a_row += 1
        self.log('train/skipped_steps', float(self.skipped_steps))
        if self.bad_steps_in_a_row >= self.max_bad_steps:
            written = getattr(self.trainer.strategy.checkpoint_io, 'last_written', None)
            good = written or self.trainer.ckpt_path or 'none was written'
            raise RunError(f'the loss or the gradients were not finite for '
                           f'{self.bad_steps_in_a_row} steps in a row (at step '
                           f'{self.global_step}); '
                           f'the last good checkpoint is {good}. Resume from it with a lower '
                           '--lr or --fprecision 32.')

    def check_for_data(self, good, tried):
        """Stops the run when the first NO_DATA_BATCHES batches (all ranks together) held no
        readable image: a list of paths that do not exist trains on nothing."""
        if self.examples_seen is None:
            return
        self.examples_seen += good
        self.files_tried += tried
        epoch_done = self.trainer.num_training_batches == self.micro_batches + 1
        if self.micro_batches + 1 < NO_DATA_BATCHES and not epoch_done:
            return
        counts = torch.tensor([self.examples_seen, self.files_tried], device=self.device)
        seen, tried = (int(c) for c in self.trainer.strategy.reduce(counts, reduce_op='sum'))
        self.examples_seen = None  # checked once
        if not seen:
            raise RunError(f'none of the first {tried} training files could be read; check '
                           'that the data set is mounted and that the list holds image paths.')

    def on_train_end(self):
        if self.offloaded_ema is not None:
            self.offloaded_ema.wait()

    def on_save_checkpoint(self, checkpoint):
        # (The state dict shares the weights' memory: it is written after this returns.)
        if self.offloaded_ema is not None:
            self.offloaded_ema.wait()
        for name in ('model', 'model_ema'):
            if not all(torch.isfinite(p).all() for p in getattr(self, name).parameters()):
                raise RunError(f'the {name} weights hold non-finite values at step '
                               f'{self.global_step}; not writing a checkpoint of them.')
        state = checkpoint['state_dict']
        for key in [k for k in state if k.startswith(tuple(f'{m}.' for m in self.frozen))]:
            del state[key]
        for key in self.frozen_weights():
            del state[key]
        checkpoint['ccld'] = dict(self.record)
        checkpoint['ccld_random'] = gather_objects(self.random_state())

    def on_load_checkpoint(self, checkpoint):
        # Frozen weights come from the files given on the command line, not the checkpoint.
        state = checkpoint['state_dict']
        for key in [k for k in state if k.startswith(tuple(f'{m}.' for m in self.frozen))]:
            del state[key]
        for name in self.frozen:
            for key, value in getattr(self, name).state_dict().items():
                state[f'{name}.{key}'] = value
        current = self.state_dict()
        for key in self.frozen_weights():
            state[key] = current[key]
        # So does the autoencoder scale: --autoencoder-scale is required, and wins.
        for name in ('model', 'model_ema'):
            state[f'{name}.autoencoder_scale'] = getattr(self, name).autoencoder_scale.clone()
        count_steps_as_manual(checkpoint)
        self.saved_random = checkpoint.get('ccld_random')


def gather_objects(obj):
    """[obj of rank 0, obj of rank 1, ...]: every rank calls this at the same point."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def grad_norm(model):
    """The total 2-norm of a model's gradients (inf or nan if any is)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    return torch.nn.utils.get_total_norm(grads)


AUTOMATIC = 'epoch_loop.automatic_optimization.optim_progress'
MANUAL = 'epoch_loop.manual_optimization.optim_step_progress'


def count_steps_as_manual(checkpoint):
    """Checkpoints of the original script and of earlier ccld versions count their steps
    in Lightning's automatic-optimisation progress; this module optimises manually and
    counts them in the manual one, so the count moves over (else a resume restarts at 0)."""
    loop = checkpoint.get('loops', {}).get('fit_loop')
    if not loop or AUTOMATIC not in loop:
        return
    steps = loop[AUTOMATIC]['optimizer']['step']
    manual = loop.setdefault(MANUAL, copy.deepcopy(steps))
    if manual['total']['completed'] == 0:
        loop[MANUAL] = copy.deepcopy(steps)

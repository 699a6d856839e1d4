"""A diffusion problem small enough to learn on a CPU in seconds, with known answers.

The data are two 4x8x8 latents, each constant per channel, and each has its own unit
condition vector. A model that learned the v-objective then denoises a conditioned
latent almost exactly (the data given the condition is a single point), and its
unconditional prediction approaches the Bayes-optimal one for a two-point mixture,
which has a closed form. Shared by the learning tests and the sampler and distillation
benchmarks.
"""

import copy
import math
from types import SimpleNamespace

import torch
from torch import nn

from ccld.diffusion.distillation import distillation_loss
from ccld.diffusion.objective import drop_conditions
from ccld.models.student import student_of
from ccld.train.ema import distillation_ema_decay, ema_update
from ccld.diffusion.schedule import t_to_alpha_sigma
from ccld.train.diffusion_module import v_objective
from ccld.models.unet import DiffusionModel

CHANNEL_VALUES = [[1., -1., .5, -.5], [-1., 1., -.5, .5]]
SIZE = 8
STEPS, BATCH, LR, EMA_DECAY = 150, 16, 5e-4, 0.9


def problem(seed=0):
    """The two latents [2, 4, 8, 8] and their unit condition vectors [2, 512]."""
    data = torch.tensor(CHANNEL_VALUES)[:, :, None, None].expand(2, 4, SIZE, SIZE).contiguous()
    embeds = nn.functional.normalize(torch.randn([2, 512], generator=_generator(seed)), dim=1)
    return data, embeds


def _generator(seed):
    return torch.Generator().manual_seed(seed)


class DropoutCounter(nn.Module):
    """Passes calls through to a model, counting the conditions that arrive zeroed."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.seen = self.zeroed = 0

    def forward(self, x, t, cond):
        self.seen += cond.shape[0]
        self.zeroed += int((cond.abs().amax(dim=1) == 0).sum())
        return self.model(x, t, cond)


def direct_batches(data, embeds, batch=BATCH, seed=0):
    """Endless batches of (clean latents, conditions), both halves picked at random."""
    generator = _generator(seed)
    while True:
        pick = torch.randint(2, [batch], generator=generator)
        yield data[pick], embeds[pick]


def cached_batches(root, data, embeds, batch=BATCH, seed=0, copies=32, std=0.02):
    """Endless batches of (latents, conditions) read back from a latent cache holding
    `copies` records of each latent with posterior spread `std`, as training reads it."""
    from ccld.data import latent_cache
    from ccld.train.diffusion_module import latents_and_conditions
    records = [{'key': latent_cache.encode_key(f'{k}-{i}'), 'mean': data[k].half(),
                'std': torch.full_like(data[k], std).half(), 'embed': embeds[k].half()}
               for i in range(copies) for k in range(len(data))]
    stats = latent_cache.PartStats()  # (not used by the test; finalize needs them)
    stats.add(data.numel(), 0.0, data.numel())
    latent_cache.write_part(root, 0, records, 0, stats)
    latent_cache.finalize(root, 1, {'source': 'the learning problem'})
    loader = latent_cache.make_cache_loader(root, batch, num_workers=0, seed=seed)
    while True:
        for b in loader:
            yield latents_and_conditions(b, None, None, 1.0)


def train(batches, steps=STEPS, lr=LR, seed=0):
    """Trains a DiffusionModel with the training module's objective and EMA on (x0, cond)
    batches; returns the model, its EMA copy, the losses and the dropout count."""
    torch.manual_seed(seed)
    model = DiffusionModel(16, [4, 4, 4, 4])
    ema = copy.deepcopy(model).requires_grad_(False)
    counter = DropoutCounter(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, fused=True)
    sobol = torch.quasirandom.SobolEngine(1, scramble=True, seed=seed)
    losses = []
    for _, (x0, cond) in zip(range(steps), batches):
        loss = v_objective(counter, x0, cond, sobol.draw(x0.shape[0])[:, 0])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema_update(model, ema, EMA_DECAY)
        losses.append(loss.item())
    return SimpleNamespace(model=model, ema=ema.eval(), losses=losses,
                           dropped=counter.zeroed / counter.seen)


def distil(teacher, batches, stages, steps, lr, guidance_range=(1.0, 8.0), seed=0):
    """Distils `teacher` stage by stage as distill.py's module does (its loss, condition
    dropout, w drawn uniformly, timesteps from a Sobol sequence, its EMA): student_steps
    None is the guidance stage, N a round of N steps whose teacher is the previous stage's
    student. Returns the last student's EMA copy."""
    torch.manual_seed(seed)
    low, high = guidance_range
    for student_steps in stages:
        student = student_of(teacher).train()
        ema = copy.deepcopy(student).requires_grad_(False).eval()
        optimizer = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.01)
        sobol = torch.quasirandom.SobolEngine(1, scramble=True, seed=seed)
        for step, (x0, cond) in zip(range(steps), batches):
            n = x0.shape[0]
            cond = drop_conditions(cond)
            w = low + (high - low) * torch.rand(n)
            loss = distillation_loss(student, teacher, x0, cond, w, sobol.draw(n)[:, 0],
                                     torch.randn_like(x0), student_steps)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            ema_update(student, ema, distillation_ema_decay(step))
        teacher = ema
    return teacher


def noised_grid(data, seed=7, levels=19):
    """Every latent noised at `levels` timesteps in (0, 1), with fixed noise."""
    t = torch.linspace(0.05, 0.95, levels).repeat_interleave(len(data))
    x0 = data.repeat(levels, 1, 1, 1)
    noise = torch.randn(x0.shape, generator=_generator(seed))
    alpha, sigma = (s[:, None, None, None] for s in t_to_alpha_sigma(t))
    return x0, t, alpha * x0 + sigma * noise, alpha * noise - sigma * x0


def bayes_v(data, x, t):
    """The optimal unconditional v for the two-point mixture: v = (alpha x - E[x0|x]) / sigma."""
    alpha, sigma = (s[:, None, None, None] for s in t_to_alpha_sigma(t))
    sq = torch.stack([(x - alpha * d).flatten(1).pow(2).sum(1) for d in data], 1)
    posterior = torch.softmax(-sq / (2 * sigma.flatten()[:, None] ** 2), dim=1)
    x0 = torch.einsum('nk,k...->n...', posterior, data)
    return (alpha * x - x0) / sigma


@torch.no_grad()
def denoising_errors(model, data, embeds):
    """Mean squared v errors of `model` on the fixed grid: conditional (the exact answer
    is known), unconditional, and of the Bayes-optimal unconditional prediction."""
    x0, t, x, v = noised_grid(data)
    cond = embeds.repeat(len(t) // len(data), 1)
    return SimpleNamespace(
        cond=(model(x, t, cond) - v).pow(2).mean().item(),
        uncond=(model(x, t, torch.zeros_like(cond)) - v).pow(2).mean().item(),
        bayes_uncond=(bayes_v(data, x, t) - v).pow(2).mean().item(),
    )


def rms(a, b):
    return math.sqrt((a - b).pow(2).mean().item())


def finetune_lora(base, batches, rank=8, steps=STEPS, lr=LR, seed=0):
    """Trains LoRA adapters (models/lora.py, the default targets) on a copy of `base`, as
    the training module does (its objective, AdamW on the adapters alone, the EMA over
    them); returns the adapted EMA model."""
    from ccld.models import lora
    from ccld.train.ema import averaged_copy
    torch.manual_seed(seed)
    model = lora.add_adapter(copy.deepcopy(base).train(), rank, rank, lora.DEFAULT_TARGETS)
    ema = averaged_copy(model)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=lr, weight_decay=0.01)
    sobol = torch.quasirandom.SobolEngine(1, scramble=True, seed=seed)
    for _, (x0, cond) in zip(range(steps), batches):
        loss = v_objective(model, x0, cond, sobol.draw(x0.shape[0])[:, 0])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema_update(model, ema, EMA_DECAY)
    return ema.eval()

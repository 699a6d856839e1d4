"""The LightningModule of one distillation stage: a student learns what a frozen teacher
does in two calls (ccld.diffusion.distillation), from a latent cache.

It is the training module with another loss: manual optimisation that skips non-finite
steps, the EMA, per-rank random state in checkpoints, the frozen models left out of them
(the teacher too: it comes from its own file). The EMA starts short
(ema.distillation_ema_decay), so that a round ends with an average of the trained
student rather than of the weights it started from.
"""

import torch

from ..diffusion.distillation import distillation_loss
from ..diffusion.objective import drop_conditions
from .diffusion_module import FROZEN, LightningDiffusion, latents_and_conditions
from .ema import distillation_ema_decay


class LightningDistillation(LightningDiffusion):
    """Trains `student` (a StudentModel) against `teacher`: the teacher's guided v when
    student_steps is None (guidance distillation), else the teacher's two DDIM steps for
    each of the student's student_steps (a round of progressive distillation; the
    teacher is then the previous round's student). Guidance scales are drawn uniformly
    from `guidance_range`, conditions dropped as in training."""

    frozen = (*FROZEN, 'teacher')

    def __init__(self, ae_model, cloob, teacher, student, student_steps=None,
                 guidance_range=(1.0, 8.0), weighting='snr+1', **kwargs):
        base, mults = student.widths
        super().__init__(ae_model, cloob, base, mults, model=student, from_cache=True,
                         **kwargs)
        self.teacher = teacher.requires_grad_(False).eval()
        self.student_steps = student_steps
        self.guidance_range = tuple(guidance_range)
        self.weighting = weighting

    def ema_decay(self, step):
        return distillation_ema_decay(step, self.ema_decay_at)

    def v_loss(self, batch):
        x0, cond = latents_and_conditions(batch, self.ae_model, self.cloob,
                                          self.model.autoencoder_scale, self.text_prob)
        x0 = x0.contiguous(memory_format=self.memory_format)
        n = x0.shape[0]
        cond = drop_conditions(cond)
        low, high = self.guidance_range
        w = low + (high - low) * torch.rand(n, device=self.device)
        u = self.rng.draw(n)[:, 0].to(self.device)
        return distillation_loss(self.model, self.teacher, x0, cond, w, u,
                                 torch.randn_like(x0), self.student_steps, self.weighting)

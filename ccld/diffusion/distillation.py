"""Distillation targets in v on the cosine schedule: a student learns in one call what its
teacher does in two.

- Guidance distillation (Meng et al., "On Distillation of Guided Diffusion Models", CVPR
  2023): the target is the teacher's guided v, uncond + w (cond - uncond), for a w drawn
  from a range and given to the student as an input; one student call replaces two.
- Progressive distillation (Salimans & Ho, "Progressive Distillation for Fast Sampling of
  Diffusion Models", ICLR 2022): the student samples with N DDIM steps on the spliced
  schedule, the teacher with 2N, so every student step spans two teacher steps (the
  teacher's grid is the student's with a point between each two). The target is the v
  whose one DDIM step lands where the teacher's two land.

On this schedule x_t = alpha x0 + sigma eps and v = alpha eps - sigma x0, so the model's x0
is alpha x - sigma v, its error is sigma times v's, and Salimans & Ho's weightings of the
x0 error read in v: "SNR+1", (1 + alpha^2 / sigma^2) sigma^2 = 1, is the plain v error the
model was trained with; "truncated SNR", max(alpha^2 / sigma^2, 1) sigma^2 =
max(alpha^2, sigma^2), weighs the middle of the schedule half as much.
"""

import torch

from .schedule import sampling_timesteps, t_to_alpha_sigma

WEIGHTINGS = ('snr+1', 'truncated-snr')


def _per_example(values, like):
    """[n] values shaped to broadcast against a batch `like` [n, ...]."""
    values = torch.as_tensor(values, dtype=like.dtype, device=like.device)
    return values.expand(like.shape[:1]).reshape(-1, *[1] * (like.ndim - 1))


def noised(x0, t, noise):
    """x_t = alpha x0 + sigma noise."""
    alpha, sigma = (_per_example(s, x0) for s in t_to_alpha_sigma(t))
    return x0 * alpha + noise * sigma


def guided_v(v_uncond, v_cond, w):
    """Classifier-free guidance at scale w (one per example): uncond + w (cond - uncond)."""
    return v_uncond + _per_example(w, v_cond) * (v_cond - v_uncond)


def guidance_target(teacher, x, t, cond, w):
    """The teacher's guided v at x, t for conditions `cond` [n, d] and scales w [n]; its
    unconditional and conditional halves run as one batch. A zero condition (a dropped
    one) gives the unconditional v whatever w."""
    v = teacher(torch.cat([x, x]), torch.cat([t, t]),
                torch.cat([torch.zeros_like(cond), cond])).to(x.dtype)
    v_uncond, v_cond = v.chunk(2)
    return guided_v(v_uncond, v_cond, w)


def ddim_step(x, v, t, s):
    """Deterministic DDIM from t to s given the v prediction at x, t (to s = 0: the x0
    prediction)."""
    alpha, sigma = (_per_example(a, x) for a in t_to_alpha_sigma(t))
    alpha_s, sigma_s = (_per_example(a, x) for a in t_to_alpha_sigma(s))
    pred, eps = x * alpha - v * sigma, x * sigma + v * alpha
    return pred * alpha_s + eps * sigma_s


def v_for_step(x, x_s, t, s):
    """The v whose DDIM step takes x at t to x_s at s. The step is affine in v:
    x_s = (alpha_s alpha + sigma_s sigma) x + (sigma_s alpha - alpha_s sigma) v, and the
    coefficient of v is -sin(pi (t - s) / 2), nonzero for s < t."""
    alpha, sigma = (_per_example(a, x) for a in t_to_alpha_sigma(t))
    alpha_s, sigma_s = (_per_example(a, x) for a in t_to_alpha_sigma(s))
    return (x_s - (alpha_s * alpha + sigma_s * sigma) * x) / (sigma_s * alpha - alpha_s * sigma)


def progressive_target(teacher_fn, x, t, t_mid, s):
    """The v for one student step from t to s: two DDIM steps of teacher_fn(x, t) (t to
    t_mid to s), then the v whose single step lands on their result."""
    x_mid = ddim_step(x, teacher_fn(x, t).to(x.dtype), t, t_mid)
    x_s = ddim_step(x_mid, teacher_fn(x_mid, t_mid).to(x.dtype), t_mid, s)
    return v_for_step(x, x_s, t, s)


def student_grid(student_steps, index, device='cpu'):
    """(t, t_mid, s) of the student's steps `index` [n] (0 to student_steps - 1): the
    student's step i goes from its grid's timestep i to timestep i + 1 (the last one to
    t = 0), through the teacher's point between them. These are the timesteps DDIM takes
    with sampling_timesteps(student_steps) and (2 * student_steps)."""
    teacher = torch.cat([sampling_timesteps(2 * student_steps, device),
                         torch.zeros(1, device=device)])
    index = torch.as_tensor(index, device=device)
    return teacher[2 * index], teacher[2 * index + 1], teacher[2 * index + 2]


def loss_weight(t, weighting):
    """The weight of each example's squared v error for one of WEIGHTINGS."""
    if weighting == 'snr+1':
        return torch.ones_like(t)
    if weighting == 'truncated-snr':
        alpha, sigma = t_to_alpha_sigma(t)
        return torch.maximum(alpha ** 2, sigma ** 2)
    raise ValueError(f'unknown loss weighting {weighting!r}; use one of {WEIGHTINGS}')


def distillation_loss(student, teacher, x0, cond, w, u, noise, student_steps=None,
                      weighting='snr+1'):
    """The loss of one batch: clean latents x0, conditions (already dropped at random),
    guidance scales w [n], uniform draws u [n] in [0, 1) and noise like x0.

    student(x, t, cond, w) is trained. With student_steps None it learns the guided v of
    teacher(x, t, cond) at t = u (guidance distillation); else teacher(x, t, cond, w) is
    a student of 2 * student_steps and this one learns its two steps in one, at the step
    of its grid that u picks (progressive distillation).
    """
    with torch.no_grad():
        if student_steps is None:
            t = u
            x = noised(x0, t, noise)
            target = guidance_target(teacher, x, t, cond, w)
        else:
            index = (u * student_steps).long().clamp(max=student_steps - 1)
            t, t_mid, s = student_grid(student_steps, index, x0.device)
            x = noised(x0, t, noise)
            target = progressive_target(lambda x, t: teacher(x, t, cond, w), x, t, t_mid, s)
    error = (student(x, t, cond, w).to(target.dtype) - target).pow(2).flatten(1).mean(1)
    return (loss_weight(t, weighting) * error).mean()

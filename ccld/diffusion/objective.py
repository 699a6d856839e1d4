"""The training objective: v prediction on the cosine schedule, with the condition dropped
at random so that one model gives both halves of classifier-free guidance."""

import torch
from torch.nn import functional as F

from .schedule import t_to_alpha_sigma

COND_DROPOUT = 0.2


def drop_conditions(cond):
    """Zeroes each example's condition with probability COND_DROPOUT, so that the same
    model also learns the unconditional v that classifier-free guidance needs."""
    keep = torch.rand(cond.shape[0], device=cond.device) >= COND_DROPOUT
    return cond * keep[:, None].to(cond.dtype)


def v_objective(model, x0, cond, t):
    """MSE between the predicted and the true v for clean latents `x0` noised to times `t`,
    each example's condition dropped at random (drop_conditions)."""
    cond = drop_conditions(cond)
    alphas, sigmas = (s[:, None, None, None] for s in t_to_alpha_sigma(t))
    noise = torch.randn_like(x0)
    noised = x0 * alphas + noise * sigmas
    target = noise * alphas - x0 * sigmas
    return F.mse_loss(model(noised, t, cond).float(), target)

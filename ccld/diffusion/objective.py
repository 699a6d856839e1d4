"""The training objective: v prediction on the cosine schedule, with the condition dropped
at random so that one model gives both halves of classifier-free guidance."""

import torch
from torch.nn import functional as F

from .schedule import t_to_alpha_sigma

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

"""Cosine noise schedule and the spliced DDPM/cosine sampling schedule.

A timestep t in [0, 1] stands for alpha = cos(pi t / 2), sigma = sin(pi t / 2), so
alpha^2 + sigma^2 = 1 and t = 1 is pure noise.
"""

import math

import torch


def t_to_alpha_sigma(t):
    """The signal and noise levels of timestep t."""
    return torch.cos(t * math.pi / 2), torch.sin(t * math.pi / 2)


def alpha_sigma_to_t(alpha, sigma):
    """The timestep of a (signal, noise) pair."""
    return torch.atan2(sigma, alpha) * 2 / math.pi


def log_snr_to_alpha_sigma(log_snr):
    return log_snr.sigmoid().sqrt(), log_snr.neg().sigmoid().sqrt()


def get_ddpm_schedule(u):
    """Cosine-time equivalent of the continuous DDPM (linear beta) schedule at u."""
    log_snr = -torch.special.expm1(1e-4 + 10 * u ** 2).log()
    return alpha_sigma_to_t(*log_snr_to_alpha_sigma(log_snr))


# The two schedules have equal slope at these points, so splicing them there is smooth.
DDPM_CROSSOVER = 0.48536712
COSINE_CROSSOVER = 0.80074257


def get_spliced_ddpm_cosine_schedule(t):
    """Cosine schedule for low noise, DDPM schedule for high noise.

    Spends fewer sampling steps at very high noise levels, where the cosine schedule
    wastes them.
    """
    big_t = t * (1 + COSINE_CROSSOVER - DDPM_CROSSOVER)
    ddpm_part = get_ddpm_schedule(big_t + DDPM_CROSSOVER - COSINE_CROSSOVER)
    return torch.where(big_t < COSINE_CROSSOVER, big_t, ddpm_part)


def sampling_timesteps(steps, device='cpu'):
    """The `steps` timesteps, from noise towards data, used by the samplers."""
    t = torch.linspace(1, 0, steps + 1, device=device)[:-1]
    return get_spliced_ddpm_cosine_schedule(t)

"""Cosine noise schedule and the sampling schedules: spliced DDPM/cosine and Karras.

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


def spliced_timesteps(steps, device='cpu'):
    """The original's: t evenly spaced in (0, 1], mapped through the spliced schedule."""
    t = torch.linspace(1, 0, steps + 1, device=device)[:-1]
    return get_spliced_ddpm_cosine_schedule(t)


# Karras et al. 2022, eq. 5, in variance-exploding terms: sigma_VE = sigma / alpha = tan(pi t / 2).
KARRAS_SIGMA_MIN, KARRAS_SIGMA_MAX, KARRAS_RHO = 0.03, 80.0, 7.0


def karras_timesteps(steps, device='cpu'):
    """Timesteps whose sigma_VE run from 80 down to 0.03 evenly in sigma_VE^(1/7).

    The 7th root crowds the steps at low noise and spends few at high noise, which
    Karras et al. found best for images (on some data it is not: BENCHMARKS.md).
    """
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)  # on the CPU: MPS has no float64
    max_root, min_root = KARRAS_SIGMA_MAX ** (1 / KARRAS_RHO), KARRAS_SIGMA_MIN ** (1 / KARRAS_RHO)
    sigmas = (max_root + ramp * (min_root - max_root)) ** KARRAS_RHO
    return (sigmas.atan() * 2 / math.pi).float().to(device)


SCHEDULES = {'spliced': spliced_timesteps, 'karras': karras_timesteps}


def sampling_timesteps(steps, device='cpu', schedule='spliced'):
    """The `steps` timesteps, from noise towards data, used by the samplers."""
    return SCHEDULES[schedule](steps, device)

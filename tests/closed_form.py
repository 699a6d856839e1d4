"""Diffusion models whose v is known in closed form, and a sampler-independent reference
solver, for checking samplers against the probability-flow ODE itself.

The data are a mixture of isotropic Gaussians N(mu_k, s_k^2 I). Then x_t given the
component is N(alpha mu_k, D_k I) with D_k = alpha^2 s_k^2 + sigma^2, and the optimal
x0 and eps predictions are posterior-weighted sums of per-component linear maps. With
one component the ODE's solution is known too: z = (x_t - alpha mu) / sqrt(D) stays
constant along it. Shared by the sampler tests and bench/sampler_error.py.
"""

import math

import torch

from ccld.diffusion.schedule import t_to_alpha_sigma

SHAPE = (4, 8, 8)


def _pattern(seed):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


class GaussianMixture:
    """v(x, t) of the optimal model for a mixture of N(means[k], stds[k]^2 I)."""

    def __init__(self, means, stds, weights):
        self.means = torch.stack(means)
        self.stds = torch.tensor(stds, dtype=torch.float64)
        self.log_weights = torch.tensor(weights, dtype=torch.float64).log()

    def __call__(self, x, t, **extra_args):
        """Computed in float64, returned in x's dtype."""
        alpha, sigma = (s.double()[:, None] for s in t_to_alpha_sigma(t))  # [n, 1]
        flat = x.double().flatten(1)[:, None]  # [n, 1, d]
        means = self.means.flatten(1)[None]  # [1, K, d]
        var = alpha ** 2 * self.stds ** 2 + sigma ** 2  # [n, K]
        offset = flat - alpha[..., None] * means
        log_p = self.log_weights - flat.shape[-1] / 2 * var.log() \
            - offset.pow(2).sum(-1) / (2 * var)
        weight = (log_p.softmax(1) / var)[..., None]  # posterior / D_k
        eps = (weight * sigma[..., None] * offset).sum(1)
        x0 = (log_p.softmax(1)[..., None] * means).sum(1) + \
            (weight * alpha[..., None] * self.stds[:, None] ** 2 * offset).sum(1)
        return (alpha * eps - sigma * x0).view(x.shape).to(x.dtype)


def gaussian(mean_seed=0, std=0.5):
    """One Gaussian: latents of unit-ish scale around a fixed random pattern."""
    return GaussianMixture([_pattern(mean_seed)], [std], [1.0])


def mixture():
    """Two unequal components, one much narrower: the ODE must decide between them at
    high noise and then resolve the narrow one at low noise."""
    return GaussianMixture([_pattern(1), -0.5 * _pattern(2)], [0.1, 0.6], [0.3, 0.7])


def gaussian_solution(model, x, t_start=1.0):
    """The ODE's exact x0 for one Gaussian, from x at t_start."""
    alpha, sigma = t_to_alpha_sigma(torch.tensor(t_start, dtype=torch.float64))
    mean, std = model.means[0], model.stds[0]
    z = (x.double() - alpha * mean) / (alpha ** 2 * std ** 2 + sigma ** 2).sqrt()
    return mean + std * z


def noise(n, seed=0):
    return torch.randn([n, *SHAPE], generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def rk4(model, x, steps, t_from=1.0, t_to=0.0):
    """Solves dx/dt = (pi / 2) v(x, t), the probability-flow ODE of the cosine schedule
    (x_t = alpha x0 + sigma eps), from t_from to t_to with classic Runge-Kutta in `steps`
    even steps: a reference that shares nothing with the samplers under test. x is kept
    in float64; a network model sees float32."""
    dtype = torch.float64 if isinstance(model, GaussianMixture) else torch.float32
    x, ones = x.double(), x.new_ones([x.shape[0]], dtype=dtype)
    ts = torch.linspace(t_from, t_to, steps + 1, dtype=torch.float64)

    def f(x, t):
        return math.pi / 2 * model(x.to(dtype), ones * t).double()

    for t, t_next in zip(ts[:-1], ts[1:]):
        h = t_next - t
        k1 = f(x, t)
        k2 = f(x + h / 2 * k1, t + h / 2)
        k3 = f(x + h / 2 * k2, t + h / 2)
        k4 = f(x + h * k3, t_next)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x

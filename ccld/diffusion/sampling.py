"""Samplers for v-objective diffusion models.

`steps` is always a 1-D tensor of timesteps from noise towards data (see
`schedule.sampling_timesteps`); `model(x, t, **extra_args)` returns v. DDPM/DDIM work
in v space; the pseudo linear multistep family (PRK, PLMS, PIE, PLMS2, iPLMS) works in
eps space and goes one step further, to t = 0, unless `is_reverse` (noising an image,
for which the caller gives the target timesteps itself); DPM-Solver++(2M) works on x0
predictions and also ends at t = 0.
"""

import math
from contextlib import nullcontext

import torch
from tqdm.auto import trange

from .schedule import t_to_alpha_sigma


def _append_dims(x, ndim):
    return x[(...,) + (None,) * (ndim - x.ndim)]


def _autocast(device):
    """fp16 autocast on CUDA as the original did; elsewhere numbers stay in float32."""
    if device.type == 'cuda':
        return torch.autocast('cuda', dtype=torch.float16)
    return nullcontext()


def _v_model_fn(model, device):
    def model_fn(x, t, **extra_args):
        with _autocast(device):
            return model(x, t, **extra_args).float()
    return model_fn


def _eps_model_fn(model, device):
    v_fn = _v_model_fn(model, device)

    def eps_fn(x, t, **extra_args):
        alphas, sigmas = t_to_alpha_sigma(t)
        v = v_fn(x, t, **extra_args)
        return x * _append_dims(sigmas, x.ndim) + v * _append_dims(alphas, x.ndim)
    return eps_fn


def _transfer(x, eps, t_1, t_2):
    """Moves x from t_1 to t_2 along a fixed eps; also returns the implied x0."""
    alphas, sigmas = t_to_alpha_sigma(t_1)
    next_alphas, next_sigmas = t_to_alpha_sigma(t_2)
    pred = (x - eps * _append_dims(sigmas, x.ndim)) / _append_dims(alphas, x.ndim)
    x = pred * _append_dims(next_alphas, x.ndim) + eps * _append_dims(next_sigmas, x.ndim)
    return x, pred


@torch.no_grad()
def sample(model, x, steps, eta, extra_args, callback=None, progress=True):
    """DDPM (eta=1) or DDIM (eta=0) sampling; returns the final x0 prediction."""
    ts = x.new_ones([x.shape[0]])
    alphas, sigmas = t_to_alpha_sigma(steps)
    model_fn = _v_model_fn(model, x.device)
    for i in trange(len(steps), disable=not progress):
        v = model_fn(x, ts * steps[i], **extra_args)
        pred = x * alphas[i] - v * sigmas[i]
        eps = x * sigmas[i] + v * alphas[i]
        if callback is not None:
            callback({'x': x, 'i': i, 't': steps[i], 'v': v, 'pred': pred})
        if i < len(steps) - 1:
            ddim_sigma = eta * (sigmas[i + 1] ** 2 / sigmas[i] ** 2).sqrt() * \
                (1 - alphas[i] ** 2 / alphas[i + 1] ** 2).sqrt()
            adjusted_sigma = (sigmas[i + 1] ** 2 - ddim_sigma ** 2).sqrt()
            x = pred * alphas[i + 1] + eps * adjusted_sigma
            if eta:
                x = x + torch.randn_like(x) * ddim_sigma
    return pred


@torch.no_grad()
def reverse_sample(model, x, steps, extra_args, callback=None, progress=True):
    """Deterministic DDIM run backwards: maps an x0 at steps[0] to noise at steps[-1]."""
    ts = x.new_ones([x.shape[0]])
    alphas, sigmas = t_to_alpha_sigma(steps)
    model_fn = _v_model_fn(model, x.device)
    for i in trange(len(steps) - 1, disable=not progress):
        v = model_fn(x, ts * steps[i], **extra_args)
        pred = x * alphas[i] - v * sigmas[i]
        eps = x * sigmas[i] + v * alphas[i]
        if callback is not None:
            callback({'x': x, 'i': i, 't': steps[i], 'v': v, 'pred': pred})
        x = pred * alphas[i + 1] + eps * sigmas[i + 1]
    return x


def _prk_step(eps_fn, x, old_eps, t_1, t_2, extra_args):
    """Fourth-order pseudo Runge-Kutta: four model calls."""
    t_mid = (t_2 + t_1) / 2
    eps_1 = eps_fn(x, t_1, **extra_args)
    x_1, _ = _transfer(x, eps_1, t_1, t_mid)
    eps_2 = eps_fn(x_1, t_mid, **extra_args)
    x_2, _ = _transfer(x, eps_2, t_1, t_mid)
    eps_3 = eps_fn(x_2, t_mid, **extra_args)
    x_3, _ = _transfer(x, eps_3, t_1, t_2)
    eps_4 = eps_fn(x_3, t_2, **extra_args)
    eps_prime = (eps_1 + 2 * eps_2 + 2 * eps_3 + eps_4) / 6
    x_new, pred = _transfer(x, eps_prime, t_1, t_2)
    return x_new, eps_prime, pred


def _pie_step(eps_fn, x, old_eps, t_1, t_2, extra_args):
    """Second-order pseudo improved Euler (Heun): two model calls."""
    eps_1 = eps_fn(x, t_1, **extra_args)
    x_1, _ = _transfer(x, eps_1, t_1, t_2)
    eps_2 = eps_fn(x_1, t_2, **extra_args)
    eps_prime = (eps_1 + eps_2) / 2
    x_new, pred = _transfer(x, eps_prime, t_1, t_2)
    return x_new, eps_prime, pred


# Adams-Bashforth coefficients by order, newest eps first.
_AB_COEFFS = {
    1: (1,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


def _linear_multistep(order):
    """A step that combines this eps with the last order-1 ones; one model call."""
    def step(eps_fn, x, old_eps, t_1, t_2, extra_args):
        eps = eps_fn(x, t_1, **extra_args)
        history = [eps, *reversed(old_eps[-(order - 1):])] if order > 1 else [eps]
        eps_prime = sum(c * e for c, e in zip(_AB_COEFFS[order], history))
        x_new, _ = _transfer(x, eps_prime, t_1, t_2)
        _, pred = _transfer(x, eps, t_1, t_2)
        return x_new, eps, pred
    return step


def _multistep_sample(choose_step, history, model, x, steps, extra_args, is_reverse,
                      callback, progress):
    """Shared loop: `choose_step(n_old)` picks the step given how many old eps exist."""
    ts = x.new_ones([x.shape[0]])
    eps_fn = _eps_model_fn(model, x.device)
    if not is_reverse:
        steps = torch.cat([steps, steps.new_zeros([1])])
    old_eps = []
    for i in trange(len(steps) - 1, disable=not progress):
        step = choose_step(len(old_eps))
        x, eps, pred = step(eps_fn, x, old_eps, steps[i] * ts, steps[i + 1] * ts, extra_args)
        old_eps = (old_eps + [eps])[-history:] if history else []
        if callback is not None:
            callback({'x': x, 'i': i, 't': steps[i], 'pred': pred})
    return x


def _sampler(choose_step, history, doc):
    @torch.no_grad()
    def sampler(model, x, steps, extra_args, is_reverse=False, callback=None, progress=True):
        return _multistep_sample(choose_step, history, model, x, steps, extra_args,
                                 is_reverse, callback, progress)
    sampler.__doc__ = doc
    return sampler


prk_sample = _sampler(lambda n: _prk_step, 0,
                      'Pseudo Runge-Kutta (4th order, 4 model calls a step).')
pie_sample = _sampler(lambda n: _pie_step, 0,
                      'Pseudo improved Euler (2nd order, 2 model calls a step).')
plms_sample = _sampler(lambda n: _prk_step if n < 3 else _linear_multistep(4), 3,
                       'Pseudo linear multistep, 4th order, started with three PRK steps.')
plms2_sample = _sampler(lambda n: _pie_step if n < 1 else _linear_multistep(2), 1,
                        'Pseudo linear multistep, 2nd order, started with one PIE step.')
iplms_sample = _sampler(lambda n: _linear_multistep(min(n + 1, 4)), 3,
                        'Pseudo linear multistep whose order grows from 1 to 4; '
                        'one model call from the first step.')


@torch.no_grad()
def dpmpp_2m_sample(model, x, steps, extra_args, callback=None, progress=True):
    """DPM-Solver++(2M) (Lu et al. 2022; k-diffusion's sample_dpmpp_2m) on this schedule:
    one model call a step.

    With lambda = log(alpha / sigma) and the model's x0 = alpha x - sigma v, the
    probability-flow ODE reads d(x / sigma) / d lambda = e^lambda x0, so from t to s,
    with h = lambda_s - lambda_t,
        x_s = (sigma_s / sigma_t) x_t + sigma_s * integral_{lambda_t}^{lambda_s} e^lambda x0.
    Holding x0 fixed gives the first-order step (DDIM):
        x_s = (sigma_s / sigma_t) x_t - alpha_s expm1(-h) x0.
    The multistep step replaces x0 by the line through the last two predictions, read at
    the middle of the step: D = x0 + (x0 - x0_prev) / (2 r), r = h_prev / h. The first
    step has no previous prediction and the last, to t = 0 (sigma_s = 0, lambda_s = inf),
    is first order, which makes it return that step's x0 prediction.
    """
    ts = x.new_ones([x.shape[0]])
    model_fn = _v_model_fn(model, x.device)
    # Coefficients in float64 (where alpha(1) > 0, so lambda is finite even at t = 1).
    t = torch.cat([steps.cpu().double(), torch.zeros(1, dtype=torch.float64)])
    alphas, sigmas = t_to_alpha_sigma(t)
    lambdas = (alphas.log() - sigmas.log()).tolist()
    alphas, sigmas = alphas.tolist(), sigmas.tolist()
    old_pred = None
    for i in trange(len(steps), disable=not progress):
        v = model_fn(x, ts * steps[i], **extra_args)
        pred = x * alphas[i] - v * sigmas[i]
        if callback is not None:
            callback({'x': x, 'i': i, 't': steps[i], 'v': v, 'pred': pred})
        h = lambdas[i + 1] - lambdas[i]
        denoised = pred
        if old_pred is not None and i < len(steps) - 1:
            r = (lambdas[i] - lambdas[i - 1]) / h
            denoised = pred + (pred - old_pred) / (2 * r)
        x = x * (sigmas[i + 1] / sigmas[i]) - denoised * (alphas[i + 1] * math.expm1(-h))
        old_pred = pred
    return x


SAMPLERS = {
    'prk': prk_sample,
    'plms': plms_sample,
    'pie': pie_sample,
    'plms2': plms2_sample,
    'iplms': iplms_sample,
    'dpmpp_2m': dpmpp_2m_sample,
}
METHODS = ('ddpm', 'ddim', *SAMPLERS)
# Half the model calls of the default (PLMS, 50 steps: 59), chosen by
# bench/sampler_error.py: closer than the default to the exact ODE solution with a trained
# network, further (but within ~5e-3 RMS) on closed-form data; see BENCHMARKS.md.
PREVIEW = {'method': 'plms2', 'schedule': 'karras', 'steps': 25}


def sample_latents(model_fn, x, steps, method, eta=0.0, progress=True, callback=None):
    """Runs `method` (one of METHODS) from x at steps[0] down to clean latents.
    `callback(info)` is called after each step's model calls (info['i'] is the step); an
    exception it raises ends the sampling there, which is how a web page stops a job."""
    if method == 'ddpm':
        return sample(model_fn, x, steps, 1.0, {}, callback=callback, progress=progress)
    if method == 'ddim':
        return sample(model_fn, x, steps, eta, {}, callback=callback, progress=progress)
    return SAMPLERS[method](model_fn, x, steps, {}, callback=callback, progress=progress)

"""Classifier-free guidance over any number of weighted conditions, by a model that gives
both halves of it or by a guidance-distilled student that gives the guided v itself."""

import torch


def _per_condition(model, embeds, x, t, *extra):
    """model's v [k, n, ...] for each of the k conditions of `embeds`, run as one batch.

    embeds: [k, d] (one embedding per condition, shared by the batch) or [k, n, d] (a
    condition per sample); `extra` are further inputs, one value per condition."""
    k, n = embeds.shape[0], x.shape[0]
    x_in = x.repeat(k, *[1] * (x.ndim - 1))
    e_in = embeds.expand(k, n, embeds.shape[-1]) if embeds.ndim == 3 else \
        embeds[:, None].expand(k, n, embeds.shape[-1])
    extra = [value[:, None].expand(k, n).reshape(k * n) for value in extra]
    v = model(x_in, t.repeat(k), e_in.reshape(k * n, -1), *extra).float()
    return v.view(k, n, *x.shape[1:])


def cfg_model_fn(model, embeds, weights):
    """Wraps a DiffusionModel as v(x, t) guided towards `embeds`.

    embeds: [k, d] (one embedding per condition, shared by the batch) or [k, n, d]
    (a condition per sample). weights: k floats. The unconditional (zero) embedding
    gets weight 1 - sum(weights), so one condition at scale s gives
    v_uncond + s * (v_cond - v_uncond). All k + 1 evaluations run as one batch.
    """
    weights = torch.as_tensor(weights, dtype=torch.float32, device=embeds.device)
    embeds = torch.cat([torch.zeros_like(embeds[:1]), embeds])
    weights = torch.cat([1 - weights.sum(0, keepdim=True), weights])

    def model_fn(x, t):
        return torch.einsum('k,kn...->n...', weights, _per_condition(model, embeds, x, t))
    return model_fn


def distilled_cfg_model_fn(model, embeds, weights):
    """The same guided v from a student model(x, t, embed, w) that gives
    v_uncond + w (v_cond - v_uncond) in one call: k conditions, k calls, no
    unconditional one.

    With W = sum(weights), the guided v is v_uncond + sum_i w_i (v_i - v_uncond)
    = sum_i (w_i / W) [v_uncond + W (v_i - v_uncond)], a mean of the student's outputs at
    scale W. When W = 0 that does not exist, and the student's conditional outputs
    (w = 1) are guided as a DiffusionModel's are.
    """
    weights = torch.as_tensor(weights, dtype=torch.float32, device=embeds.device)
    total = weights.sum()
    if total == 0:
        return cfg_model_fn(model, embeds, weights)
    scales = total.expand(len(weights))

    def model_fn(x, t):
        v = _per_condition(model, embeds, x, t, scales.to(t.dtype))
        return torch.einsum('k,kn...->n...', weights / total, v)
    return model_fn

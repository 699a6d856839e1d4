"""Classifier-free guidance over any number of weighted conditions."""

import torch


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
        k, n = embeds.shape[0], x.shape[0]
        x_in = x.repeat(k, *[1] * (x.ndim - 1))
        e_in = embeds.expand(k, n, embeds.shape[-1]) if embeds.ndim == 3 else \
            embeds[:, None].expand(k, n, embeds.shape[-1])
        v = model(x_in, t.repeat(k), e_in.reshape(k * n, -1)).float()
        v = v.view(k, n, *x.shape[1:])
        return torch.einsum('k,kn...->n...', weights, v)
    return model_fn

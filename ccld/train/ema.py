"""Exponential moving average of the model weights, with the original's decay schedule."""

import torch


def ema_decay(step, decay_at=200_000):
    """0.99 for the first 20k steps, 0.999 until `decay_at`, then 0.9999.

    A fast start lets the average catch up with a quickly changing young model.
    """
    if step < 20_000:
        return 0.99
    if step < decay_at:
        return 0.999
    return 0.9999


def distillation_ema_decay(step, decay_at=200_000):
    """ema_decay, shortened at the start to (1 + step) / (10 + step): a distillation round
    of a few thousand steps then ends with an average of the trained student, not of the
    teacher's weights it started from."""
    return min(ema_decay(step, decay_at), (1 + step) / (10 + step))


@torch.no_grad()
def ema_update(model, averaged_model, decay):
    """averaged = decay * averaged + (1 - decay) * model; buffers are copied."""
    params = dict(model.named_parameters())
    for name, avg in averaged_model.named_parameters():
        avg.lerp_(params[name].detach().to(avg.dtype), 1 - decay)
    buffers = dict(model.named_buffers())
    for name, avg in averaged_model.named_buffers():
        avg.copy_(buffers[name])


def averaged_copy(model):
    """The frozen copy of `model` that ema_update averages into. Parameters that do not
    train in `model` (a LoRA run's base) are shared with it, not copied: the average of a
    constant is the constant, and a base held twice would double its memory."""
    import copy
    averaged = copy.deepcopy(model).requires_grad_(False).eval()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            owner, _, attr = name.rpartition('.')
            setattr(averaged.get_submodule(owner), attr, p)
    return averaged

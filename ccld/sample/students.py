"""How a checkpoint samples when the flags leave the sampler open, and the rules of a
distilled student (distill.py).

A progressive student was distilled for one thing: DDIM (eta 0) with its own number of
steps on the spliced schedule, one U-Net call a step. It samples with those by default
and refuses any other sampler, step count or schedule in one line. A guidance-distilled
student (the first stage) is a diffusion model that takes w as an input: it samples with
any sampler, one call a step instead of two. Either takes --cond-scale (the weights of
the prompts) as w, with a warning outside the range it was distilled for.
"""

import warnings

from ..diffusion.guidance import distilled_cfg_model_fn
from ..errors import UserError

DEFAULT_METHOD, DEFAULT_STEPS = 'plms', 50
STUDENT_METHOD, STUDENT_SCHEDULE = 'ddim', 'spliced'


def sampler_for(record, method, steps, schedule, eta, checkpoint,
                drop='--method, --steps, --schedule and --eta'):
    """(method, steps) to sample a checkpoint whose record is `record` with, from the
    flags (method and steps None where not given). UserError for a sampler a student was
    not distilled for, which asks to drop what `drop` names."""
    distilled = record.get('student_steps')
    if not is_progressive(record):
        method, steps = method or DEFAULT_METHOD, steps or DEFAULT_STEPS
        if eta and method != 'ddim':
            warnings.warn(f'--eta applies to --method ddim only; {method} ignores it.')
        return method, steps
    if method not in (None, STUDENT_METHOD) or steps not in (None, distilled) or \
            schedule != STUDENT_SCHEDULE or eta:
        raise UserError(f'{checkpoint} is a student distilled for {steps_text(distilled)} of '
                        'DDIM (eta 0) on the spliced schedule and samples with nothing else; '
                        f'drop {drop}.')
    return STUDENT_METHOD, distilled


def is_progressive(record):
    """Whether a checkpoint's record is a progressive student's (one sampler only)."""
    return record.get('student_steps') is not None


def steps_text(steps):
    return f'{steps} step' + ('' if steps == 1 else 's')


def guided_model_fn(model, embeds, weights):
    """v(x, t) of a StudentModel guided towards the weighted embeddings, one call a step
    per condition; warns when the guidance scale (the sum of the weights) lies outside
    the range the student was distilled for."""
    scale = float(sum(weights))
    known = model.guidance_range
    if known is not None and not known[0] <= scale <= known[1]:
        warnings.warn(f'guidance scale {scale:g} is outside the range {known[0]:g} to '
                      f'{known[1]:g} this student was distilled for; expect images unlike '
                      "its teacher's.")
    return distilled_cfg_model_fn(model, embeds, weights)

#!/usr/bin/env python3
"""How far each deterministic sampler lands from the exact solution of the
probability-flow ODE, for every schedule and step count, counting model calls.

    PYTHONPATH=. python3 bench/sampler_error.py

Three problems with fixed noise: (a) Gaussian data N(mu, 0.5^2 I), whose ODE solution
is known in closed form; (b) a two-component Gaussian mixture (closed-form v; the
reference is 2000 classic Runge-Kutta steps); (c) the model tests/learning.py trains,
guided at scale 3 as sample.py does (reference: 500 Runge-Kutta steps). Each reference
starts from the noise at t = 1, and each sampler starts from that same trajectory at
its schedule's first timestep, so the table measures the samplers' discretization error
alone; what starting from raw noise there instead costs is shown on the Gaussian.
Prints markdown tables and the settings chosen from them.
"""

import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / 'tests')]

import closed_form  # noqa: E402
import learning  # noqa: E402
from ccld.diffusion.guidance import cfg_model_fn  # noqa: E402
from ccld.diffusion.sampling import PREVIEW, sample_latents  # noqa: E402
from ccld.diffusion.schedule import SCHEDULES, sampling_timesteps  # noqa: E402

METHODS = ('ddim', 'plms', 'prk', 'pie', 'plms2', 'iplms', 'dpmpp_2m')  # ddpm is stochastic
STEPS = (8, 10, 15, 20, 25, 50)
DEFAULT = ('plms', 'spliced', 50)
GUIDANCE = 3.0  # sample.py's default --cond-scale
GAUSSIAN_STDS = (0.05, 0.1, 0.2, 0.5, 1.0)


class Counted:
    """A model function that counts its calls."""

    def __init__(self, model_fn):
        self.model_fn, self.calls = model_fn, 0

    def __call__(self, x, t, **extra_args):
        self.calls += 1
        return self.model_fn(x, t, **extra_args)


def rms(a, b):
    return (a.double() - b.double()).pow(2).mean().sqrt().item()


def run(model, x, setting):
    """(final x0, model calls) of one (method, schedule, steps) setting from x."""
    method, schedule, steps = setting
    counted = Counted(model)
    out = sample_latents(counted, x, sampling_timesteps(steps, x.device, schedule), method,
                         progress=False)
    return out, counted.calls


def first_timestep(schedule):
    return sampling_timesteps(1, schedule=schedule).item()


def starts(model, noise):
    """x at each schedule's first timestep on the trajectory from `noise` at t = 1."""
    return {schedule: closed_form.rk4(model, noise, 10, 1.0, first_timestep(schedule)).float()
            for schedule in SCHEDULES}


def trained_problem(per_condition=2):
    """The learning test's EMA model guided towards each latent's condition."""
    data, embeds = learning.problem()
    model = learning.train(learning.direct_batches(data, embeds)).ema.requires_grad_(False)
    conds = embeds.repeat_interleave(per_condition, 0)
    guided = cfg_model_fn(model, conds[None], [GUIDANCE])
    return lambda x, t, **extra_args: guided(x, t), len(conds)


def problems():
    """(name, v model, samples, reference steps, coarser steps to show it converged)."""
    trained, n = trained_problem()
    return [('gaussian', closed_form.gaussian(), 64, 2000, 1000),
            ('mixture', closed_form.mixture(), 64, 2000, 1000),
            ('trained', trained, n, 500, 125)]


def measure(name, model, n, ref_steps, check_steps):
    """Errors {(method, schedule, steps): (rms, calls)} and a note on the reference."""
    noise = closed_form.noise(n)
    reference = closed_form.rk4(model, noise, ref_steps)
    check = rms(closed_form.rk4(model, noise, check_steps), reference)
    note = f'{name}: reference = {ref_steps} RK4 steps; {check_steps} steps differ by {check:.1e}'
    if name == 'gaussian':
        exact = closed_form.gaussian_solution(model, noise)
        note += f', the exact solution by {rms(exact, reference):.1e}'
    x = starts(model, noise)
    errors = {}
    for schedule in SCHEDULES:
        for method in METHODS:
            for steps in STEPS:
                out, calls = run(model, x[schedule], (method, schedule, steps))
                errors[method, schedule, steps] = rms(out, reference), calls
    return errors, note


def cheaper_than_default(results):
    """{setting: (calls, the problems on which it is at least as close as PLMS-50)} for
    the settings with fewer calls than PLMS-50."""
    first = next(iter(results.values()))
    return {s: (calls, [n for n, r in results.items() if r[s][0] <= r[DEFAULT][0]])
            for s, (_, calls) in first.items() if calls < first[DEFAULT][1]}


def choose(results):
    """(the fewest-call setting at least as close as PLMS-50 on every problem, or None;
    the preview setting: of those with at most half PLMS-50's calls, the one at least as
    close on the most problems, then with the fewest calls)."""
    cheaper = cheaper_than_default(results)
    default_calls = next(iter(results.values()))[DEFAULT][1]
    good = [s for s, (calls, wins) in cheaper.items() if len(wins) == len(results)]
    strict = min(good, key=lambda s: cheaper[s][0]) if good else None
    half = [s for s, (calls, _) in cheaper.items() if 2 * calls <= default_calls]
    preview = min(half, key=lambda s: (-len(cheaper[s][1]), cheaper[s][0]))
    return strict, preview


def markdown(head, rows):
    lines = ['| ' + ' | '.join(head) + ' |', '|' + ' --- |' * len(head)]
    return '\n'.join(lines + ['| ' + ' | '.join(map(str, row)) + ' |' for row in rows])


def error_table(results):
    names = list(results)
    first = results[names[0]]
    rows = []
    for s in sorted(first, key=lambda s: (first[s][1], s)):
        worst = max(results[n][s][0] / results[n][DEFAULT][0] for n in names)
        label = f'**{s[0]}**' if s == DEFAULT else s[0]
        rows.append([label, s[1], s[2], first[s][1],
                     *(f'{results[n][s][0]:.2e}' for n in names), f'{worst:.2g}'])
    return markdown(['method', 'schedule', 'steps', 'calls', *names, 'worst / PLMS-50'], rows)


def describe(setting, results):
    errors = ', '.join(f'{n} {r[setting][0]:.2e} (PLMS-50: {r[DEFAULT][0]:.2e})'
                       for n, r in results.items())
    method, schedule, steps = setting
    calls = next(iter(results.values()))[setting][1]
    return f'--method {method} --schedule {schedule} --steps {steps}: {calls} calls; {errors}'


def gaussian_extras(settings):
    """The settings on Gaussians of other spreads; on the benchmark's Gaussian, how far
    starting from raw noise at a schedule's first timestep moves the result, and the
    settings' errors from raw noise."""
    noise = closed_form.noise(64)
    rows = []
    for std in GAUSSIAN_STDS:
        model = closed_form.gaussian(std=std)
        exact = closed_form.gaussian_solution(model, noise)
        x = starts(model, noise)
        rows.append([std, *(f'{rms(run(model, x[s[1]], s)[0], exact):.2e}' for s in settings)])
    model = closed_form.gaussian()
    exact = closed_form.gaussian_solution(model, noise)
    offsets = {schedule: rms(closed_form.gaussian_solution(model, noise, first_timestep(schedule)),
                             exact) for schedule in SCHEDULES}
    raw = [rms(run(model, noise, s)[0], exact) for s in settings]
    head = ['s', *(f'{m} {sch} {n}' for m, sch, n in settings)]
    return markdown(head, rows), offsets, raw


def main():
    begin = time.time()
    torch.set_num_threads(1)  # tiny models run as fast on one thread, and reproducibly
    results, notes = {}, []
    cases = problems()
    with torch.inference_mode():
        for name, model, n, ref_steps, check_steps in cases:
            results[name], note = measure(name, model, n, ref_steps, check_steps)
            notes.append(note)
            print(f'{name}: done at {time.time() - begin:.0f} s', file=sys.stderr)
        strict, preview = choose(results)
        extra = [DEFAULT, preview, ('plms', 'spliced', 10), ('plms', 'karras', 10)]
        spreads, offsets, raw = gaussian_extras(extra)
    print('RMS error of the final x0 against the reference (fixed noise); calls = model '
          'calls, counted. Sorted by calls.\n')
    print(error_table(results))
    print('\n' + '\n'.join(f'- {note}' for note in notes))
    for schedule in SCHEDULES:
        print(f'- {schedule} starts at t = {first_timestep(schedule):.4f}; from raw noise there '
              f'(as sample.py does) the exact Gaussian result moves by {offsets[schedule]:.1e}')
    print(f'- from raw noise, the Gaussian errors against the exact solution from t = 1: '
          f'PLMS-50 {raw[0]:.2e}, preview {raw[1]:.2e}')
    print('\nThe same on Gaussians N(mu, s^2 I) of other spreads s (error against the exact '
          'solution):\n')
    print(spreads)
    print('\nfewest calls at least as close as PLMS-50 on every problem: '
          + (describe(strict, results) if strict else 'none'))
    wins = cheaper_than_default(results)[preview][1]
    print(f'preview (at most half the calls; at least as close as PLMS-50 on '
          f'{", ".join(wins) or "no problem"}): {describe(preview, results)}')
    documented = tuple(PREVIEW[k] for k in ('method', 'schedule', 'steps'))
    print('ccld.diffusion.sampling.PREVIEW: ' + ('the same' if documented == preview else
                                       f'{documented}, which differs: update it'))
    print(f'\n{time.time() - begin:.0f} s', file=sys.stderr)


if __name__ == '__main__':
    main()

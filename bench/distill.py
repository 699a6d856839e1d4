#!/usr/bin/env python3
"""How close a distilled student's few-step samples land to its teacher's default, against
the teacher's own samplers at the same and at 4x the U-Net calls; and what distilling costs.

    PYTHONPATH=. python3 bench/distill.py                 # CPU; see BENCHMARKS.md for the time
    PYTHONPATH=. python3 bench/distill.py --round-steps 600 --teacher-steps 600

In one run: a teacher is trained on the learning problem of tests/learning.py (two 4x8x8
latents, each with its own condition: the known answer is the latent of the condition),
then distill.py itself distils it from a latent cache of those latents (guidance stage,
then rounds from --start-steps to 2 steps), on the CPU, with tiny random frozen models
that only fill distill.py's flags (the cache holds the latents and embeddings). For the
same starting noise and conditions, guided at scale 3 as sample.py does, every setting's
final latents are compared (RMS) with the teacher's default, PLMS with 50 steps (59 guided
steps, 118 U-Net calls). A guided teacher step costs 2 calls (conditional and
unconditional); a student step 1. Prints markdown tables.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / 'tests')]

import learning  # noqa: E402
import tiny  # noqa: E402
from ccld.data import latent_cache  # noqa: E402
from ccld.diffusion.guidance import cfg_model_fn, distilled_cfg_model_fn  # noqa: E402
from ccld.diffusion.sampling import sample_latents  # noqa: E402
from ccld.diffusion.schedule import sampling_timesteps  # noqa: E402
from ccld.models.autoencoder import describe as describe_autoencoder  # noqa: E402
from ccld.models.cloob import describe as describe_cloob  # noqa: E402

GUIDANCE = 3.0  # sample.py's default --cond-scale
DEFAULT = ('plms', 50)
SAMPLES_PER_CONDITION = 8
TEACHER_METHODS = ('ddim', 'dpmpp_2m', 'iplms', 'plms')


def calls_per_image(method, steps, guided):
    """U-Net calls of one image: PLMS starts with three 4-call PRK steps; a guided step
    runs the conditional and the unconditional half."""
    calls = steps + 9 if method == 'plms' and steps >= 3 else \
        4 * steps if method == 'plms' else steps
    return calls * (2 if guided else 1)


def steps_for(method, calls):
    """The guided teacher's steps of `method` that make `calls` U-Net calls, or None.
    PLMS needs 3 steps (24 calls) for its first multistep step; below that it is PRK."""
    for steps in range(3 if method == 'plms' else 1, calls + 1):
        if calls_per_image(method, steps, True) == calls:
            return steps
    return None


def write_cache(root, data, embeds, autoencoder, cloob, copies=32, std=0.02):
    """The learning problem's latents as a latent cache (posterior spread `std`), named as
    made with `autoencoder` and `cloob`, as precompute_latents.py would."""
    records = [{'key': latent_cache.encode_key(f'{k}-{i}'), 'mean': data[k].half(),
                'std': torch.full_like(data[k], std).half(), 'embed': embeds[k].half()}
               for i in range(copies) for k in range(len(data))]
    stats = latent_cache.PartStats()
    stats.add(data.numel(), 0.0, data.numel())
    latent_cache.write_part(root, 0, records, 0, stats)
    latent_cache.finalize(root, 1, {'source': 'the learning problem', 'image_size': 64,
                                    'autoencoder': describe_autoencoder(autoencoder),
                                    'cloob': describe_cloob(cloob)})


def sample(model_fn, noise, method, steps):
    with torch.no_grad():
        return sample_latents(model_fn, noise, sampling_timesteps(steps), method, progress=False)


def rms(a, b):
    return (a.double() - b.double()).pow(2).mean().sqrt().item()


def stage_images_per_sec(out, stage):
    """The last images/s a stage logged (perf/images_per_sec in its metrics.csv)."""
    import csv
    with open(out / stage / 'logs' / 'version_0' / 'metrics.csv') as f:
        rates = [float(r['perf/images_per_sec']) for r in csv.DictReader(f)
                 if r.get('perf/images_per_sec')]
    return rates[-1] if rates else None


def markdown(head, rows):
    lines = ['| ' + ' | '.join(head) + ' |', '|' + ' --- |' * len(head)]
    return '\n'.join(lines + ['| ' + ' | '.join(map(str, row)) + ' |' for row in rows])


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--teacher-steps', type=int, default=600)
    p.add_argument('--round-steps', type=int, default=600)
    p.add_argument('--start-steps', type=int, default=16)
    p.add_argument('--batch-size', type=int, default=16)
    p.add_argument('--lr', type=float, default=2e-4)
    p.add_argument('--loss-weighting', default='snr+1')
    p.add_argument('--work-dir', help='keep the files here (default: a temp dir)')
    args = p.parse_args()
    torch.set_num_threads(1)  # tiny models run as fast on one thread, and reproducibly
    begin = time.time()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix='bench_distill_'))
    work.mkdir(parents=True, exist_ok=True)

    data, embeds = learning.problem()
    start = time.perf_counter()
    teacher = learning.train(learning.direct_batches(data, embeds), steps=args.teacher_steps)
    teacher_step_s = (time.perf_counter() - start) / args.teacher_steps
    teacher = teacher.ema.requires_grad_(False)
    print(f'teacher: {args.teacher_steps} steps at {teacher_step_s:.3f} s/step, done at '
          f'{time.time() - begin:.0f} s', file=sys.stderr)
    autoencoder, cloob = tiny.tiny_autoencoder(work), str(tiny.tiny_cloob(work))
    teacher_file = tiny.save_bare(teacher, work / 'teacher.pth')
    write_cache(work / 'latents', data, embeds, autoencoder, cloob)

    import distill
    out = work / 'distilled'
    argv = ['--teacher', str(teacher_file), '--train-latents', str(work / 'latents'),
            '--vqgan-model', autoencoder, '--cloob-checkpoint', cloob, '--output-dir', str(out),
            '--image-size', '64', '--batch-size', str(args.batch_size), '--num-workers', '0',
            '--accelerator', 'cpu', '--start-steps', str(args.start_steps), '--target-steps',
            '2', '--round-steps', str(args.round_steps), '--lr', str(args.lr),
            '--loss-weighting', args.loss_weighting, '--seed', '0', '--resume-from', 'auto']
    start = time.perf_counter()
    assert tiny.exit_code(distill.main, distill.PROG, argv) == 0
    distill_s = time.perf_counter() - start
    from ccld.train.distill_run import plan, read_student
    stages = plan(args.start_steps, 2)
    students = {s.steps: read_student(out / s.student_file) for s in stages}
    print(f'distilled: {len(stages)} stages of {args.round_steps} steps in {distill_s:.0f} s, '
          f'done at {time.time() - begin:.0f} s', file=sys.stderr)

    conds = embeds.repeat_interleave(SAMPLES_PER_CONDITION, 0)
    targets = data.repeat_interleave(SAMPLES_PER_CONDITION, 0)
    noise = torch.randn([len(conds), *data.shape[1:]], generator=torch.Generator().manual_seed(1))
    guided = cfg_model_fn(teacher, conds[None], [GUIDANCE])
    reference = sample(guided, noise, *DEFAULT)

    def row(name, method, steps, calls, out):
        return [name, method, steps, calls, f'{rms(out, reference):.2e}',
                f'{rms(out, targets):.3f}']

    rows = [row('**teacher (default)**', *DEFAULT, calls_per_image(*DEFAULT, True), reference)]
    found = {}
    for student_steps in (8, 4, 2):
        if student_steps not in students:
            continue
        fn = distilled_cfg_model_fn(students[student_steps], conds[None], [GUIDANCE])
        out_s = sample(fn, noise, 'ddim', student_steps)
        found[student_steps] = {'student': rms(out_s, reference)}
        rows.append(row(f'student, {student_steps} steps', 'ddim', student_steps, student_steps,
                        out_s))
        for factor in (1, 4):
            calls = factor * student_steps
            for method in TEACHER_METHODS:
                steps = steps_for(method, calls)
                if steps is None:
                    continue
                out_t = sample(guided, noise, method, steps)
                found[student_steps][method, calls] = rms(out_t, reference)
                rows.append(row(f'teacher, {factor}x the calls', method, steps, calls, out_t))
    guidance_student = distilled_cfg_model_fn(students[None], conds[None], [GUIDANCE])
    for method, steps in (DEFAULT, ('dpmpp_2m', 16)):
        rows.append(row('guidance stage student', method, steps,
                        calls_per_image(method, steps, False),
                        sample(guidance_student, noise, method, steps)))
    print(f'RMS of the final latents to the teacher\'s default (PLMS-50 guided at {GUIDANCE:g}, '
          f'{calls_per_image(*DEFAULT, True)} calls) and to the training latent of each '
          f'condition; {len(conds)} samples, the same noise for all.\n')
    print(markdown(['model', 'method', 'steps', 'U-Net calls', 'RMS to default',
                    'RMS to latents'], rows))

    print('\nTargets:')
    for steps, calls, label in ((8, 32, '8-step student closer than DPM-Solver++(2M) with '
                                 '32 calls (16 guided steps)'),
                                (4, 16, '4-step student closer than the teacher with 16 calls '
                                 '(best of its samplers)')):
        if steps not in found:
            continue
        teacher_best = min(v for k, v in found[steps].items()
                           if k != 'student' and k[1] == calls and (steps != 8 or
                                                                     k[0] == 'dpmpp_2m'))
        met = found[steps]['student'] < teacher_best
        print(f'- {label}: student {found[steps]["student"]:.2e} vs teacher {teacher_best:.2e}: '
              f'{"met" if met else "NOT met"}')

    rates = {s.name: stage_images_per_sec(out, s.name) for s in stages}
    total = len(stages) * args.round_steps
    print(f'\nCost: {total} student optimizer steps ({len(stages)} stages of '
          f'{args.round_steps}, batch {args.batch_size}) against {args.teacher_steps} teacher '
          f'training steps (batch {learning.BATCH}): {total / args.teacher_steps:.2g}x the '
          f'steps. Teacher training: {teacher_step_s:.3f} s/step; distill.py: '
          f'{distill_s:.0f} s in all, {distill_s / total:.3f} s/step with Lightning, '
          'checkpoints and its logs; images/s logged per stage: '
          + ', '.join(f'{name} {rate:.1f}' for name, rate in rates.items() if rate) + '.')
    print(f'\n{time.time() - begin:.0f} s', file=sys.stderr)


if __name__ == '__main__':
    main()

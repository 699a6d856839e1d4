"""Model-state bytes per device, peak memory and seconds per step of full finetuning with
each memory flag of train_latent_diffusion.py, one configuration per fresh process.

Why: the 1.17B yfcc_cfg U-Net's full finetune holds 23.5 GB of model states (fp32
weights, gradients, two AdamW moments, the EMA) before any activation: more than a 24 GB
card. --optimizer adamw8bit and --ema-device cpu are meant to bring that under 12 GB;
this measures what they do. Each configuration is a list of flags given to the real
training code (run.validate and run.run), with tiny frozen models and 256 px images
(32x32 latents); the model states are what ccld.train.memory counts from the tensors
after a real optimizer step, the peak is torch.cuda.max_memory_allocated over the steps
after the first (on a CPU, the peak RSS of the process over those steps: its high-water
mark is reset after the first, so reading a base model in does not count), the s/step a
median after it.

CPU (557M, batch 1; about 15 GB of RAM at the most, a few minutes a configuration):
    .venv/bin/python bench/train_memory.py
GPU (1.17B, batch 8, bf16, as on a 24 GB card):
    python bench/train_memory.py --device cuda --base-channels 192 --batch-size 8 \\
        --memory-gb 24 --common='--fprecision bf16 --gradient-checkpointing'
More rows: --config 'LABEL=FLAGS' (repeated; replaces the default rows), e.g.
    --config 'LoRA r=16=--lora-rank 16'  (on a fresh base written as a state dict)
At a bucket of --aspect-buckets (every step at that shape: images of it, at the least
--image-size whose bucket table holds it), e.g. the full finetunes at 384x256:
    .venv/bin/python bench/train_memory.py --bucket 384x256 --config 'full=' \\
        --config '+ adamw8bit=--optimizer adamw8bit'
LoRA's model states at 1.17B, measured (8x8 latents: the states do not depend on them):
    .venv/bin/python bench/train_memory.py --base-channels 192 --image-size 64 \\
        --common='--fprecision bf16' --config 'LoRA r=16=--lora-rank 16' \\
        --config 'LoRA r=64=--lora-rank 64'
"""

import argparse
import json
import math
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from time import perf_counter

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / 'latent-diffusion')]

import pytorch_lightning as pl  # noqa: E402

import train_latent_diffusion  # noqa: E402
from ccld import cli  # noqa: E402
from ccld.data.buckets import bucket_table  # noqa: E402
from ccld.models.unet import DiffusionModel  # noqa: E402
from ccld.train import quickstart, runner, run as training_run  # noqa: E402
from ccld.train.memory import MemoryReport  # noqa: E402

CONFIGURATIONS = [
    ('full finetune (fp32 AdamW + EMA)', ''),
    ('+ --optimizer adamw8bit', '--optimizer adamw8bit'),
    ('+ --ema-device cpu', '--optimizer adamw8bit --ema-device cpu'),
    ('LoRA r=16', '--lora-rank 16'),
    ('LoRA r=64', '--lora-rank 64'),
]
STATES = ('parameters', 'gradients', 'optimizer state', 'EMA')  # the U-Net's (not frozen)
RELEASED = (192, [4, 4, 8, 8])  # yfcc_cfg, 1.17B


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    p.add_argument('--base-channels', type=int, default=128)
    p.add_argument('--channel-multipliers', default='4,4,8,8')
    p.add_argument('--batch-size', type=int, default=1)
    p.add_argument('--image-size', type=int, default=256,
                   help='smaller for model states alone (they do not depend on it)')
    p.add_argument('--bucket', type=cli.image_size, metavar='WxH',
                   help='train at this bucket of --aspect-buckets instead of --image-size '
                   'squares (the --image-size used is the least whose table holds it)')
    p.add_argument('--steps', type=int, default=3, help='optimizer steps (the first is not timed)')
    p.add_argument('--memory-gb', type=float,
                   help='cap the GPU at this much (torch.cuda.set_per_process_memory_fraction)')
    p.add_argument('--common', default='', help='flags added to every configuration')
    p.add_argument('--config', action='append', metavar='LABEL=FLAGS',
                   help='a configuration (repeat; default: full finetunes and LoRA r=16, r=64)')
    p.add_argument('--child', help=argparse.SUPPRESS)
    return p.parse_args(argv)


def bucket_flags(width, height):
    """The flags that train every step at the bucket width x height: --aspect-buckets at
    the least --image-size whose table (--bucket-step 64) holds it, --max-aspect its own,
    so the images of its shape all go to it."""
    aspect = max(width, height) / min(width, height)
    least = math.ceil(math.sqrt(width * height) / 64) * 64
    for size in range(least, 2 * least, 64):
        if (width, height) in bucket_table(size, 64, aspect):
            return ['--aspect-buckets', '--image-size', str(size), '--max-aspect', str(aspect)]
    raise SystemExit(f'--bucket {width}x{height}: no --image-size from {least} to {2 * least} '
                     'has it in its bucket table (--bucket-step 64); try a shape near it.')


class Measured(Exception):
    """Ends a child's run after its last timed step, before any checkpoint is written."""


class Measure(pl.Callback):
    def __init__(self, steps, cuda):
        self.steps, self.cuda, self.times, self.result = steps, cuda, [], None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if len(self.times) == 1:  # after the first step and its demo grid
            if self.cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            else:  # Linux: resets the process's peak RSS (VmHWM)
                Path('/proc/self/clear_refs').write_text('5')

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if self.cuda:
            torch.cuda.synchronize()
        self.times.append(perf_counter())
        if trainer.global_step < self.steps:
            return
        report = next(c for c in trainer.callbacks if isinstance(c, MemoryReport))
        peak = torch.cuda.max_memory_allocated() if self.cuda else peak_rss()
        offloaded = module.offloaded_ema is not None
        on_device = sum(sum((report.after_step[row] or {}).values()) for row in STATES
                        if not (offloaded and row == 'EMA'))
        self.result = {'states': report.after_step, 'on_device': on_device,
                       'on_host': sum(report.after_step['EMA'].values()) if offloaded else 0,
                       'peak': peak,
                       'step_s': statistics.median(
                           later - earlier for earlier, later in zip(self.times[1:],
                                                                     self.times[2:])),
                       'parameters': count(module.model)}
        raise Measured


def peak_rss():
    """The process's peak resident memory since it was last reset, in bytes."""
    line = next(line for line in open('/proc/self/status') if line.startswith('VmHWM:'))
    return int(line.split()[1]) * 1024


def count(model):
    """Parameters and the fixed Fourier matrices, as SPEC counts them."""
    return sum(t.numel() for t in model.state_dict().values() if t.ndim)


def child(spec):
    """One configuration, in this (fresh) process: prints its figures as JSON."""
    args = parse_args(spec['argv'])
    cuda = args.device == 'cuda'
    if cuda and args.memory_gb:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_gb * 1e9 / total))
    d = Path(tempfile.mkdtemp(prefix='train_memory_'))
    paths = quickstart.make_images(d / 'images', n=16, size=256)
    shape = []
    if args.bucket:
        shape = bucket_flags(*args.bucket)
        for path in paths:
            Image.open(path).resize(args.bucket).save(path)
    (d / 'prompts.txt').write_text('a red circle\n')
    flags = shlex.split(spec['flags'])
    if '--lora-rank' in flags:  # adapters need a base: a fresh model's, as a state dict
        torch.save(DiffusionModel(args.base_channels, [int(m) for m in
                                                       args.channel_multipliers.split(',')]
                                  ).state_dict(), d / 'base.pth')
        flags += ['--resume-from', str(d / 'base.pth')]
    argv = ['--train-set', str(quickstart.write_path_list(paths, d / 'train.txt')),
            '--vqgan-model', quickstart.make_tiny_autoencoder(d / 'ae'),
            '--cloob-checkpoint', str(quickstart.make_tiny_cloob(d / 'cloob.pkl')),
            '--autoencoder-scale', '1', '--demo-prompts', str(d / 'prompts.txt'),
            '--output-dir', str(d / 'out'), '--accelerator', 'gpu' if cuda else 'cpu',
            '--num-workers', '0', '--batch-size', str(args.batch_size),
            '--image-size', str(args.image_size),
            '--base-channels', str(args.base_channels),
            '--channel-multipliers', args.channel_multipliers, '--max-steps', '1000',
            '--checkpoint-every', '1000', '--checkpoint-minutes', '1000', '--demo-every', '1000',
            '--demo-steps', '1', '--seed', '0', *shape, *flags]
    measure = Measure(args.steps, cuda)
    make_trainer = runner.make_trainer
    runner.make_trainer = lambda a, prog, callbacks, *rest, **kw: make_trainer(
        a, prog, [*callbacks, measure], *rest, **kw)
    try:
        training_run.run(training_run.validate(train_latent_diffusion.parser().parse_args(argv)))
    except Measured:
        pass
    finally:  # (a 1.17B base is 4.7 GB)
        shutil.rmtree(d, ignore_errors=True)
    print('RESULT ' + json.dumps(measure.result), flush=True)


def run_configuration(argv, flags):
    """The figures of one configuration from a fresh process, or why there are none."""
    spec = json.dumps({'argv': argv, 'flags': flags})
    done = subprocess.run([sys.executable, __file__, '--child', spec], capture_output=True,
                          text=True)
    for line in done.stdout.splitlines():
        if line.startswith('RESULT '):
            return json.loads(line[len('RESULT '):])
    lines = (done.stderr + done.stdout).strip().splitlines()
    why = next((line for line in reversed(lines) if 'OutOfMemoryError' in line or 'error' in
                line.lower()), lines[-1] if lines else f'exit {done.returncode}')
    return {'error': why[:200]}


def gb(n):
    return f'{n / 1e9:.2f}'


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.child:
        return child(json.loads(args.child))
    # LABEL=FLAGS: the label may hold '=' (LoRA r=16); the flags start with '-'.
    rows = [re.match(r'(.*?)=(\s*-.*|)$', c).groups() for c in args.config] if args.config \
        else CONFIGURATIONS
    with torch.device('meta'):
        released = count(DiffusionModel(*RELEASED))
    cpu = next((line.split(':', 1)[1].strip() for line in open('/proc/cpuinfo')
                if line.startswith('model name')), platform.processor())
    gpu = torch.cuda.get_device_name() if args.device == 'cuda' else 'none'
    print(f'{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; CPU: {cpu}; GPU: {gpu}'
          f'{f" capped at {args.memory_gb:g} GB" if args.memory_gb else ""}; '
          f'torch {torch.__version__}')
    width, height = args.bucket or (args.image_size, args.image_size)
    latents = f'{height // 8}x{width // 8}' + (f' (the {width}x{height} bucket)' if args.bucket
                                                 else '')
    print(f'U-Net base {args.base_channels} x {args.channel_multipliers}, batch '
          f'{args.batch_size}, {latents} latents, '
          f'common flags: {args.common or "none"}; '
          f'{args.steps} steps, the first untimed. Model states: the U-Net\'s parameters, '
          f'gradients, optimizer state and EMA, GB (10^9 bytes) counted from the tensors after '
          f'a step; 1.17B: the bytes per parameter here x {released:,}.\n')
    print('| configuration | states on the training device + on the CPU besides (GB) | '
          '1.17B: the same (GB) | peak (GB) | s/step |')
    print('| --- | --- | --- | --- | --- |')
    child_argv = [a for i, a in enumerate(argv)
                  if a != '--config' and (i == 0 or argv[i - 1] != '--config')
                  and not a.startswith('--config=')]
    for label, flags in rows:
        result = run_configuration(child_argv, f'{args.common} {flags}')
        if 'error' in result:
            print(f'| {label} | failed: {result["error"]} | | | |', flush=True)
            continue
        scale = released / result['parameters']
        here = f'{gb(result["on_device"])} + {gb(result["on_host"])}'
        scaled = f'{gb(result["on_device"] * scale)} + {gb(result["on_host"] * scale)}'
        if '--lora-rank' in flags:  # (adapters do not grow with the parameter count)
            scaled = 'measure it at 1.17B'
        where = 'GPU, after the first step' if args.device == 'cuda' else 'RSS'
        print(f'| {label} | {here} | {scaled} | {gb(result["peak"])} ({where}) | '
              f'{result["step_s"]:.2f} |', flush=True)


if __name__ == '__main__':
    main()

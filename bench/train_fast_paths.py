"""Images/s, peak memory and model FLOP utilisation of a U-Net training step with each
speed option alone and all together, against the plain fp32 step, in one run.

Why: the speed flags of train_latent_diffusion.py (--channels-last, --tf32, --compile,
--gradient-checkpointing, --fprecision bf16) are off unless a measurement says they pay;
this is that measurement. A step is what training from the latent cache does: a fresh
posterior sample, the v loss with condition dropout, backward, AdamW, the EMA update.

    .venv/bin/python bench/train_fast_paths.py     (CPU check, a few minutes; no compile)
GPU session, danbooru-size U-Net (the issue's setting):
    python bench/train_fast_paths.py --device cuda --batch-size 32 --base-channels 128 \\
        --channel-multipliers 4,4,8,8 --precision bf16 --compile
"""

import argparse
import copy
import platform
import resource
import statistics
import sys
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path
from time import perf_counter

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / 'latent-diffusion')]

from ccld.train.ema import ema_update  # noqa: E402
from ccld.train.throughput import compute_dtype, training_flops_per_image  # noqa: E402
from ccld.train.diffusion_module import posterior_sample, v_objective  # noqa: E402
from ccld.models.unet import DiffusionModel  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--device', default='cpu')
    p.add_argument('--batch-size', type=int, default=4)
    p.add_argument('--base-channels', type=int, default=64)
    p.add_argument('--channel-multipliers', default='1,2,2,4')
    p.add_argument('--latent-size', type=int, default=32)
    p.add_argument('--precision', default='bf16', choices=['32', 'bf16', '16'],
                   help='the mixed precision of the "bf16" rows')
    p.add_argument('--compile', action='store_true', help='also time torch.compile (slow to '
                   'compile: minutes on a CPU)')
    p.add_argument('--steps', type=int, default=4)
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--peak-tflops', type=float, help='for the MFU column')
    return p.parse_args(argv)


def configurations(args):
    rows = [('fp32 (baseline)', {}), ('channels-last', dict(channels_last=True)),
            ('gradient checkpointing', dict(checkpointing=True)),
            (f'{args.precision}-mixed', dict(precision=args.precision))]
    if args.device.startswith('cuda'):
        rows.insert(1, ('tf32', dict(tf32=True)))
    if args.compile:
        rows.append(('compile', dict(compile=True)))
    everything = dict(channels_last=True, precision=args.precision, compile=args.compile,
                      tf32=args.device.startswith('cuda'))
    rows.append(('all of these', everything))
    return rows


def time_steps(args, options):
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = \
        options.get('tf32', False)
    torch.manual_seed(0)
    mults = [int(m) for m in args.channel_multipliers.split(',')]
    model = DiffusionModel(args.base_channels, mults).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    memory_format = torch.channels_last if options.get('channels_last') else \
        torch.contiguous_format
    model.to(memory_format=memory_format)
    model.set_gradient_checkpointing(options.get('checkpointing', False))
    if options.get('compile'):
        model.compile()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-5, weight_decay=0.01,
                                  fused=device.type in ('cuda', 'cpu'))
    precision = options.get('precision', '32')
    dtype = compute_dtype(precision)
    autocast = torch.autocast(device.type, dtype=dtype) if precision != '32' else nullcontext()
    scaler = torch.amp.GradScaler(device.type) if precision == '16' else None
    n, s = args.batch_size, args.latent_size
    mean, std = torch.randn(n, 4, s, s, device=device), torch.full((n, 4, s, s), 0.01,
                                                                   device=device)
    cond, times = torch.randn(n, 512, device=device), []
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(args.warmup + args.steps):
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        start = perf_counter()
        x0 = posterior_sample(mean, std, 8.0).contiguous(memory_format=memory_format)
        with autocast:
            loss = v_objective(model, x0, cond, torch.rand(n, device=device))
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema_update(model, ema, 0.999)
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        if i >= args.warmup:
            times.append(perf_counter() - start)
    seconds = statistics.median(times)
    if device.type == 'cuda':
        peak = torch.cuda.max_memory_allocated(device) / 2 ** 30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # process-wide
    return seconds, peak


def main(argv=None):
    args = parse_args(argv)
    mults = [int(m) for m in args.channel_multipliers.split(',')]
    flops = training_flops_per_image(args.base_channels, mults, args.latent_size)
    cpu = next((line.split(':', 1)[1].strip() for line in open('/proc/cpuinfo')
                if line.startswith('model name')), platform.processor())
    gpu = torch.cuda.get_device_name() if args.device.startswith('cuda') else 'none'
    print(f'{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; CPU: {cpu}, '
          f'{torch.get_num_threads()} threads; GPU: {gpu}; torch {torch.__version__}')
    print(f'U-Net base {args.base_channels} x {args.channel_multipliers}, latents '
          f'{args.latent_size}x{args.latent_size}, batch {args.batch_size}; '
          f'{flops / 1e9:.1f} GFLOP forward+backward per image; median of {args.steps} '
          f'steps after {args.warmup} warm-up steps\n')
    print('| configuration | s/step | images/s | vs fp32 | TFLOP/s | MFU | peak memory |')
    print('| --- | --- | --- | --- | --- | --- | --- |')
    baseline = None
    for name, options in configurations(args):
        seconds, peak = time_steps(args, options)
        rate = args.batch_size / seconds
        baseline = baseline or rate
        tflops = flops * rate / 1e12
        mfu = f'{tflops / args.peak_tflops:.0%}' if args.peak_tflops else '-'
        where = 'GiB (GPU)' if args.device.startswith('cuda') else 'GiB (max RSS so far)'
        print(f'| {name} | {seconds:.3f} | {rate:.2f} | {rate / baseline:.2f}x | '
              f'{tflops:.3f} | {mfu} | {peak:.2f} {where} |', flush=True)


if __name__ == '__main__':
    main()

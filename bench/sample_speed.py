#!/usr/bin/env python3
"""Seconds per image of sample.py's default (PLMS, 50 steps) and of the preview setting
(ccld.diffusion.sampling.PREVIEW), measured in one run on the same model, noise and machine.

    PYTHONPATH=. python3 bench/sample_speed.py

A mid-size U-Net (base 64, multipliers 1,2,2,4, random weights: the time does not depend
on them) samples 32x32 latents (256 px images) guided by one prompt at scale 3 as
sample.py does it, so every call runs the batch twice. On the CPU, a batch of 4 in
float32; on a CUDA GPU, when there is one, a batch of 16 in fp16 autocast (sample.py's
GPU path). Decoding with the kl-f8 autoencoder (same architecture, random weights) is
timed apart: it costs the same whatever the sampler.
"""

import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / 'tests')]

from sampler_error import run  # noqa: E402

from ccld.models import latents  # noqa: E402
from ccld.models.autoencoder import KL_F8_CONFIG, build_autoencoder, read_config  # noqa: E402
from ccld.diffusion.guidance import cfg_model_fn  # noqa: E402
from ccld.diffusion.sampling import PREVIEW  # noqa: E402
from ccld.models.unet import DiffusionModel  # noqa: E402

WIDTHS = (64, [1, 2, 2, 4])
LATENT_SHAPE = (4, 32, 32)
DEFAULT = ('plms', 'spliced', 50)
SETTINGS = [DEFAULT, (PREVIEW['method'], PREVIEW['schedule'], PREVIEW['steps'])]


def timed(fn, device):
    if device.type == 'cuda':
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == 'cuda':
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


@torch.inference_mode()
def bench(device, batch):
    torch.manual_seed(0)
    model = DiffusionModel(*WIDTHS).eval().to(device)
    embed = torch.nn.functional.normalize(torch.randn([1, 512], device=device), dim=1)
    model_fn = cfg_model_fn(model, embed, [3.0])
    noise = torch.randn([batch, *LATENT_SHAPE], device=device)
    run(model_fn, noise, ('plms2', 'spliced', 2))  # warm-up
    rows = []
    for setting in SETTINGS:
        (_, calls), seconds = timed(lambda: run(model_fn, noise, setting), device)
        rows.append((setting, calls, seconds / batch, seconds / calls))
    autoencoder = build_autoencoder(read_config(ROOT / KL_F8_CONFIG)).eval().to(device)
    latents.decode(autoencoder, noise[:1, :, :8, :8], 1.0)  # warm-up
    _, decode = timed(lambda: latents.decode(autoencoder, noise[:1], 1.0), device)
    return rows, decode


def report(name, batch, rows, decode):
    print(f'\n{name}, batch {batch} (guided: {2 * batch} rows a U-Net call)\n')
    print('| setting | calls | s / image (sampling) | s / call | s / image (with decode) |')
    print('| --- | --- | --- | --- | --- |')
    for (method, schedule, steps), calls, per_image, per_call in rows:
        print(f'| {method} {schedule} {steps} | {calls} | {per_image:.2f} | {per_call:.3f} | '
              f'{per_image + decode:.2f} |')
    (_, slow_calls, slow, _), (_, fast_calls, fast, _) = rows
    print(f'\nkl-f8 decode: {decode:.2f} s / image. Preview vs default, images/s: '
          f'{slow / fast:.2f}x sampling only ({slow_calls / fast_calls:.2f}x fewer calls), '
          f'{(slow + decode) / (fast + decode):.2f}x with the decode.')


def main():
    threads = torch.get_num_threads()
    print(f'torch {torch.__version__}; CPU threads: {threads}; model: DiffusionModel'
          f'{WIDTHS}, latents {"x".join(map(str, LATENT_SHAPE))}')
    report(f'CPU ({threads} threads, float32)', 4, *bench(torch.device('cpu'), 4))
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        report(f'GPU {name} (fp16 autocast)', 16, *bench(torch.device('cuda'), 16))
    else:
        print('\nGPU: no CUDA device here, so no GPU figures.')


if __name__ == '__main__':
    main()

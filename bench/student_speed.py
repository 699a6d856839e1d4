#!/usr/bin/env python3
"""Seconds per image of a distilled 4-step student against its teacher's default (PLMS,
50 steps, guided: 118 U-Net calls an image), measured in one run on the same noise.

    PYTHONPATH=.:latent-diffusion python3 bench/student_speed.py        # GPU when there is one

On a CUDA GPU: the 557M U-Net (danbooru_cfg's widths, base 128, multipliers 4,4,8,8),
random weights (the time does not depend on them), 32x32 latents (256 px), a batch of 16
in fp16 autocast as sample.py samples on a GPU. On the CPU: a mid-size U-Net (base 64,
multipliers 1,2,2,4), batch 4, float32. The student is the same U-Net plus its guidance
embedding, sampled as sample.py samples a student (DDIM, one call a step); the teacher is
guided at scale 3 (each step runs the conditional and unconditional halves as one batch).
The autoencoder's decode is left out: it costs the same for both.
"""

import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

from ccld.diffusion.guidance import cfg_model_fn, distilled_cfg_model_fn  # noqa: E402
from ccld.diffusion.sampling import sample_latents  # noqa: E402
from ccld.diffusion.schedule import sampling_timesteps  # noqa: E402
from ccld.models.student import student_of  # noqa: E402
from ccld.models.unet import DiffusionModel, count_params  # noqa: E402

GPU, CPU = ((128, [4, 4, 8, 8]), 16), ((64, [1, 2, 2, 4]), 4)
LATENT_SHAPE = (4, 32, 32)


def timed(fn, device):
    if device.type == 'cuda':
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == 'cuda':
        torch.cuda.synchronize()
    return time.perf_counter() - start


@torch.inference_mode()
def main():
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    widths, batch = GPU if device.type == 'cuda' else CPU
    torch.manual_seed(0)
    teacher = DiffusionModel(*widths).eval().to(device)
    student = student_of(teacher).eval()
    embed = torch.nn.functional.normalize(torch.randn([1, 512], device=device), dim=1)
    noise = torch.randn([batch, *LATENT_SHAPE], device=device)
    settings = {
        'teacher, PLMS 50 steps guided (118 calls)':
            (cfg_model_fn(teacher, embed, [3.0]), 'plms', 50),
        'student, DDIM 4 steps (4 calls)': (distilled_cfg_model_fn(student, embed, [3.0]),
                                            'ddim', 4),
    }
    for model_fn, method, _ in settings.values():  # warm-up (cuDNN autotuning, allocator)
        sample_latents(model_fn, noise, sampling_timesteps(2, device), method, progress=False)
    print(f'{device.type} ({torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}'
          f'), U-Net of {count_params(teacher) / 1e6:.0f}M parameters, batch {batch}, '
          f'32x32 latents{", fp16 autocast" if device.type == "cuda" else ", float32"}:')
    seconds = {}
    for name, (model_fn, method, steps) in settings.items():
        ts = sampling_timesteps(steps, device)
        seconds[name] = timed(lambda: sample_latents(model_fn, noise, ts, method,
                                                     progress=False), device) / batch
        print(f'- {name}: {seconds[name]:.4f} s per image')
    first, second = seconds.values()
    print(f'- the student is {first / second:.1f}x faster per image (calls: 118 / 4 = 29.5x)')


if __name__ == '__main__':
    main()

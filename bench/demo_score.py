"""What the CLOOB score adds to a demo grid: seconds to render a grid (PLMS, guided, then
the kl-f8 decode) against seconds to score it with CLOOB's ViT-B/16 image tower, in one
run. The score must not slow the demo callback down by more than 10%.

The frozen models have their real architectures (kl-f8 from its yaml, the released
ViT-B/16 config; weights filled by SPEC section 0's rule: timings do not depend on the
values) and the demo's real code (ccld.train.demo_grids.render,
ccld.sample.cloob_score.cloob_scores); the U-Net is mid-size on a CPU. The FLOP share is
printed too: it carries over to other sizes.

    .venv/bin/python bench/demo_score.py     (from the repository root; ~2 minutes)
GPU session, danbooru-size U-Net and the original's 16 prompts and 50 steps:
    python bench/demo_score.py --device cuda --base-channels 128 --channel-multipliers 4,4,8,8 \\
        --prompts 16 --steps 50
"""

import argparse
import sys
from pathlib import Path
from time import perf_counter

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / 'latent-diffusion')]

from ccld.train.demo_grids import render  # noqa: E402
from ccld.sample.cloob_score import cloob_scores  # noqa: E402
from ccld.models.unet import DiffusionModel  # noqa: E402
from train_throughput import frozen_models  # noqa: E402  (kl-f8 and CLOOB, filled)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--device', default='cpu')
    p.add_argument('--base-channels', type=int, default=64)
    p.add_argument('--channel-multipliers', default='1,2,2,4')
    p.add_argument('--prompts', type=int, default=4)
    p.add_argument('--steps', type=int, default=10)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    mults = [int(m) for m in args.channel_multipliers.split(',')]
    unet = DiffusionModel(args.base_channels, mults, autoencoder_scale=8.0779).eval()
    unet = unet.requires_grad_(False).to(device)
    ae, cloob = frozen_models(device)
    text = torch.nn.functional.normalize(torch.randn(args.prompts, 512, device=device), dim=-1)

    def timed(fn):
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        start = perf_counter()
        out = fn()
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        return out, perf_counter() - start

    images, render_s = timed(lambda: render(unet, ae, text, [4, 32, 32], args.steps))
    _, score_s = timed(lambda: cloob_scores(cloob, images, text))
    with FlopCounterMode(display=False) as counted:
        cloob_scores(cloob, images, text)
    score_flops = counted.get_total_flops()
    with FlopCounterMode(display=False) as counted:
        render(unet, ae, text, [4, 32, 32], 2, method='ddim')  # 2 calls + decode
    two_calls = counted.get_total_flops()
    with FlopCounterMode(display=False) as counted:
        render(unet, ae, text, [4, 32, 32], 1, method='ddim')
    one_call = counted.get_total_flops()
    call, decode = two_calls - one_call, 2 * one_call - two_calls
    calls = 4 * min(args.steps, 3) + max(args.steps - 3, 0)  # PLMS starts with 3 PRK steps
    render_flops = calls * call + decode
    print(f'{args.prompts} prompts, PLMS {args.steps} steps ({calls} guided U-Net calls), '
          f'U-Net base {args.base_channels} x {args.channel_multipliers}, 256 px, on {device}')
    print(f'render {render_s:.1f} s, score {score_s:.2f} s: the score adds '
          f'{score_s / render_s:.1%} (target: at most 10%)')
    print(f'FLOPs: render {render_flops / 1e12:.2f} TFLOP, score {score_flops / 1e9:.0f} GFLOP '
          f'({score_flops / render_flops:.1%})')


if __name__ == '__main__':
    main()

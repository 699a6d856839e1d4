"""What the CLOOB score adds to a demo grid: seconds to render a grid (PLMS, guided, then
the kl-f8 decode) against seconds to score it with CLOOB's ViT-B/16 image tower, in one
run. The score must not slow the demo callback down by more than 10%.

The frozen models have their real architectures (kl-f8 from its yaml, the released
ViT-B/16 config; weights filled by SPEC section 0's rule: timings do not depend on the
values) and the demo's real code (ccld.demo.render, ccld.score.cloob_scores); the U-Net
is mid-size on a CPU. The FLOP share is printed too: it carries over to other sizes.

    .venv/bin/python bench/demo_score.py     (from the repository root; ~2 minutes)
GPU session, danbooru-size U-Net and the original's 16 prompts and 50 steps:
    python bench/demo_score.py --device cuda --base-channels 128 --channel-multipliers 4,4,8,8 \\
        --prompts 16 --steps 50
"""

import argparse
import math
import sys
import zlib
from pathlib import Path
from time import perf_counter

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / 'latent-diffusion')]

from ccld.autoencoder import KL_F8_CONFIG, build_autoencoder, read_config  # noqa: E402
from ccld.cloob import CLOOBEmbedder  # noqa: E402
from ccld.demo import render  # noqa: E402
from ccld.score import cloob_scores  # noqa: E402
from ccld.unet import DiffusionModel  # noqa: E402
from cloob_training import model_pt, pretrained  # noqa: E402


def fill(module):
    """SPEC section 0's deterministic fill, by state-dict key."""
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if tensor.ndim == 0 or not tensor.is_floating_point():
                continue
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            value = torch.randn(tensor.shape, generator=g)
            tensor.copy_(value / math.sqrt(math.prod(tensor.shape[1:])) if tensor.ndim >= 2
                         else 0.1 * value)
    return module


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
    ae = fill(build_autoencoder(read_config(ROOT / KL_F8_CONFIG))).eval().to(device)
    config = pretrained.get_config('cloob_laion_400m_vit_b_16_16_epochs')
    cloob = CLOOBEmbedder(fill(model_pt.get_pt_model(config))).to(device)
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
    calls = args.steps + 9  # PLMS: its first three steps are PRK steps of 4 calls
    render_flops = calls * call + decode
    print(f'{args.prompts} prompts, PLMS {args.steps} steps ({calls} guided U-Net calls), '
          f'U-Net base {args.base_channels} x {args.channel_multipliers}, 256 px, on {device}')
    print(f'render {render_s:.1f} s, score {score_s:.2f} s: the score adds '
          f'{score_s / render_s:.1%} (target: at most 10%)')
    print(f'FLOPs: render {render_flops / 1e12:.2f} TFLOP, score {score_flops / 1e9:.0f} GFLOP '
          f'({score_flops / render_flops:.1%})')


if __name__ == '__main__':
    main()

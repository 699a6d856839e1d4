"""Seconds per training step of the original pipeline, which decodes and encodes every
image on every step, against training from the latent cache, in one run on one machine.

Why: the latent cache is only worth its complexity if it makes training much faster at
the shapes where the cost lies. Both paths run the same ccld code for the loss, backward,
AdamW and EMA (latents_and_conditions, v_objective, ema_update); they differ only in
where the clean latents and conditions come from. The frozen models have the real
architectures (CompVis kl-f8 from its yaml, CLOOB ViT-B/16 from its released config)
with weights filled by SPEC section 0's rule: timings do not depend on the values.
The cache is written by the real precompute code (ccld.data.precompute.encode_units), whose
cost per image is reported too, and read back by ccld.data.latent_cache.make_cache_loader.

CPU check (2 cores, under 5 minutes; prints the step counts it used):
    .venv/bin/python bench/train_throughput.py     (from the repository root)
GPU session, danbooru-size U-Net:
    python bench/train_throughput.py --device cuda --batch-size 32 --base-channels 128 \
        --channel-multipliers 4,4,8,8 --precision bf16 --num-workers 8 --steps 10
"""

import argparse
import copy
import math
import os
import statistics
import sys
import tempfile
import zlib
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path
from time import perf_counter

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / 'latent-diffusion')]

from ccld.data import latent_cache  # noqa: E402
from ccld.models.autoencoder import KL_F8_CONFIG, build_autoencoder, read_config  # noqa: E402
from ccld.models.cloob import CLOOBEmbedder  # noqa: E402
from ccld.data.images import make_loader  # noqa: E402
from ccld.train.ema import ema_decay, ema_update  # noqa: E402
from ccld.data.precompute import encode, encode_units  # noqa: E402
from ccld.data.sources import Source  # noqa: E402
from ccld.train.throughput import training_flops_per_image  # noqa: E402
from ccld.train.diffusion_module import latents_and_conditions, v_objective  # noqa: E402
from ccld.models.unet import DiffusionModel  # noqa: E402
from cloob_training import model_pt, pretrained  # noqa: E402

CLOOB_CONFIG = 'cloob_laion_400m_vit_b_16_16_epochs'
AUTOENCODER_SCALE = 8.0779  # the published LAION-5B kl-f8 value (SPEC 5)
JPEG_SIZE = (384, 320)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--device', default='cpu')
    p.add_argument('--batch-size', type=int, default=2)
    p.add_argument('--base-channels', type=int, default=64)
    p.add_argument('--channel-multipliers', default='1,1,2,2',
                   type=lambda s: tuple(int(m) for m in s.split(',')))
    p.add_argument('--precision', choices=('32', 'bf16'), default='32',
                   help='bf16: autocast in bfloat16 (cuda only)')
    p.add_argument('--image-size', type=int, default=256)
    p.add_argument('--num-workers', type=int, default=0,
                   help='loader workers for both paths (0: loading is part of the step)')
    p.add_argument('--warmup', type=int, default=2, help='untimed steps per path')
    p.add_argument('--steps', type=int, default=3, help='timed steps of the original path')
    p.add_argument('--cache-steps', type=int, default=6,
                   help='timed steps from the cache (cheap, so more of them)')
    p.add_argument('--threads', type=int, help="torch's intra-op threads (default: torch's)")
    p.add_argument('--workdir', help='where to write the JPEGs and the cache (default: a temp dir)')
    args = p.parse_args(argv)
    args.device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.precision != '32' and args.device.type != 'cuda':
        p.error('--precision bf16 autocasts on cuda only; use --precision 32 on the CPU')
    return args


# SPEC section 0, the fill rule (the same as tests/conftest.py's, which is not imported
# because it pins torch to one thread).
def fill_value(name, shape):
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    shape = list(shape)
    if len(shape) >= 2:
        return torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))
    return 0.1 * torch.randn(shape, generator=g)


@torch.no_grad()
def fill_state_dict(module, scalars=None):
    for name, tensor in module.state_dict().items():
        tensor.copy_(torch.tensor(scalars[name]) if tensor.ndim == 0
                     else fill_value(name, tensor.shape))
    return module


@torch.no_grad()
def fill_cloob_image_tower(model):
    """CLOOB is filled under its JAX names (PATH/LEAF, SPEC 0), in the JAX layout."""
    state = model.state_dict()
    for jax_path, leaf, key, layout in model_pt._param_map(model.config):
        if key.startswith('image_encoder.'):
            shape = [state[key].shape[i] for i in model_pt._inverse(layout)] if layout \
                else state[key].shape
            value = fill_value(f'{jax_path}/{leaf}', shape)
            state[key].copy_(value.permute(layout) if layout else value)


def frozen_models(device):
    """kl-f8 and the CLOOB image tower, frozen, as training holds them."""
    ae = build_autoencoder(read_config(ROOT / KL_F8_CONFIG))
    fill_state_dict(ae)
    model = model_pt.get_pt_model(pretrained.get_config(CLOOB_CONFIG))
    model.text_encoder = None  # a training step never embeds text
    fill_cloob_image_tower(model)
    return (ae.eval().requires_grad_(False).to(device),
            CLOOBEmbedder(model).to(device))


def gflops_per_image(args):
    """Counted by torch's FlopCounterMode on the meta device (no arithmetic is run)."""
    from torch.utils.flop_counter import FlopCounterMode

    def count(fn):
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops() / 1e9

    config = pretrained.get_config(CLOOB_CONFIG)['image_encoder']
    with torch.device('meta'):
        ae = build_autoencoder(read_config(ROOT / KL_F8_CONFIG))
        vit = model_pt.get_pt_model(pretrained.get_config(CLOOB_CONFIG)).image_encoder
        image = torch.empty(1, 3, args.image_size, args.image_size)
        cloob_input = torch.empty(1, 3, config['image_size'], config['image_size'])
    unet = training_flops_per_image(args.base_channels, args.channel_multipliers,
                                    args.image_size // 8) / 1e9  # (also torch's counter)
    latent = args.image_size // 8
    return {f'kl-f8 encode, {args.image_size} px': count(lambda: ae.encode(image).std),
            f'CLOOB ViT-B/16 image tower, {config["image_size"]} px':
                count(lambda: vit(cloob_input)),
            f'U-Net forward+backward, {latent}x{latent} latent': unet}


def write_jpegs(folder, n, seed=0):
    """n JPEGs of smooth colour fields with fine noise (so they resize and compress like
    photos rather than flat shapes); returns a path list file naming them."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    width, height = JPEG_SIZE
    paths = []
    for i in range(n):
        coarse = torch.rand(1, 3, 6, 5, generator=g)
        field = torch.nn.functional.interpolate(coarse, (height, width), mode='bicubic')
        field = field + 0.08 * torch.randn(field.shape, generator=g)
        pixels = (field[0].clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
        path = folder / f'{i:05}.jpg'
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(str(path))
    listing = folder / 'train.txt'
    listing.write_text(''.join(f'{p}\n' for p in paths))
    return listing


class Trainer:
    """The U-Net, its EMA copy, AdamW and the timestep sampler, stepped as
    LightningDiffusion does (without Lightning's bookkeeping around it)."""

    def __init__(self, args, ae, cloob):
        self.args, self.ae, self.cloob = args, ae, cloob
        model = DiffusionModel(args.base_channels, args.channel_multipliers)
        fill_state_dict(model, {'autoencoder_scale': AUTOENCODER_SCALE})
        self.model = model.to(args.device).train()
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=3e-5, weight_decay=0.01,
                                           fused=True)
        self.sobol = torch.quasirandom.SobolEngine(1, scramble=True, seed=0)
        self.steps = 0

    def step(self, batch):
        device = self.args.device
        autocast = (torch.autocast('cuda', dtype=torch.bfloat16)
                    if self.args.precision == 'bf16' else nullcontext())
        with autocast:
            x0, cond = latents_and_conditions(batch, self.ae, self.cloob,
                                              self.model.autoencoder_scale)
            t = self.sobol.draw(x0.shape[0])[:, 0].to(device)
            loss = v_objective(self.model, x0, cond, t)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        ema_update(self.model, self.ema, ema_decay(self.steps))
        self.steps += 1


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def time_steps(trainer, loader, steps, args):
    """Median seconds per step, and of that the median spent waiting for the batch."""
    batches = iter(loader)
    totals, loads = [], []
    for i in range(args.warmup + steps):
        start = perf_counter()
        batch = {k: v.to(args.device, non_blocking=True) if torch.is_tensor(v) else v
                 for k, v in next(batches).items()}
        loaded = perf_counter()
        trainer.step(batch)
        sync(args.device)
        if i >= args.warmup:
            totals.append(perf_counter() - start)
            loads.append(loaded - start)
    return statistics.median(totals), statistics.median(loads)


def precompute(listing, root, ae, cloob, args):
    """Seconds per image to write the cache with the real precompute code: load,
    encode, embed, write the parts, finalize. The models are warmed up first."""
    encode(ae, cloob, torch.rand(args.batch_size, 3, args.image_size, args.image_size,
                                 device=args.device))
    sync(args.device)
    source = Source(listing)
    start = perf_counter()
    encoded = encode_units(source, range(len(source)), root, ae, cloob, args.image_size,
                           args.batch_size, args.num_workers, args.device, progress=False)
    latent_cache.finalize(root, len(source), {'source': str(listing)})
    return (perf_counter() - start) / encoded, encoded


def cpu_model():
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or 'unknown CPU'


def describe_machine(args):
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    lines = [f'date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}',
             f'CPU: {cpu_model()}, {cores} cores usable, torch threads {torch.get_num_threads()}',
             f'torch {torch.__version__}, Python {sys.version.split()[0]}']
    if hasattr(os, 'getloadavg'):
        lines.append('load average before the run: {:.2f} {:.2f} {:.2f}'.format(*os.getloadavg()))
    if args.device.type == 'cuda':
        lines.append(f'GPU: {torch.cuda.get_device_name(args.device)}')
    return lines


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(0)
    began = perf_counter()
    for line in describe_machine(args):
        print(line)
    mults = ','.join(map(str, args.channel_multipliers))
    print(f'device {args.device}, precision {args.precision}, batch {args.batch_size}, '
          f'{args.image_size} px images, U-Net base {args.base_channels} x {mults}, '
          f'loader workers {args.num_workers}; per path {args.warmup} warm-up steps, then '
          f'{args.steps} timed steps (original) and {args.cache_steps} (cache)\n', flush=True)

    flops = gflops_per_image(args)
    ae, cloob = frozen_models(args.device)
    images = args.batch_size * (args.warmup + max(args.steps, args.cache_steps))
    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        work = Path(work)
        listing = write_jpegs(work / 'images', images)
        paths = listing.read_text().splitlines()
        seconds_per_image, cached = precompute(listing, work / 'cache', ae, cloob, args)

        images_loader = make_loader(paths, args.image_size, args.batch_size, args.num_workers,
                                    seed=0)
        original = time_steps(Trainer(args, ae, cloob), images_loader, args.steps, args)
        cache_loader = latent_cache.make_cache_loader(work / 'cache', args.batch_size,
                                               args.num_workers, seed=0)
        from_cache = time_steps(Trainer(args, ae, cloob), cache_loader, args.cache_steps, args)

    n = args.batch_size
    print('| path | s/step (median) | of which waiting for the batch | images/s |')
    print('|---|---|---|---|')
    print(f'| original: {JPEG_SIZE[0]}x{JPEG_SIZE[1]} JPEG decode, Lanczos resize, crop, '
          f'encode, embed, every step | {original[0]:.3f} | {original[1]:.3f} '
          f'| {n / original[0]:.2f} |')
    print(f'| from the latent cache | {from_cache[0]:.3f} | {from_cache[1]:.3f} '
          f'| {n / from_cache[0]:.2f} |')
    print(f'| precompute, once per image ({cached} images, fp32: load, encode, embed, write) '
          f'| {seconds_per_image * n:.3f} (per {n} images) | | {1 / seconds_per_image:.2f} |')
    ratio = original[0] / from_cache[0]
    print(f'\ncache images/s over the original\'s: {ratio:.1f}x '
          f'(target: at least 3x; {"met" if ratio >= 3 else "NOT met"})\n')

    print('| part | GFLOP per image |')
    print('|---|---|')
    for part, value in flops.items():
        print(f'| {part} | {value:.1f} |')
    total, unet = sum(flops.values()), list(flops.values())[-1]
    print(f'\nFLOPs of a step per image, original over cache: {total:.1f} / {unet:.1f} = '
          f'{total / unet:.1f}x (matmuls and convolutions only; '
          'image decoding, the optimizer and the EMA are not counted)')
    print(f'\nfinished in {perf_counter() - began:.0f} s')


if __name__ == '__main__':
    main()

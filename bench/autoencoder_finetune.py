"""Does a decoder-only finetune with train_autoencoder.py adapt an autoencoder to a new
kind of image, and keep its encoder bit for bit? Measured in one run on one machine.

A kl-f8-family autoencoder (CompVis' kl-f8 layout: 4 levels, f=8, 4 latent channels, at
smaller widths so that it trains on a CPU) is first trained from random weights, --full,
on one synthetic domain: photo-like textures (1/f noise in random colours). Its decoder
is then finetuned, decoder-only, on another: flat-colour shapes with dark outlines and
lines (line-drawing-like art). Both runs go through train_autoencoder.py's own code path
(flags, validate, run). Reported: held-out PSNR and L1 on both domains before and after
the finetune, seconds per step (from the run's own perf/images_per_sec log) with and
without the discriminator and LPIPS, and whether the encoder stayed bit-identical.
Target: held-out PSNR on the new domain up by at least 2 dB, encoder bit-identical.

LPIPS needs VGG16 ImageNet weights, which cannot be downloaded here: the quality runs
use --perceptual-weight 0 (L1 + KL), and LPIPS with random weights is timed only.

    .venv/bin/python bench/autoencoder_finetune.py   (~20 min)
"""

import argparse
import csv
import os
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / 'latent-diffusion')]

from ccld.data.sources import Source  # noqa: E402
from ccld.models import perceptual  # noqa: E402
from ccld.models.autoencoder import (KL_F8_CONFIG, build_autoencoder, encoder_digest,  # noqa: E402
                                     load_autoencoder, read_config, save_autoencoder)
from ccld.train import autoencoder_flags, autoencoder_run  # noqa: E402
from ccld.sample import png_files  # noqa: E402
from ccld.train.reconstructions import metrics, read_images, reconstruct  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--image-size', type=int, default=64)
    p.add_argument('--ch', type=int, default=32, help='base width (kl-f8: 128)')
    p.add_argument('--num-res-blocks', type=int, default=1, help='kl-f8: 2')
    p.add_argument('--batch-size', type=int, default=8)
    p.add_argument('--train-images', type=int, default=512)
    p.add_argument('--held-out', type=int, default=64)
    p.add_argument('--pretrain-steps', type=int, default=1000)
    p.add_argument('--pretrain-lr', type=float, default=1e-3)
    p.add_argument('--finetune-steps', type=int, default=500)
    p.add_argument('--finetune-lr', type=float, default=3e-4)
    p.add_argument('--timing-steps', type=int, default=12)
    p.add_argument('--threads', type=int, default=1,
                   help='1: on a shared machine more threads spin against each other')
    p.add_argument('--work-dir', help='default: a temporary directory')
    return p.parse_args(argv)


def texture(rng, size):
    """Photo-like: per channel, noise with a 1/f^beta amplitude spectrum, mixed into
    random colours."""
    fy, fx = np.meshgrid(np.fft.fftfreq(size), np.fft.fftfreq(size), indexing='ij')
    radius = np.maximum(np.hypot(fx, fy), 1.0 / size)
    beta = rng.uniform(2.0, 3.0)  # smooth, as photographs mostly are
    fields = []
    for _ in range(3):
        spectrum = (rng.normal(size=(size, size)) + 1j * rng.normal(size=(size, size)))
        fields.append(np.fft.ifft2(spectrum / radius ** beta).real)
    mixed = np.tensordot(rng.normal(size=(3, 3)), np.stack(fields), axes=1)
    lo, hi = np.percentile(mixed, [1, 99], axis=(1, 2), keepdims=True)
    image = np.clip((mixed - lo) / (hi - lo + 1e-8), 0, 1)
    return Image.fromarray((image.transpose(1, 2, 0) * 255).astype(np.uint8))


def drawing(rng, size):
    """Line-art-like: flat-colour shapes with dark outlines, and a few lines."""
    colour = lambda: tuple(int(c) for c in rng.integers(0, 256, 3))  # noqa: E731
    image = Image.new('RGB', (size, size), colour() if rng.random() < 0.5 else (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(1, 4)):
        x0, y0 = rng.integers(0, size * 3 // 4, 2)
        w, h = rng.integers(size // 6, size // 2, 2)
        box = [int(x0), int(y0), int(x0 + w), int(y0 + h)]
        kind = rng.integers(3)
        width = int(rng.integers(1, 3))
        if kind == 0:
            draw.rectangle(box, fill=colour(), outline=(0, 0, 0), width=width)
        elif kind == 1:
            draw.ellipse(box, fill=colour(), outline=(0, 0, 0), width=width)
        else:
            points = [tuple(int(v) for v in rng.integers(0, size, 2)) for _ in range(3)]
            draw.polygon(points, fill=colour(), outline=(0, 0, 0))
    for _ in range(rng.integers(1, 4)):
        points = [tuple(int(v) for v in rng.integers(0, size, 2)) for _ in range(2)]
        draw.line(points, fill=(0, 0, 0), width=int(rng.integers(1, 3)))
    return image


def write_set(make, folder, n, size, seed):
    """n images from `make` as PNGs, and a path list of them."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f'{i:05}.png'
        make(rng, size).save(path)
        paths.append(path)
    listing = folder.with_suffix('.txt')
    listing.write_text(''.join(f'{p}\n' for p in paths))
    return listing


def train(argv):
    """train_autoencoder.py in this process: flags, checks, run."""
    args = autoencoder_flags.parser().parse_args(argv)
    return autoencoder_run.run(autoencoder_run.validate(args))


def seconds_per_step(out, batch_size):
    """From the run's own log: batch size over the mean of its later images/s readings."""
    with open(out / 'logs' / 'version_0' / 'metrics.csv') as f:
        rates = [float(r['perf/images_per_sec']) for r in csv.DictReader(f)
                 if r.get('perf/images_per_sec')]
    later = rates[len(rates) // 2:]
    return batch_size / (sum(later) / len(later)) if later else float('nan')  # (too few steps)


def evaluate(name, held_out, batch_size):
    """Metrics and reconstructions of each domain's held-out images."""
    ae = load_autoencoder(name)
    reconstructions = {d: reconstruct(ae, images, batch_size) for d, images in held_out.items()}
    return {d: metrics(held_out[d], r) for d, r in reconstructions.items()}, reconstructions


def step_flops(image_size, train_encoder, with_lpips, discriminator):
    """GFLOP per image of one training step (forward and backward) at the real kl-f8
    widths, counted on the meta device by torch's flop counter."""
    from torch.utils.flop_counter import FlopCounterMode

    from ldm.modules.losses import LPIPSWithDiscriminator
    with torch.device('meta'):
        ae = build_autoencoder(read_config(ROOT / KL_F8_CONFIG))
        loss = LPIPSWithDiscriminator(disc_start=0 if discriminator else 10 ** 9,
                                      perceptual_weight=1.0 if with_lpips else 0.0,
                                      perceptual_loss=perceptual.build_lpips('meta')
                                      if with_lpips else None)
        x = torch.empty(1, 3, image_size, image_size)
    ae.encoder.requires_grad_(train_encoder)
    ae.quant_conv.requires_grad_(train_encoder)
    with FlopCounterMode(display=False) as counter:
        with torch.set_grad_enabled(train_encoder):
            posterior = ae.encode(x)
        rec = ae.decode(posterior.sample())
        loss.discriminator.requires_grad_(False)
        total, _ = loss.generator_loss(x, rec, posterior, 0, ae.decoder.conv_out.weight)
        loss.discriminator.requires_grad_(True)
        if discriminator:
            total = total + loss.discriminator_loss(x, rec, 0)[0]
        total.backward()
    return counter.get_total_flops() / 1e9


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault('OMP_NUM_THREADS', str(args.threads))
    work = Path(args.work_dir or tempfile.mkdtemp(prefix='ae_bench_'))
    started = time.time()
    load = os.getloadavg()[0]
    s = args.image_size
    sets = {
        'textures': (write_set(texture, work / 'textures_train', args.train_images, s, 0),
                     write_set(texture, work / 'textures_held_out', args.held_out, s, 1)),
        'drawings': (write_set(drawing, work / 'drawings_train', args.train_images, s, 2),
                     write_set(drawing, work / 'drawings_held_out', args.held_out, s, 3)),
    }
    held_out = {d: read_images(Source(v[1]), args.held_out, s)[0] for d, v in sets.items()}

    config = read_config(ROOT / KL_F8_CONFIG)
    config['model']['params']['ddconfig'].update(ch=args.ch, num_res_blocks=args.num_res_blocks)
    torch.manual_seed(0)
    save_autoencoder(build_autoencoder(config), config, work / 'random_ae')
    common = ['--image-size', str(s), '--batch-size', str(args.batch_size), '--num-workers', '0',
              '--accelerator', 'cpu', '--seed', '0', '--perceptual-weight', '0',
              '--checkpoint-every', '100000', '--val-every', '1']

    train(['--train-set', str(sets['textures'][0]), '--vqgan-model', str(work / 'random_ae'),
           '--output-name', str(work / 'textures_ae'), '--output-dir', str(work / 'pretrain'),
           '--full', '--max-steps', str(args.pretrain_steps), '--lr', str(args.pretrain_lr),
           '--disc-start', str(10 ** 9), *common])
    before, shown_before = evaluate(work / 'textures_ae', held_out, args.batch_size)

    train(['--train-set', str(sets['drawings'][0]), '--vqgan-model', str(work / 'textures_ae'),
           '--output-name', str(work / 'drawings_ae'), '--output-dir', str(work / 'finetune'),
           '--max-steps', str(args.finetune_steps), '--lr', str(args.finetune_lr),
           '--disc-start', str(10 ** 9), *common])
    after, shown_after = evaluate(work / 'drawings_ae', held_out, args.batch_size)
    rows = [t[domain][:8] for domain in held_out for t in (held_out, shown_before, shown_after)]
    grid = png_files.save_png(png_files.grid(torch.cat(rows), 8), work / 'held_out.png')
    identical = encoder_digest(load_autoencoder(work / 'textures_ae').state_dict()) == \
        encoder_digest(load_autoencoder(work / 'drawings_ae').state_dict())

    # What the rest of the loss costs: the discriminator on, and LPIPS (random weights,
    # for its time only).
    g = torch.Generator().manual_seed(0)
    lpips = {k: 0.05 * torch.randn(v.shape, generator=g)
             for k, v in perceptual.build_lpips('meta').state_dict().items()}
    torch.save(dict(lpips, **perceptual.scaling_constants()), work / 'random_lpips.pth')
    timing = {'pretrain (--full, L1 + KL)': seconds_per_step(work / 'pretrain', args.batch_size),
              'decoder-only, L1 + KL': seconds_per_step(work / 'finetune', args.batch_size)}
    for label, extra in (('decoder-only, + discriminator', []),
                         ('decoder-only, + discriminator + LPIPS',
                          ['--perceptual-weight', '1', '--lpips-weights',
                           str(work / 'random_lpips.pth')])):
        out = work / label.replace(' ', '_').replace(',', '').replace('+', 'and')
        train(['--train-set', str(sets['drawings'][0]), '--vqgan-model', str(work / 'textures_ae'),
               '--output-name', str(out / 'ae'), '--output-dir', str(out),
               '--max-steps', str(args.timing_steps), '--lr', str(args.finetune_lr),
               *common, '--disc-start', '0', *extra])
        timing[label] = seconds_per_step(out, args.batch_size)

    print(f'\nautoencoder_finetune: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, '
          f'{os.cpu_count()} CPUs, {args.threads} torch threads, load average {load:.1f} at the '
          f'start, {time.time() - started:.0f} s in all; torch {torch.__version__}')
    print(f'kl-f8 layout at ch {args.ch}, {args.num_res_blocks} res block(s) a level '
          f'({sum(p.numel() for p in build_autoencoder(config).parameters()) / 1e6:.1f}M '
          f'parameters), {s} px, batch {args.batch_size}; pretrain {args.pretrain_steps} steps '
          f'--full at lr {args.pretrain_lr:g} on textures, finetune {args.finetune_steps} steps '
          f'decoder-only at lr {args.finetune_lr:g} on drawings; {args.train_images} training '
          f'and {args.held_out} held-out images per domain')
    print('\n| held-out domain | PSNR before | PSNR after | change | L1 before | L1 after |')
    print('| --- | --- | --- | --- | --- | --- |')
    for domain in held_out:
        b, a = before[domain], after[domain]
        print(f'| {domain} | {b["val/psnr"]:.2f} dB | {a["val/psnr"]:.2f} dB | '
              f'{a["val/psnr"] - b["val/psnr"]:+.2f} dB | {b["val/l1"]:.4f} | '
              f'{a["val/l1"]:.4f} |')
    print('\nGFLOP per image of a training step at the real kl-f8 widths (84M parameters), 256 px:')
    print('\n| step | GFLOP |')
    print('| --- | --- |')
    for label, settings in (('decoder-only, L1 + KL', (False, False, False)),
                            ('decoder-only, + discriminator', (False, False, True)),
                            ('decoder-only, + discriminator + LPIPS', (False, True, True)),
                            ('--full, + discriminator + LPIPS', (True, True, True))):
        print(f'| {label} | {step_flops(256, *settings):.0f} |')
    print('\n| run | s/step |')
    print('| --- | --- |')
    for label, value in timing.items():
        print(f'| {label} | {value:.3f} |')
    gain = after['drawings']['val/psnr'] - before['drawings']['val/psnr']
    print(f'\n{grid}: per domain, held-out images above their reconstructions before and '
          'after the finetune')
    print(f'encoder and quant_conv bit-identical after the finetune: {identical}')
    print(f'target (held-out PSNR on drawings +2 dB, encoder bit-identical): '
          f'{"met" if gain >= 2 and identical else "NOT met"} ({gain:+.2f} dB)')


if __name__ == '__main__':
    main()

#!/usr/bin/env python3
"""Seconds per image through app.py's API (/generate, by gradio_client) against sample.py's
library call on the same settings (load_sampler, sampler.sample and the PNG writes), with
the page's job run in this process between them (where the time goes: the job, or the
server), and the time from starting app.py to its first image; one run, alternating.

    PYTHONPATH=.:latent-diffusion:tests python3 bench/app_latency.py     # GPU when there is one

The page should add under 5% to a 50-step image. A random U-Net (the time does not depend
on its weights) in a ccld checkpoint that records a tiny autoencoder and CLOOB, so that
`app.py --checkpoint FILE` needs no other flag; PLMS, 50 steps, guided by one text prompt.
On a CUDA GPU: the 557M U-Net (base 128, multipliers 4,4,8,8), 256 px, 4 images a request;
on the CPU: base 64, multipliers 1,2,2,4, 128 px, 2 images.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / 'latent-diffusion'), str(ROOT / 'tests')]

import torch  # noqa: E402

GPU = dict(widths=(128, [4, 4, 8, 8]), size=256, n=4)
CPU = dict(widths=(64, [1, 2, 2, 4]), size=128, n=2)
PROMPT = 'a watercolor of a lighthouse'


def write_models(folder, widths, size):
    """A ccld checkpoint of a random U-Net of `widths` that records its frozen models."""
    import tiny
    autoencoder, cloob = tiny.tiny_autoencoder(folder), tiny.tiny_cloob(folder)
    model = tiny.tiny_diffusion(0, 1.0, *widths)
    record = {'autoencoder': str(Path(autoencoder).resolve()),
              'cloob_checkpoint': str(Path(cloob).resolve()), 'image_size': size}
    return tiny.save_ccld_checkpoint(folder / 'bench.ckpt', model, model, record)


def library(checkpoint, device, n, steps, out):
    """sample.py's library call for one request: returns a function that runs it."""
    from ccld.models.autoencoder import load_autoencoder
    from ccld.models.cloob import load_cloob
    from ccld.sample import generate, sampler
    from ccld.sample.flags import parser
    args = parser().parse_args([PROMPT, '--checkpoint', str(checkpoint), '-n', str(n),
                                '--steps', str(steps), '--device', str(device)])
    sampler.resolve_model_names(args)
    model, settings = sampler.load_sampler(args, str(checkpoint), device)
    autoencoder = load_autoencoder(settings.autoencoder, device=device)
    cloob = load_cloob(settings.cloob, device)

    def run():
        embeds, weights = generate.embed_prompts(cloob, [(PROMPT, 3.0)], [])
        batches = sampler.sample(model, settings, autoencoder, embeds, weights,
                                 batch_size=n, device=device, progress=False)
        generate.write_samples(batches, out, 'bench', settings.metadata(), grid_too=False)
    return run


def page_job(checkpoint, device, request):
    """The page's job (ccld.app.engine) for `request`, run in this process: what the
    server runs for /generate, without the server."""
    import app
    from ccld.app.engine import Engine
    engine = Engine(app.parser().parse_args(['--checkpoint', str(checkpoint), '--device',
                                             str(device)]))
    fields = {k: v for k, v in request.items() if k != 'api_name'}
    return lambda: engine.run(fields)


def timed(fn, device):
    if device.type == 'cuda':
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == 'cuda':
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--steps', type=int, default=50)
    p.add_argument('--repeats', type=int, default=3)
    p.add_argument('--port', type=int, default=7870)
    a = p.parse_args()
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    setup = GPU if device.type == 'cuda' else CPU
    folder = Path(tempfile.mkdtemp(prefix='app-bench-'))
    checkpoint = write_models(folder, setup['widths'], setup['size'])
    n = setup['n']

    started = time.perf_counter()
    log = open(folder / 'server.log', 'w+')
    server = subprocess.Popen([sys.executable, str(ROOT / 'app.py'), '--checkpoint',
                               str(checkpoint), '--port', str(a.port), '--device', str(device)],
                              cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, 'PYTHONPATH': os.pathsep.join(sys.path[:3])})
    try:
        while 'serving' not in Path(log.name).read_text():
            if server.poll() is not None or time.perf_counter() - started > 600:
                sys.exit(f'app.py did not start:\n{Path(log.name).read_text()}')
            time.sleep(0.1)
        from gradio_client import Client
        client = Client(f'http://127.0.0.1:{a.port}', verbose=False)
        request = dict(prompt=PROMPT, n=n, seed=0, steps=a.steps, method='plms',
                       size=str(setup['size']), api_name='/generate')
        client.predict(**request)
        first_image = time.perf_counter() - started
        run = library(checkpoint, device, n, a.steps, folder / 'library')
        run()  # warm-up, as the server's first request was
        job = page_job(checkpoint, device, request)
        job()
        api, lib, page = [], [], []
        for _ in range(a.repeats):
            lib.append(timed(run, device) / n)
            page.append(timed(job, device) / n)
            api.append(timed(lambda: client.predict(**request), device) / n)
    finally:
        server.terminate()
        server.wait(30)
        log.close()
        shutil.rmtree(folder, ignore_errors=True)  # the models and images: ~170 MB a run
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'
    widths = setup['widths']
    print(f'{device.type} ({name}), U-Net base {widths[0]} x {widths[1]}, {setup["size"]} px, '
          f'PLMS {a.steps} steps guided, {n} images a request, median of {a.repeats}:')
    lib_s, page_s, api_s = (statistics.median(x) for x in (lib, page, api))
    print(f'- library call (sample.py):         {lib_s:.3f} s per image')
    print(f"- the page's job in this process:   {page_s:.3f} s per image "
          f'({100 * (page_s / lib_s - 1):+.1f}%)')
    print(f'- page API (/generate, app.py):     {api_s:.3f} s per image')
    print(f'- the page adds {100 * (api_s / lib_s - 1):+.1f}% (target: under 5%)')
    print(f'- from starting app.py to its first image: {first_image:.1f} s')


if __name__ == '__main__':
    main()

#!/usr/bin/env python3
"""What app.py's page adds to an image: each /generate request (gradio_client, the client's
wall time) against the library call that served it, timed inside the server (sample.py's
call: embed_prompts, sampler.sample and the PNG writes, less the page's per-step progress
callback, which is counted as the page's); and, interleaved with the requests, the same
library call in this process, as sample.py runs it; and the time from starting app.py to
its first image.

    PYTHONPATH=.:latent-diffusion:tests python3 bench/app_latency.py     # GPU when there is one
    PYTHONPATH=.:latent-diffusion:tests python3 bench/app_latency.py --threads 1  # a shared CPU

The page should add under 5% to a 50-step image. The server is app.py in its own process,
with timers around the library call (this bench's server only; app.py has none). A random
U-Net (the time does not depend on its weights) in a ccld checkpoint that records a tiny
autoencoder and CLOOB, so that `app.py --checkpoint FILE` needs no other flag; PLMS, 50
steps, guided by one text prompt. On a CUDA GPU: the 557M U-Net (base 128, multipliers
4,4,8,8), 256 px, 4 images a request; on the CPU: base 64, multipliers 1,2,2,4, 128 px, 2.
"""

import argparse
import json
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


def timed_server(argv, timings):
    """app.py `argv`, each job of which appends a JSON line to `timings`: the seconds of
    its library call (embed_prompts, and write_samples, which runs the sampler's
    generator), of the page's step callbacks within it, and of the whole job
    (Engine.run: the request checked, the lock, the library call, the metadata)."""
    import app
    from ccld import cli
    from ccld.app import engine
    from ccld.app.flags import PROG
    clock = {}

    def timer(key, fn):
        def timed_fn(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                clock[key] = clock.get(key, 0.0) + time.perf_counter() - start
        return timed_fn

    generate, sampler, run = engine.generate, engine.sampler, engine.Engine.run
    generate.embed_prompts = timer('library', generate.embed_prompts)
    generate.write_samples = timer('library', generate.write_samples)
    sample = sampler.sample
    sampler.sample = lambda *a, callback, **k: sample(*a, callback=timer('callbacks', callback),
                                                      **k)

    def timed_run(self, request, progress=None):
        clock.clear()
        result = timer('job', run)(self, request, progress)
        with open(timings, 'a') as f:
            f.write(json.dumps(clock) + '\n')
        return result
    engine.Engine.run = timed_run
    cli.run(lambda: app.main(argv), PROG)


def timed(fn, device):
    if device.type == 'cuda':
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == 'cuda':
        torch.cuda.synchronize()
    return time.perf_counter() - start


def spread(values):
    """'median (min to max)' of percentages."""
    return (f'{statistics.median(values):+.1f}% ({min(values):+.1f}% to '
            f'{max(values):+.1f}%)')


def main():
    if sys.argv[1:2] == ['--serve']:  # the server this bench starts: --serve TIMINGS ARGS
        return timed_server(sys.argv[3:], sys.argv[2])
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--steps', type=int, default=50)
    p.add_argument('--repeats', type=int, default=10, help='requests timed (after one)')
    p.add_argument('--port', type=int, default=7870)
    p.add_argument('--threads', type=int, help="torch's CPU threads, in the server and here "
                   '(1 on a CPU that other jobs share: two threads wait on each other there)')
    a = p.parse_args()
    threads = {'OMP_NUM_THREADS': str(a.threads)} if a.threads else {}
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    setup = GPU if device.type == 'cuda' else CPU
    folder = Path(tempfile.mkdtemp(prefix='app-bench-'))
    checkpoint = write_models(folder, setup['widths'], setup['size'])
    n = setup['n']
    timings = folder / 'timings.jsonl'

    started = time.perf_counter()
    log = open(folder / 'server.log', 'w+')
    server = subprocess.Popen([sys.executable, __file__, '--serve', str(timings),
                               '--checkpoint', str(checkpoint), '--port', str(a.port),
                               '--device', str(device)],
                              cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, **threads,
                                   'PYTHONPATH': os.pathsep.join(sys.path[:3])})
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
        walls, local = [], []
        for i in range(a.repeats):  # in turn first, so that a drift favours neither
            if i % 2:
                local.append(timed(run, device))
            walls.append(timed(lambda: client.predict(**request), device))
            if not i % 2:
                local.append(timed(run, device))
    finally:
        server.terminate()
        server.wait(30)
        log.close()
        jobs = [json.loads(line) for line in timings.read_text().splitlines()] \
            if timings.exists() else []
        shutil.rmtree(folder, ignore_errors=True)  # the models and images: ~170 MB a run
    jobs = jobs[1:]  # the first request's
    callbacks = [job.get('callbacks', 0.0) for job in jobs]
    lib = [job['library'] - c for job, c in zip(jobs, callbacks)]
    pct = lambda x, y: [100 * (a / b - 1) for a, b in zip(x, y)]  # noqa: E731
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'
    widths = setup['widths']
    print(f'{device.type} ({name}), U-Net base {widths[0]} x {widths[1]}, {setup["size"]} px, '
          f'PLMS {a.steps} steps guided, {n} images a request, {torch.get_num_threads()} '
          f'threads, {a.repeats} requests, median (min to max):')
    print(f'- library call in the server:   {statistics.median(lib) / n:.3f} s per image')
    print(f'- request through /generate:    {statistics.median(walls) / n:.3f} s per image')
    print(f'- the page adds (request against its own library call): {spread(pct(walls, lib))}'
          ' (target: under 5%)')
    print(f'  - the step callbacks: {spread([100 * c / x for c, x in zip(callbacks, lib)])}')
    print('  - the job around the library call (checks, lock, metadata): '
          f'{spread([100 * (j["job"] - x - c) / x for j, x, c in zip(jobs, lib, callbacks)])}')
    print('  - Gradio, the client and the transfers: '
          f'{spread([100 * (w - j["job"]) / x for w, j, x in zip(walls, jobs, lib)])}')
    print(f'- library call in this process, as sample.py: {statistics.median(local) / n:.3f} '
          's per image; the request against the one next to it: '
          f'{spread(pct(walls, local))}; the server\'s library call against it: '
          f'{spread(pct(lib, local))}')
    print(f'- from starting app.py to its first image: {first_image:.1f} s')


if __name__ == '__main__':
    main()

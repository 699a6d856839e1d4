"""Peak host memory of loading a model, as a new user meets it: each tool run as a fresh
process, its peak RSS (ru_maxrss, which /usr/bin/time -v reports) against that of importing
torch, Lightning and ccld alone, and against the size of the fp32 model.

Why: sample.py, export_model.py and a LoRA start each held two or three copies of the
weights while loading them (issue 25). Rows: sample.py on the fp32 state dict and on its
fp16 export (2 steps, 64 px), export_model.py of the state dict and --merge of a LoRA
checkpoint, training --lora-rank 16 on the state dict (2 steps) and, for the LoRA target,
the full finetune with the same flags; then --resume-from that finetune's checkpoint (a
ccld training checkpoint with its EMA and optimizer state) for 2 more steps. A training
row also gives its peak before the first step (at on_train_start: loading, Lightning's
restore and setup done). Files: a 557M U-Net written as a bare fp32 state dict (fresh
weights), tiny frozen models; in --workdir (2.2 GB and more, ~20 GB with the resume row:
put it under /tmp), removed after.

Measure another checkout (the code before: git worktree add ../load_before ae39dc7; for
the resume row, 6b7db4d) with --repo; the files are made by this one, the tools run from
that one.
    .venv/bin/python bench/load_memory.py                      # this checkout
    .venv/bin/python bench/load_memory.py --repo ../load_before
GPU (--device cuda): the rows run on the GPU and also print torch.cuda.max_memory_allocated;
the host peak of an fp16 export should stay near one tensor above the imports.
Targets (issue 25): sample.py and export_model.py at most 1.15x the fp32 model above the
imports on the CPU (1.15x the fp16 file on a GPU run's host side); the LoRA run's peak at
most 35% of the full finetune's; a full finetune's start no higher than its training peak;
1.17B figures are the ones above the imports x 1.17/0.557.
"""

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RELEASED = 1_174_321_228  # yfcc_cfg's parameters (base 192 x 4,4,8,8)
IMPORTS = 'import torch, pytorch_lightning, ccld.sample.generate, ccld.train.run'
# Runs a script as a user would, then reports the GPU peak when there is a GPU; a training
# run also reports its peak RSS so far when training starts.
WRAPPER = '''import resource, runpy, sys, torch
sys.argv = sys.argv[1:]
if sys.argv[0].endswith('train_latent_diffusion.py'):
    from ccld.train.diffusion_module import LightningDiffusion
    on_train_start = LightningDiffusion.on_train_start
    def report_start(self):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print("START_PEAK", peak, file=sys.stderr)
        on_train_start(self)
    LightningDiffusion.on_train_start = report_start
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    if torch.cuda.is_available():
        print("CUDA_PEAK", torch.cuda.max_memory_allocated(), file=sys.stderr)
'''


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--repo', default=str(ROOT), help='the checkout whose tools are measured')
    p.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    p.add_argument('--base-channels', type=int, default=128)
    p.add_argument('--channel-multipliers', default='4,4,8,8')
    p.add_argument('--workdir', help='where the files go (default: a new folder in /tmp)')
    p.add_argument('--rows', default='sample,export,sample16,lora,merge,full,resume',
                   help='which rows, comma-separated (full: the full finetune, ~12 GB at 557M; '
                   'resume continues it: with full, and 2 checkpoints of 16 bytes a weight)')
    p.add_argument('--make-files', help=argparse.SUPPRESS)
    return p.parse_args(argv)


def make_files(spec):
    """The base state dict and the tiny frozen models (run in a child process)."""
    sys.path[:0] = [str(ROOT), str(ROOT / 'latent-diffusion')]
    import torch
    from ccld.train import quickstart
    from ccld.models.unet import DiffusionModel
    d = Path(spec['dir'])
    torch.manual_seed(0)
    model = DiffusionModel(spec['base'], spec['mults'])
    torch.save(model.state_dict(), d / 'base.pth')
    del model
    paths = quickstart.make_images(d / 'images', n=4, size=64)
    quickstart.write_path_list(paths, d / 'train.txt')
    quickstart.make_tiny_autoencoder(d / 'ae')
    quickstart.make_tiny_cloob(d / 'cloob.pkl')
    (d / 'prompts.txt').write_text('a red circle\n')


def measure(repo, argv, cwd):
    """(peak RSS bytes, GPU peak bytes or None, error line or None, peak RSS bytes when
    training started or None) of one fresh process: its own high-water mark (ru_maxrss), as
    wait4 reports it for that child alone."""
    # (Packages installed beside the interpreter's, as bench/gpu.sh does, stay importable.)
    paths = [str(repo), f'{repo}/latent-diffusion', *filter(None, [os.environ.get('PYTHONPATH')])]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths), PYTHONUNBUFFERED='1')
    with tempfile.TemporaryFile('w+') as out:
        process = subprocess.Popen([sys.executable, '-c', WRAPPER, *argv], cwd=cwd, env=env,
                                   stdout=out, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read()
    cuda = re.search(r'CUDA_PEAK (\d+)', text)
    start = re.search(r'START_PEAK (\d+)', text)
    error = None
    if process.returncode:
        lines = [line for line in text.splitlines() if line.strip()]
        error = lines[-1][:160] if lines else f'exit {process.returncode}'
    return (usage.ru_maxrss * 1024, int(cuda[1]) if cuda else None, error,
            int(start[1]) * 1024 if start else None)


def rows(args, d):
    """(key, label, argv) of each row, in the order they run (each may need the last)."""
    repo = Path(args.repo)
    frozen = ['--autoencoder', str(d / 'ae'), '--cloob-checkpoint', str(d / 'cloob.pkl'),
              '--autoencoder-scale', '1']
    sample = [str(repo / 'sample.py'), 'a red fox', *frozen, '--size', '64', '--steps', '2',
              '--method', 'ddim', '-n', '1', '--device', args.device, '--output-dir',
              str(d / 'samples')]
    train = [str(repo / 'train_latent_diffusion.py'), '--train-set', str(d / 'train.txt'),
             '--vqgan-model', str(d / 'ae'), '--cloob-checkpoint', str(d / 'cloob.pkl'),
             '--autoencoder-scale', '1', '--demo-prompts', str(d / 'prompts.txt'),
             '--accelerator', 'gpu' if args.device == 'cuda' else 'cpu', '--num-workers', '0',
             '--batch-size', '1', '--image-size', '64', '--max-steps', '2',
             '--demo-every', '1000', '--seed', '0', '--resume-from', str(d / 'base.pth')]
    return [
        ('sample', 'sample.py, the fp32 state dict, 2 steps',
         [*sample, '--checkpoint', str(d / 'base.pth')]),
        ('export', 'export_model.py of the state dict (fp16)',
         [str(repo / 'export_model.py'), str(d / 'base.pth'), str(d / 'export.safetensors')]),
        ('sample16', 'sample.py, the fp16 safetensors export',
         [*sample, '--checkpoint', str(d / 'export.safetensors')]),
        ('lora', 'training --lora-rank 16 on the state dict, 2 steps',
         [*train, '--lora-rank', '16', '--output-dir', str(d / 'lora')]),
        ('merge', 'export_model.py --merge of the LoRA checkpoint',
         [str(repo / 'export_model.py'), str(d / 'lora' / 'checkpoints' / 'last.ckpt'),
          str(d / 'merged.safetensors'), '--merge']),
        ('full', 'training, full finetune of the state dict, 2 steps',
         [*train, '--output-dir', str(d / 'full')]),
        ('resume', 'training --resume-from its step 2 (full checkpoint), 2 more steps',
         [*train, '--output-dir', str(d / 'full'), '--max-steps', '4', '--resume-from',
          str(d / 'full' / 'checkpoints' / 'last.ckpt')]),
    ]


def gb(n):
    return f'{n / 1e9:.2f}'


def main(argv=None):
    args = parse_args(argv)
    if args.make_files:
        return make_files(json.loads(args.make_files))
    import torch
    d = Path(args.workdir or tempfile.mkdtemp(prefix='load_memory_', dir='/tmp'))
    d.mkdir(parents=True, exist_ok=True)
    mults = [int(m) for m in args.channel_multipliers.split(',')]
    try:
        spec = json.dumps({'dir': str(d), 'base': args.base_channels, 'mults': mults})
        subprocess.run([sys.executable, __file__, '--make-files', spec], check=True)
        model_bytes = (d / 'base.pth').stat().st_size
        parameters = model_bytes // 4
        repo = Path(args.repo).resolve()
        commit = subprocess.run(['git', '-C', str(repo), 'rev-parse', '--short', 'HEAD'],
                                capture_output=True, text=True).stdout.strip()
        cpu = next((line.split(':', 1)[1].strip() for line in open('/proc/cpuinfo')
                    if line.startswith('model name')), platform.processor())
        gpu = torch.cuda.get_device_name() if args.device == 'cuda' else 'none'
        (d / 'imports.py').write_text(IMPORTS + '\n')
        imports, _, error, _ = measure(repo, [str(d / 'imports.py')], d)
        print(f'{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; CPU: {cpu}; GPU: {gpu}; '
              f'torch {torch.__version__}; code: {repo} at {commit}')
        print(f'U-Net base {args.base_channels} x {args.channel_multipliers}: fp32 state dict '
              f'{gb(model_bytes)} GB (~{parameters / 1e6:.0f}M); importing torch, Lightning and '
              f'ccld peaks at {gb(imports)} GB{f" ({error})" if error else ""}. Peak RSS of '
              f'each tool as a fresh process (ru_maxrss), GB (10^9 bytes); 1.17B: the '
              f'part above the imports x {RELEASED / parameters:.2f}, plus the imports.\n')
        cuda = args.device == 'cuda'
        print(f'| what | peak RSS | above the imports | x the fp32 model | 1.17B | '
              f'training: peak at its start |{" GPU max_memory_allocated |" if cuda else ""}')
        print(f'| --- | --- | --- | --- | --- | --- |{" --- |" if cuda else ""}')
        wanted = args.rows.split(',')
        peaks, starts = {}, {}
        for key, label, row in rows(args, d):
            if key not in wanted:
                continue
            peak, gpu_peak, error, start = measure(repo, row, d)
            peaks[key], starts[key] = peak, start
            above = peak - imports
            scaled = imports + above * RELEASED / parameters
            note = f' (failed: {error})' if error else ''
            print(f'| {label}{note} | {gb(peak)} | {gb(above)} | {above / model_bytes:.2f} | '
                  f'{gb(scaled)} | {gb(start) if start else "-"} |'
                  f'{f" {gb(gpu_peak or 0)} |" if cuda else ""}', flush=True)
        if cuda and 'sample16' in peaks:
            export = (d / 'export.safetensors').stat().st_size
            print(f'\nsample.py of the fp16 export on the GPU, host peak above the imports: '
                  f'{(peaks["sample16"] - imports) / export:.2f}x the file (target at most 1.15)')
        if 'lora' in peaks and 'full' in peaks:
            print(f'\nLoRA run / full finetune, whole-process peaks: '
                  f'{peaks["lora"] / peaks["full"]:.0%} (target at most 35%)')
        if starts.get('full'):
            print(f'Full finetune: {gb(starts["full"])} GB when training starts, '
                  f'{gb(peaks["full"])} GB at its peak (target: the start no higher)')
        print('command: ' + shlex.join([sys.executable, *sys.argv]))
    finally:
        if not args.workdir:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == '__main__':
    main()

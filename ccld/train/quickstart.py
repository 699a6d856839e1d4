"""The embedded demo: the whole pipeline on tiny random models, on the CPU, offline.

It writes generated images, a path list, a tiny KL autoencoder (NAME.yaml + NAME.ckpt)
and a tiny CLOOB (.pkl + .json) through the same file formats real users have, then
trains and samples from flags as the two command-line tools do, through the same
library calls. It proves the
pipeline runs; it does not produce a useful model.
"""

import json
import random
import shutil
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from ..errors import UserError

CONFIGS = Path(__file__).resolve().parents[2] / 'configs'
REPO = CONFIGS.parent


def make_images(folder, n=64, size=64, seed=0):
    """n images of coloured shapes on coloured backgrounds; returns their paths."""
    rng = random.Random(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        colour = lambda: tuple(rng.randrange(256) for _ in range(3))  # noqa: E731
        image = Image.new('RGB', (size, size), colour())
        draw = ImageDraw.Draw(image)
        for _ in range(rng.randint(1, 3)):
            x0, y0 = rng.randrange(size // 2), rng.randrange(size // 2)
            w, h = rng.randint(size // 4, size // 2), rng.randint(size // 4, size // 2)
            box = [x0, y0, x0 + w, y0 + h]
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour())
        path = folder / f'{i:04}.png'
        image.save(path)
        paths.append(path)
    return paths


def write_path_list(paths, path):
    Path(path).write_text(''.join(f'{p}\n' for p in paths))
    return Path(path)


def make_tiny_autoencoder(name, seed=0):
    """A randomly initialised tiny KL f=8 autoencoder saved as NAME.yaml + NAME.ckpt."""
    from ..models.autoencoder import build_autoencoder, read_config, save_autoencoder
    config = read_config(CONFIGS / 'tiny_autoencoder.yaml')
    torch.manual_seed(seed)
    save_autoencoder(build_autoencoder(config), config, name)
    return str(name)


def make_tiny_cloob(path, seed=0):
    """A randomly initialised tiny CLOOB with 512-d embeddings, as a .pkl + .json."""
    from cloob_training.model_pt import get_pt_model, save_jax_checkpoint
    config = json.loads((CONFIGS / 'tiny_cloob.json').read_text())
    torch.manual_seed(seed)
    save_jax_checkpoint(get_pt_model(config), path)
    return Path(path)


MARKER = 'ccld-demo.txt'


def clear_previous_demo(out):
    """The demo starts afresh each time: it removes what an earlier demo wrote in `out`
    (known by the marker file it leaves), and refuses a directory that holds anything
    else rather than touch it."""
    if out.exists() and not (out / MARKER).is_file() and any(out.iterdir()):
        raise UserError(f'--output-dir {out} holds other files; the demo writes to a new '
                        'directory (default demo_output).')
    for product in ('run', 'samples'):
        shutil.rmtree(out / product, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text('Written by train_latent_diffusion.py --demo, which replaces '
                              'this directory\'s contents when run again.\n')


def check_demo_flags(args, defaults):
    """The demo trains with its own settings: a flag besides --output-dir would be
    silently ignored, so it is refused."""
    given = [name for name, value in vars(args).items()
             if name not in ('demo', 'output_dir') and value != getattr(defaults, name, value)]
    if given:
        flags = ', '.join('--' + name.replace('_', '-') for name in given)
        raise UserError(f'--demo runs with its own settings and takes only --output-dir; drop '
                        f'{flags}, or train without --demo.')


def run(output_dir):
    from ..data.scale import estimate_scale
    from ..models.autoencoder import load_autoencoder
    from ..sample import flags as sample_flags, run as sample_run
    from . import flags as train_flags, run as train_run

    out = Path(output_dir).resolve()
    assets, run_dir = out / 'assets', out / 'run'
    clear_previous_demo(out)
    print(f'ccld demo: a pipeline check on tiny random models, on the CPU, writing to {out}.\n'
          'It does not train a useful model.')
    paths = make_images(assets / 'images')
    train_list = write_path_list(paths, assets / 'train.txt')
    ae_name = make_tiny_autoencoder(assets / 'tiny_kl_f8')
    cloob_path = make_tiny_cloob(assets / 'tiny_cloob.pkl')

    print('\n[1/3] autoencoder scale of the generated images')
    scale = estimate_scale(load_autoencoder(ae_name), paths, batches=4, batch_size=16,
                           image_size=64).scale
    print(f'--autoencoder-scale {scale:.6g}')

    print('\n[2/3] training')
    train_run.run(train_run.validate(train_flags.parser().parse_args([
        '--train-set', str(train_list), '--vqgan-model', ae_name,
        '--autoencoder-scale', f'{scale:.6g}', '--cloob-checkpoint', str(cloob_path),
        '--demo-prompts', str(REPO / 'demo_prompts.txt'), '--output-dir', str(run_dir),
        '--accelerator', 'cpu', '--num-workers', '2', '--batch-size', '8',
        '--base-channels', '64', '--channel-multipliers', '1,1,1,1',
        '--image-size', '64', '--max-steps', '120', '--checkpoint-every', '120',
        '--demo-every', '60', '--demo-steps', '10', '--seed', '0'])))

    print('\n[3/3] sampling from the checkpoint')
    sample_run.run(sample_flags.parser().parse_args([
        'a watercolor painting of a Christmas tree',
        '--checkpoint', str(run_dir / 'checkpoints' / 'last.ckpt'), '--autoencoder', ae_name,
        '--cloob-checkpoint', str(cloob_path), '-n', '4', '--steps', '10', '--device', 'cpu',
        '--output-dir', str(out / 'samples')]))

    print(f'\nDemo finished. Checkpoints: {run_dir / "checkpoints"}; demo grids: '
          f'{run_dir / "demos"}; samples: {out / "samples"}.\n'
          'This was a pipeline check on random models, not a trained model. To train for real:\n'
          '  python3 compute_ae_scale.py kl_f8 train.txt\n'
          '  python3 train_latent_diffusion.py --train-set train.txt --vqgan-model kl_f8 '
          '--autoencoder-scale SCALE --demo-prompts demo_prompts.txt --num-gpus 8 '
          '--wandb-project my-project')

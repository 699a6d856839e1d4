"""The flags of sample.py: the original cfg_sample.py's, with the same names and defaults,
and those added since. Here rather than in the script so that the --demo pipeline check
and other tools can sample from flags without importing the script; the flags that say how
a checkpoint samples are added by one function, which evaluate.py shares."""

from .. import cli

DESCRIPTION = ('Samples images from a CLOOB-conditioned latent diffusion model, guided by '
               'text and image prompts.')
PROG = 'sample.py'
DEFAULT_SIZE = 256
DEFAULT_STRENGTH = 0.9
DEFAULT_BATCH_SIZE = 16
# The frozen models of a checkpoint that records none (a released state dict).
DEFAULT_AUTOENCODER = 'kl_f8'
DEFAULT_CLOOB = 'cloob_laion_400m_vit_b_16_16_epochs'


def add_sampling_flags(p):
    """The flags that say how a checkpoint samples, the same in every tool that samples
    (sample.py, evaluate.py), so that the same flags give the same images."""
    p.add_argument('--cloob-checkpoint',
                   help=f'{cli.CLOOB_HELP} (default: the one the checkpoint, export or --lora '
                   f'adapter records, else {DEFAULT_CLOOB})')
    p.add_argument('--autoencoder', metavar='NAME',
                   help=f'{cli.AUTOENCODER_HELP} (default: the one the checkpoint, export or '
                   f'--lora adapter records, else {DEFAULT_AUTOENCODER})')
    p.add_argument('--base-channels', type=cli.positive_int,
                   help='override the width read from the weights (yfcc_cfg: 192)')
    p.add_argument('--channel-multipliers', type=cli.multipliers,
                   help='override the multipliers read from the weights (yfcc_cfg: 4,4,8,8)')
    p.add_argument('--cond-scale', type=cli.finite_float, default=3.0,
                   help='guidance scale of prompts without a weight')
    p.add_argument('--device', type=cli.device, help='default: cuda if available, else cpu')
    p.add_argument('--eta', type=cli.finite_float, default=0.0,
                   help='noise added at each step of ddim, in [0, 1]')
    p.add_argument('--method', choices=cli.SAMPLING_METHODS,
                   help='sampler (default: plms; a distilled student: ddim)')
    p.add_argument('-n', type=cli.positive_int, default=4,
                   help='number of images (of each prompt of --prompts-file)')
    p.add_argument('--seed', type=cli.seed, default=0,
                   help='random seed (each line of --prompts-file starts from the same noise)')
    p.add_argument('--steps', type=cli.positive_int,
                   help='sampling steps, one model call each (prk: 4; pie: 2; plms: 4 for '
                   'the first 3) (default: 50; a distilled student: its own)')
    # Added since the original.
    p.add_argument('--schedule', default='spliced', choices=cli.SCHEDULES,
                   help="timesteps: the original's spliced DDPM/cosine, or Karras et al.'s "
                   "(sigma 80 to 0.03, rho 7)")
    p.add_argument('--autoencoder-scale', type=cli.positive_float,
                   help='override the latent scale stored in the checkpoint (or the --lora '
                   "adapter: its run's)")
    p.add_argument('--size', type=cli.image_size, metavar='WxH',
                   help=f'output image size, WIDTHxHEIGHT (384x256) or one number for a square, '
                   f'each side a multiple of {cli.SIZE_MULTIPLE}; far from the training size '
                   f'objects repeat (larger) or are cut off (smaller) (default: the training '
                   f'size a ccld checkpoint, export or --lora adapter records, else '
                   f'{DEFAULT_SIZE})')
    p.add_argument('--batch-size', type=cli.positive_int,
                   help=f'images per batch (default {DEFAULT_BATCH_SIZE}); the images do not '
                   'depend on it')
    p.add_argument('--lora', action='append', default=[], type=cli.adapter_spec,
                   metavar='FILE[:STRENGTH]',
                   help='put a LoRA adapter (export_model.py of a --lora-rank run) on the model, '
                   'scaled by STRENGTH (default 1; 0: the base model); repeat for several. An '
                   'adapter made for another base is refused; FILE may be a hub name, '
                   'hf://OWNER/NAME[@REVISION][/FILE]')
    return p


def parser():
    p = cli.ArgumentParser(prog=PROG, description=DESCRIPTION)
    # The original script's flags, same names and defaults (and the sampling flags).
    p.add_argument('prompts', nargs='*', default=[],
                   help='text prompts, "text" or "text:weight" (default weight: --cond-scale)')
    p.add_argument('--images', nargs='*', default=[], metavar='IMAGE',
                   help='image prompts, "path" or "path:weight"; http(s) URLs work too')
    p.add_argument('--checkpoint', required=True,
                   help='released model state dict, model export (export_model.py), ccld '
                   'training checkpoint or checkpoint of the original training script '
                   '(training checkpoints use the EMA weights)' + cli.HUB_FILE_HELP)
    add_sampling_flags(p)
    # Added.
    p.add_argument('--prompts-file', metavar='FILE',
                   help='sample -n images of each line of FILE, one prompt a line ("text" or '
                   '"text:weight"; blank lines and # comments skipped); instead of PROMPTS')
    p.add_argument('--output-dir', default='.', help='where the PNGs go')
    p.add_argument('--prefix',
                   help='file names are PREFIX_00000.png, ... (default: out); with '
                   '--prompts-file, PREFIX_LINE_SLUG_00000.png, ...')
    p.add_argument('--grid-cols', type=cli.positive_int,
                   help='columns of the grid (default: near-square)')
    which = p.add_mutually_exclusive_group()
    which.add_argument('--grid-only', action='store_true', help='write the grids only')
    which.add_argument('--no-grid', action='store_true', help='write the single images only')
    p.add_argument('--score', action='store_true',
                   help="print each image's CLOOB score (cosine similarity to its text "
                   'prompts) and record it in its PNG as cloob_score')
    p.add_argument('--init', metavar='IMAGE',
                   help='start from this image (path or URL); one of another aspect ratio than '
                   '--size is resized to cover it and centre-cropped')
    p.add_argument('--strength', type=cli.positive_float,
                   help=f'how far --init is noised, in (0, 1]: 1 keeps nothing of it '
                   f'(default {DEFAULT_STRENGTH})')
    return p

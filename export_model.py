#!/usr/bin/env python3
"""Exports a diffusion model to share: its EMA weights alone, as one .safetensors file
that sample.py --checkpoint and training's --resume-from read.

    python3 export_model.py outputs/checkpoints/last.ckpt my_model.safetensors

The file records the widths, the autoencoder scale, the training image size and step,
and which autoencoder and CLOOB the model was trained with.
"""

import sys

from ccld import cli
from ccld.errors import RunError, UserError

PROG = 'export_model.py'
DTYPES = ('fp16', 'fp32')  # ccld.models.exports.DTYPES, named here so that --help needs no torch


def parser():
    p = cli.ArgumentParser(prog=PROG, description=__doc__.split('\n\n')[0])
    p.add_argument('checkpoint', metavar='CHECKPOINT',
                   help='a ccld training checkpoint, a checkpoint of the original training '
                   'script, a released model state dict or an export')
    p.add_argument('output', metavar='OUT.safetensors', help='the file to write')
    p.add_argument('--dtype', default='fp16', choices=DTYPES,
                   help='precision of the weights: fp16 is half the size; fp32 keeps them '
                   'exactly')
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    from pathlib import Path

    from ccld.models import exports
    from ccld.models.checkpoint_files import check_weights, read_checkpoint
    from ccld.files import check_writable_dir

    out = Path(args.output)
    if out.suffix != '.safetensors':
        raise UserError(f'{out}: name the export *.safetensors; sample.py and --resume-from '
                        'know exports by that.')
    check_writable_dir(out.parent, 'OUT.safetensors')
    ckpt = read_checkpoint(args.checkpoint)
    check_weights(ckpt.model_ema, args.checkpoint)
    try:
        record = exports.export(ckpt, out, args.dtype)
    except OSError as e:
        raise RunError(f'could not write {out} ({e.strerror or e}); nothing was written.') from None
    widths = ','.join(str(record['base_channels'] * m) for m in record['channel_multipliers'])
    step = 'unknown' if record['step'] is None else record['step']
    frozen = ''.join(f' --{key.replace("_", "-")} {record[key]}'
                     for key in ('autoencoder', 'cloob_checkpoint') if record[key])
    print(f'wrote {out} ({out.stat().st_size / 1e6:,.0f} MB, {args.dtype}) from '
          f'{ckpt.description}: level widths {widths}, autoencoder scale '
          f'{record["autoencoder_scale"]:g}, step {step}.\nSample with: python3 sample.py '
          f'"a prompt" --checkpoint {out}{frozen}', file=sys.stderr)


if __name__ == '__main__':
    cli.run(main, PROG)

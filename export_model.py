#!/usr/bin/env python3
"""Exports a diffusion model to share: its EMA weights alone, as one .safetensors file
that sample.py --checkpoint and training's --resume-from read.

    python3 export_model.py outputs/checkpoints/last.ckpt my_model.safetensors

The file records the widths, the autoencoder scale, the training image size and step,
and which autoencoder and CLOOB the model was trained with. From the checkpoint of a
LoRA run (--lora-rank), it writes the adapter alone (for sample.py --lora), or with
--merge the base model with the adapter folded in.
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
                   'script, a released model state dict or an export' + cli.HUB_FILE_HELP)
    p.add_argument('output', metavar='OUT.safetensors', help='the file to write')
    p.add_argument('--dtype', default='fp16', choices=DTYPES,
                   help='precision of the weights: fp16 is half the size; fp32 keeps them '
                   'exactly')
    p.add_argument('--merge', action='store_true',
                   help='from a LoRA checkpoint: write its base with the adapter folded in (a '
                   'whole model every tool loads), instead of the adapter alone')
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    from pathlib import Path

    from ccld.models import exports, hub, lora
    from ccld.models.checkpoint_files import check_weights, read_checkpoint
    from ccld.files import check_writable_dir

    out = Path(args.output)
    if out.suffix != '.safetensors':
        raise UserError(f'{out}: name the export *.safetensors; sample.py and --resume-from '
                        'know exports by that.')
    check_writable_dir(out.parent, 'OUT.safetensors')
    ckpt = read_checkpoint(hub.resolve(args.checkpoint, 'CHECKPOINT'), lora=True)
    source = ckpt.description
    if ckpt.kind == 'lora':
        adapter = lora.from_checkpoint(ckpt)
        if not args.merge:
            step = ckpt.raw.get('global_step')
            write(lambda: lora.write(adapter, out, args.dtype, step), out)
            print(f'wrote {out} ({out.stat().st_size / 1e6:,.1f} MB, {args.dtype}): the LoRA '
                  f'adapter (rank {adapter.rank}, alpha {adapter.alpha:g}) at step {step} of '
                  f'the base {adapter.base}.\nSample with: python3 sample.py "a prompt" '
                  f'--checkpoint {adapter.base} --lora {out}', file=sys.stderr)
            return
        ckpt = lora.merged_checkpoint(ckpt, adapter, args.checkpoint)
    elif args.merge:
        raise UserError(f'--merge folds the adapter of a LoRA checkpoint into its base; '
                        f'{args.checkpoint} is {ckpt.description}, a whole model: drop --merge.')
    check_weights(ckpt.model_ema, args.checkpoint)
    record = write(lambda: exports.export(ckpt, out, args.dtype), out)
    widths = ','.join(str(record['base_channels'] * m) for m in record['channel_multipliers'])
    step = 'unknown' if record['step'] is None else record['step']
    frozen = ''.join(f' --{key.replace("_", "-")} {record[key]}'
                     for key in ('autoencoder', 'cloob_checkpoint') if record[key])
    print(f'wrote {out} ({out.stat().st_size / 1e6:,.0f} MB, {args.dtype}) from '
          f'{source}: level widths {widths}, autoencoder scale '
          f'{record["autoencoder_scale"]:g}, step {step}.\nSample with: python3 sample.py '
          f'"a prompt" --checkpoint {out}{frozen}', file=sys.stderr)


def write(export, out):
    try:
        return export()
    except OSError as e:
        raise RunError(f'could not write {out} ({e.strerror or e}); nothing was written.') from None


if __name__ == '__main__':
    cli.run(main, PROG)

#!/usr/bin/env python3
"""Exports a diffusion model to share: its EMA weights alone, as one .safetensors file
that sample.py --checkpoint and training's --resume-from read; and shares it on the
Hugging Face hub with a model card.

    python3 export_model.py outputs/checkpoints/last.ckpt my_model.safetensors
    python3 export_model.py outputs/checkpoints/last.ckpt my_model.safetensors \\
        --push-to-hub my-name/my-model

The file records the widths, the autoencoder scale, the training image size and step,
and which autoencoder and CLOOB the model was trained with. From the checkpoint of a
LoRA run (--lora-rank), it writes the adapter alone (for sample.py --lora), or with
--merge the base model with the adapter folded in. --push-to-hub uploads the file with a
model card (README.md: what the model is, how it was made, how to sample it) and a grid
of samples on the card's prompts; --card-only DIR writes the card and grid into DIR.
--space DIR writes a Gradio Space that serves the model on ccld's web page (app.py), which
--push-to-hub uploads as a Space repository of the same name.
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
    share = p.add_argument_group('share on the Hugging Face hub')
    share.add_argument('--push-to-hub', metavar='OWNER/NAME',
                       help='upload the export, its model card (README.md) and the card\'s grid '
                       'of samples to this model repository (made if need be) in one commit; '
                       'needs a login (hf auth login)')
    share.add_argument('--private', action='store_true',
                       help='make the repository private (an existing public one is refused)')
    share.add_argument('--card-only', metavar='DIR',
                       help='write the card and its grid into DIR instead of uploading (with '
                       '--push-to-hub, the card names that repository; else the local file)')
    share.add_argument('--card-prompts', metavar='FILE',
                       help='the prompts of the card\'s grid, one a line as sample.py '
                       '--prompts-file reads them, one image each (default: the first 4 lines '
                       'of demo_prompts.txt)')
    share.add_argument('--no-card-grid', action='store_true',
                       help='a card without samples (the grid needs the autoencoder and CLOOB '
                       'the checkpoint records at hand, and the base model of an adapter)')
    share.add_argument('--license',
                       help='the card\'s license, a hub license id such as mit or '
                       'creativeml-openrail-m (default: the license of the base model when it '
                       'came from the hub, else other)')
    space = p.add_argument_group('a Gradio Space')
    space.add_argument('--space', metavar='DIR',
                       help='write into DIR (new or empty) a folder that runs as a Hugging Face '
                       'Space, and here with python3 DIR/app.py: README.md (front matter: sdk '
                       'gradio at the installed version), app.py (ccld\'s web page on the '
                       'model), requirements.txt (ccld at a fixed version), the local '
                       'autoencoder and CLOOB, and the export (with --push-to-hub: its hf:// '
                       'name instead; the folder is then uploaded to the Space repository '
                       'OWNER/NAME too)')
    space.add_argument('--space-requirement', metavar='SPEC',
                       help='how requirements.txt installs ccld, a pip requirement (default: '
                       'ccld @ git+ORIGIN@COMMIT of the checkout ccld runs from; without an '
                       'origin on a server, needed to push, and a folder only written here '
                       'gets ccld==VERSION with a comment saying to replace it)')
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    from pathlib import Path

    from ccld.files import check_writable_dir
    from ccld.models import exports, hub, lora
    from ccld.models.checkpoint_files import check_weights, read_checkpoint
    from ccld.models.frozen_files import carried

    out = Path(args.output)
    if out.suffix != '.safetensors':
        raise UserError(f'{out}: name the export *.safetensors; sample.py and --resume-from '
                        'know exports by that.')
    check_writable_dir(out.parent, 'OUT.safetensors')
    prompts = check_sharing(args)
    space_requirement = check_space(args)
    path = hub.resolve(args.checkpoint, 'CHECKPOINT')
    ckpt = read_checkpoint(path, lora=True)
    # The export or adapter names the frozen models so that sample.py finds them from
    # anywhere: found from the checkpoint's folder where an older record holds them
    # relative to where training ran.
    ckpt.record = carried(ckpt.record, Path(path).parent)
    if prompts:  # what the grid samples with is here, before anything is written
        from ccld.sample.model_card import check_grid_models
        check_grid_models(ckpt.record, args.checkpoint, path)
    source = ckpt.description
    if args.space:  # what the Space serves with is here, before anything is written
        from ccld.sample.space import frozen_models
        if ckpt.kind == 'lora' and not args.merge:
            raise UserError('--space serves a whole model, and the export of a LoRA checkpoint '
                            'is its adapter alone: pass --merge.')
        frozen_models(ckpt.record, args.checkpoint, Path(path).parent)
    if ckpt.kind == 'lora' and not args.merge:
        adapter = lora.from_checkpoint(ckpt)
        step = ckpt.raw.get('global_step')
        write(lambda: lora.write(adapter, out, args.dtype, step), out)
        print(f'wrote {out} ({out.stat().st_size / 1e6:,.1f} MB, {args.dtype}): the LoRA '
              f'adapter (rank {adapter.rank}, alpha {adapter.alpha:g}) at step {step} of '
              f'the base {adapter.base}.\nSample with: '
              f'{cli.sample_command(adapter.base, ("--lora", out))}', file=sys.stderr)
        return share(args, out, prompts, base=adapter.base)
    if ckpt.kind == 'lora':
        ckpt = lora.merged_checkpoint(ckpt, lora.from_checkpoint(ckpt), args.checkpoint)
    elif args.merge:
        raise UserError(f'--merge folds the adapter of a LoRA checkpoint into its base; '
                        f'{args.checkpoint} is {ckpt.description}, a whole model: drop --merge.')
    check_weights(ckpt.model_ema, args.checkpoint)
    record = write(lambda: exports.export(ckpt, out, args.dtype), out)
    widths = ','.join(str(record['base_channels'] * m) for m in record['channel_multipliers'])
    step = 'unknown' if record['step'] is None else record['step']
    print(f'wrote {out} ({out.stat().st_size / 1e6:,.0f} MB, {args.dtype}) from '
          f'{source}: level widths {widths}, autoencoder scale '
          f'{record["autoencoder_scale"]:g}, step {step}.\nSample with: '
          f'{cli.sample_command(out)}', file=sys.stderr)
    share(args, out, prompts)
    make_space(args, out, space_requirement)


def check_space(args):
    """The --space flags' checks, before anything is read or written; returns
    --space-requirement, checked."""
    from pathlib import Path

    from ccld.models import hub
    from ccld.sample import space
    if not args.space:
        if args.space_requirement:
            raise UserError('--space-requirement is what the --space folder installs: pass '
                            '--space DIR too.')
        return None
    if args.card_only and Path(args.card_only).resolve() == Path(args.space).resolve():
        raise UserError('--space and --card-only each write a README.md: give them two '
                        'folders.')
    space.check_dir(args.space)
    pushing = args.push_to_hub and not args.card_only
    if pushing:
        hub.check_can_push(args.push_to_hub, args.private, repo_type='space')
    return space.check_requirement(args.space_requirement, pushing)


def make_space(args, out, spec):
    """Writes the --space folder, and uploads it to the Space repository --push-to-hub
    (after the model it names)."""
    from pathlib import Path

    from ccld.models import hub
    from ccld.sample import space
    if not args.space:
        return
    files = space.write_space(args.space, out, repo_id=args.push_to_hub,
                              requirement=space.requirement(spec))
    print(f'wrote the Space into {args.space}: {", ".join(files)}.\nRun it here with: '
          f'python3 {Path(args.space) / "app.py"}', file=sys.stderr)
    if not args.push_to_hub or args.card_only:
        return
    url = hub.upload(args.push_to_hub, files, repo_type='space', space_sdk='gradio',
                     private=args.private, message='A Gradio Space of the model, with ccld')
    token = ('; the model is private: give the Space a secret HF_TOKEN that can read it'
             if args.private else '')
    print(f'uploaded the Space to https://huggingface.co/spaces/{args.push_to_hub} '
          f'({url}){token}.', file=sys.stderr)


def check_sharing(args):
    """The sharing flags' checks, before anything is read or written: a name the hub
    takes and a login (to upload), a writable --card-only DIR, the card's prompts (which
    it returns; None for a card without a grid, or no card)."""
    from ccld.files import check_writable_dir
    from ccld.models import hub
    from ccld.sample.model_card import read_prompts
    sharing = args.push_to_hub or args.card_only
    given = [flag for flag, value in (('--private', args.private), ('--license', args.license),
                                      ('--card-prompts', args.card_prompts),
                                      ('--no-card-grid', args.no_card_grid)) if value]
    if given and not sharing:
        raise UserError(f'{given[0]} is about sharing the export: pass --push-to-hub OWNER/NAME '
                        'or --card-only DIR too.')
    if args.private and not args.push_to_hub:
        raise UserError('--private makes the --push-to-hub repository private: pass '
                        '--push-to-hub OWNER/NAME too.')
    if args.card_prompts and args.no_card_grid:
        raise UserError('--card-prompts are the prompts of the card\'s grid: drop it or '
                        '--no-card-grid.')
    if args.card_only:
        check_writable_dir(args.card_only, '--card-only')
    elif args.push_to_hub:
        hub.check_can_push(args.push_to_hub, args.private)
    return read_prompts(args.card_prompts) if sharing and not args.no_card_grid else None


def share(args, out, prompts, base=None):
    """Writes the card (into --card-only DIR, or a temporary folder) and uploads it with
    the export to --push-to-hub (an adapter's with its `base`, for the line that samples
    it)."""
    import tempfile
    from pathlib import Path

    from ccld.models import hub
    from ccld.sample.model_card import write_card
    if not (args.push_to_hub or args.card_only):
        return
    with tempfile.TemporaryDirectory(prefix='ccld-card-') as tmp:
        folder = Path(args.card_only or tmp)
        files = write_card(folder, out, repo_id=args.push_to_hub, prompts=prompts,
                           license=args.license)
        if args.card_only:
            print(f'wrote the model card into {folder}: {", ".join(files)}', file=sys.stderr)
            return
        url = hub.upload(args.push_to_hub, {out.name: out, **files}, private=args.private,
                         message=f'Upload {out.name} and its model card with ccld')
    shared = f'{hub.PREFIX}{args.push_to_hub}'
    command = cli.sample_command(base, ('--lora', shared)) if base else \
        cli.sample_command(shared)
    print(f'uploaded {out.name} and {", ".join(files)} to https://huggingface.co/'
          f'{args.push_to_hub} ({url}).\nSample with: {command}', file=sys.stderr)


def write(export, out):
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return export()
    except OSError as e:
        raise RunError(f'could not write {out} ({e.strerror or e}); nothing was written.') from None


if __name__ == '__main__':
    cli.run(main, PROG)

"""The model card export_model.py writes for a model it shares: README.md, whose YAML front
matter the hub reads (license, library, tags, base model), saying what the model is, how
it was made and how to sample it with ccld, above a grid of samples on the card's prompts.

The grid is made by sample.py's own code (ccld.sample.run), one image of each prompt with
-n 1 --seed 0, so each image on the card is what the command line shown under it gives.
Everything on the card comes from the shared file's own metadata (the export's record, or
an adapter's), so it can be written again from the file alone.
"""

import json
import math
import tempfile
from pathlib import Path

from .. import software_version
from ..errors import UserError
from ..models import exports, hub

CARD = 'README.md'
GRID = 'samples.png'
DEFAULT_PROMPTS = Path(__file__).resolve().parents[2] / 'demo_prompts.txt'
DEFAULT_PROMPT_LINES = 4
TAGS = ['ccld', 'text-to-image', 'latent-diffusion', 'cloob']
GRID_SETTINGS = ['-n', '1', '--seed', '0']
ADAPTER = 'ccld-lora'  # ccld.models.lora.FORMAT


def read_prompts(path=None):
    """The card's prompts, (line, text, weight) as sample.py --prompts-file reads them:
    those of `path` (--card-prompts), else the first DEFAULT_PROMPT_LINES of
    demo_prompts.txt."""
    from .flags import parser
    from .prompts import read_prompts_file
    weight = parser().get_default('cond_scale')
    try:
        prompts = read_prompts_file(path or DEFAULT_PROMPTS, weight)
    except UserError as e:
        raise UserError(f'--card-prompts: {str(e).replace("--prompts-file ", "")}') from None
    return prompts if path else prompts[:DEFAULT_PROMPT_LINES]


def read_shared(path):
    """What a shared file says of itself: an export's record, or an adapter's settings."""
    from safetensors import safe_open
    with safe_open(str(path), 'pt') as f:
        metadata = f.metadata() or {}
        parameters = sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys()
                         if key != 'autoencoder_scale')
    if metadata.get('format') == ADAPTER:
        record = {key: exports.PARSERS.get(key, str)(value) for key, value in metadata.items()}
        record.update(rank=int(record['rank']), alpha=float(record['alpha']),
                      targets=record['targets'].split(','))
    else:
        record = exports.read_record(metadata, path)
    return dict(record, parameters=parameters)


def check_grid_models(record, what, path):
    """UserError in one line unless what the card's grid samples with is here: the
    autoencoder and CLOOB the record of checkpoint `what` (the local file `path`) names,
    found as sampling finds them (frozen_files.find: hub names fetched), and a LoRA run's
    base."""
    from ..models import frozen_files
    autoencoder, cloob = record.get('autoencoder'), record.get('cloob_checkpoint')
    skip = 'or pass --no-card-grid to share it without samples'
    if not autoencoder or not cloob:
        raise UserError(f"the card's sample grid needs the autoencoder and CLOOB {what} was "
                        f'trained with, and it records none: export a ccld checkpoint, {skip}.')
    beside, flag = Path(path).parent, "the card's grid"
    if frozen_files.find(frozen_files.AUTOENCODER, autoencoder, beside, flag) is None:
        raise UserError(f"the card's sample grid needs the autoencoder {autoencoder} that {what} "
                        f'records, and its .yaml or weights are not here: run from where they '
                        f'are, {skip}.')
    if frozen_files.find(frozen_files.CLOOB, cloob, beside, flag) is None:
        raise UserError(f"the card's sample grid needs the CLOOB {cloob} that {what} records, "
                        f'and it is not here: run from where it is, {skip}.')
    base = record.get('lora', {}).get('base')
    if base is not None:
        base = hub.resolve(base, "the card's grid")
        if not Path(base).is_file():
            raise UserError(f"the card's sample grid needs the base model {base} that the "
                            f'adapter of {what} was trained on, and it is not there: put it '
                            f'back, {skip}.')


def sample_grid(out, model, prompts, *, device=None):
    """Writes the card's grid to `out`: one image of each prompt, as `sample.py
    --prompts-file FILE -n 1 --seed 0` makes it (the same code, in this process), left to
    right and top to bottom. An adapter (`model` is one) is sampled on its base."""
    import torch
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor

    from .flags import parser
    from .png_files import grid, save_png
    from .run import run
    record = read_shared(model)
    models = ['--checkpoint', str(model)]
    if record.get('format') == ADAPTER:
        models = ['--checkpoint', record['base'], '--lora', str(model)]
    with tempfile.TemporaryDirectory(prefix='ccld-card-') as tmp:
        prompts_file = Path(tmp) / 'prompts.txt'
        prompts_file.write_text(''.join(f'{text}:{weight!r}\n' for _, text, weight in prompts))
        argv = ['--prompts-file', str(prompts_file), *models, '--autoencoder',
                record['autoencoder'], '--cloob-checkpoint', record['cloob_checkpoint'],
                *GRID_SETTINGS, '--no-grid', '--output-dir', str(Path(tmp) / 'images')]
        run(parser().parse_args(argv + (['--device', device] if device else [])))
        images = [pil_to_tensor(Image.open(path).convert('RGB')).float() / 255
                  for path in sorted((Path(tmp) / 'images').glob('*.png'))]
    save_png(grid(torch.stack(images)), out,
             {'prompts': json.dumps([(text, weight) for _, text, weight in prompts]),
              'settings': ' '.join(GRID_SETTINGS)})
    return out


def license_of(record):
    """The license of the model the shared one was made from, from its card on the hub
    (when it came from the hub and the card can be had); None otherwise."""
    origin = origin_of(record)
    return hub.card_data(origin).get('license') if hub.is_hub_name(origin) else None


def front_matter(record, model_file, license):
    """The card's metadata: what the hub filters and shows models by."""
    from huggingface_hub import ModelCardData
    kind = kind_of(record)
    origin = origin_of(record)
    tags = TAGS + {'adapter': ['lora'], 'student': ['distillation'],
                   'merged': ['lora']}.get(kind, [])
    data = {'license': license or license_of(record) or 'other', 'library_name': 'ccld',
            'pipeline_tag': 'text-to-image', 'tags': tags,
            'ccld': {'model_file': model_file}}
    if hub.is_hub_name(origin):
        data.update(base_model=hub.repo_of(origin),
                    base_model_relation='adapter' if kind == 'adapter' else 'finetune')
    if hub.is_hub_name(record.get('train_set')):
        data['datasets'] = [hub.repo_of(record['train_set'])]
    return ModelCardData(**data)


def kind_of(record):
    if record.get('format') == ADAPTER:
        return 'adapter'
    if record.get('teacher'):
        return 'student'
    if record.get('lora_rank'):
        return 'merged'
    return 'finetune' if record.get('finetuned_from') else 'model'


def origin_of(record):
    """The model the shared one was made from, as its record names it; None if none."""
    for key in ('base', 'lora_base', 'teacher', 'finetuned_from'):
        if record.get(key):
            return record[key]
    return None


def shown(name):
    """A file as the card names it: a hub name as it is, a local file by its name alone
    (a card does not publish the paths of the machine it was made on)."""
    return name if hub.is_hub_name(name) or not name else Path(name).name


def digest(value):
    return f' (sha256 `{value[:16]}...`)' if value else ''


def describe(record, model_file, repo_id):
    """The card's prose, section by section, from the record."""
    kind = kind_of(record)
    origin = shown(origin_of(record))
    name = f'{hub.PREFIX}{repo_id}' if repo_id else model_file
    intro = {
        'model': 'A CLOOB-conditioned latent diffusion model',
        'finetune': f'A CLOOB-conditioned latent diffusion model, finetuned from {origin}',
        'merged': f'A LoRA finetune (rank {record.get("lora_rank")}) of {origin}, merged into '
                  'its weights: a whole model',
        'student': f'A student distilled from {origin} to sample in '
                   f'{record.get("student_steps") or "its own number of"} steps, one U-Net call '
                   'each (DDIM; the guidance scale is an input, no second call)',
        'adapter': f'A LoRA adapter (rank {record.get("rank")}) for the model {origin}: no model '
                   'by itself, it is put on its base when sampling (`--lora`)',
    }[kind]
    widths = ','.join(str(record['base_channels'] * m) for m in record['channel_multipliers'])
    lines = [f'# {repo_id.split("/")[-1] if repo_id else Path(model_file).stem}', '',
             f'{intro}, made with ccld: text to image, '
             'conditioned on CLOOB embeddings (of images while it trained, of the prompt when '
             'it samples), in the latent space of a KL f=8 autoencoder.', '',
             '## The model', '',
             '| | |', '| --- | --- |',
             f'| file | `{model_file}` ({record.get("dtype", "?")}, '
             f'{record["parameters"]:,} {"adapter " * (kind == "adapter")}parameters) |',
             f'| U-Net level widths | {widths} (base channels {record["base_channels"]}, '
             f'multipliers {",".join(map(str, record["channel_multipliers"]))}) |']
    if record.get('image_size'):
        lines.append(f'| image size | {record["image_size"]} px |')
    if record.get('autoencoder'):
        lines.append(f'| autoencoder | `{shown(record["autoencoder"])}`'
                     f'{digest(record.get("autoencoder_sha256"))} |')
    if record.get('autoencoder_scale'):
        lines.append(f'| autoencoder scale | {record["autoencoder_scale"]:g} |')
    if record.get('cloob_checkpoint'):
        lines.append(f'| CLOOB | `{shown(record["cloob_checkpoint"])}`'
                     f'{digest(record.get("cloob_checkpoint_sha256"))} |')
    lines += ['', '## How it was made', '', *made(record, kind), '',
              '## Sample it', '', *sample_lines(record, kind, name)]
    return lines


def made(record, kind):
    """The card's 'How it was made' bullets."""
    items = []
    if kind == 'adapter':
        items.append(f'- LoRA adapters of rank {record["rank"]}, alpha {record["alpha"]:g}, on '
                     f'{", ".join(record["targets"])} layers of the frozen base '
                     f'`{shown(record["base"])}` (its weights\' digest '
                     f'`{record["base_sha256"][:16]}...`: an adapter is only put on that base).')
    if kind == 'merged':
        items.append(f'- LoRA adapters of rank {record["lora_rank"]}, alpha '
                     f'{record.get("lora_alpha", 0):g}, trained on the frozen base '
                     f'`{shown(record["lora_base"])}` and folded into it.')
    if kind == 'finetune':
        items.append(f'- Finetuned from `{shown(record["finetuned_from"])}`'
                     f'{digest(record.get("finetuned_from_sha256"))}.')
    if kind == 'student':
        steps = record.get('student_steps')
        rounds = f', then progressively to {steps} steps' if steps else ''
        scales = ' for guidance scales {:g} to {:g}'.format(*record['guidance_range']) \
            if record.get('guidance_range') else ''
        items.append(f'- Distilled from `{shown(record["teacher"])}`'
                     f'{digest(record.get("teacher_sha256"))}: the guidance first{rounds}'
                     f'{scales}.')
    if record.get('train_set'):
        size = f', {record["train_images"]:,} images' if record.get('train_images') else ''
        items.append(f'- Trained on `{shown(record["train_set"])}`{size}.')
    if record.get('step') is not None:
        items.append(f'- {record["step"]:,} optimizer steps.')
    items.append(f'- Written by {record.get("software") or f"ccld {software_version()}"}.')
    return items


def command(record, kind, name, prompt, settings, sep=' '):
    """sample.py's command line for the shared model `name`, as the card shows it."""
    model = f'--checkpoint {shown(record["base"])} --lora {name}' if kind == 'adapter' else \
        f'--checkpoint {name}'
    frozen = ''.join(f'{sep}--{flag} {shown(record[key])}'
                     for key, flag in (('autoencoder', 'autoencoder'),
                                       ('cloob_checkpoint', 'cloob-checkpoint'))
                     if record.get(key))
    return f'python3 sample.py "{prompt}" {model}{frozen} {settings}'


def sample_lines(record, kind, name):
    """How to sample it with ccld, hub names where there are some."""
    lines = ['With ccld installed, from its folder:', '', '```sh',
             command(record, kind, name, 'a lighthouse at dusk', '-n 4', ' \\\n    '), '```',
             '']
    local = [f'`{shown(record[key])}`' for key in ('autoencoder', 'cloob_checkpoint', 'base')
             if record.get(key) and not hub.is_hub_name(record[key])]
    if local:
        lines += [f'{", ".join(local)}: the files it was made with (digests above), to be at '
                  'hand; a pretrained CLOOB name downloads by itself.', '']
    if kind == 'student':
        lines += ["A student samples with its own step count; `--cond-scale` is its guidance "
                  'scale.', '']
    return lines


def grid_lines(record, kind, name, prompts):
    """The card's grid and its prompts, each as sample.py takes it."""
    from .flags import parser
    weight = parser().get_default('cond_scale')
    typed = [text if w == weight else f'{text}:{w:g}' for _, text, w in prompts]
    return ['## Samples', '', f'![samples]({GRID})', '',
            'One image of each prompt, left to right and top to bottom; each is what '
            f'`{command(record, kind, name, "PROMPT", " ".join(GRID_SETTINGS))}` gives:', '',
            *[f'{i}. {text}' for i, text in enumerate(typed, 1)], '']


def write_card(folder, model, *, repo_id=None, prompts=None, license=None, device=None):
    """Writes the card of the shared file `model` into `folder`: README.md, and the grid
    of samples of `prompts` (none without prompts). `repo_id` is where it goes (the card's
    command lines name it), None for a card of the local file. Returns {path in the
    repository: file} of what it wrote."""
    from huggingface_hub import ModelCard
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    record = read_shared(model)
    model_file = Path(model).name
    kind, name = kind_of(record), f'{hub.PREFIX}{repo_id}' if repo_id else model_file
    lines = describe(record, model_file, repo_id)
    written = {}
    if prompts:
        written[GRID] = sample_grid(folder / GRID, model, prompts, device=device)
        lines += grid_lines(record, kind, name, prompts)
    else:  # the grid of an earlier card written there is not this one's
        (folder / GRID).unlink(missing_ok=True)
    data = front_matter(record, model_file, license)
    card = ModelCard(f'---\n{data.to_yaml()}\n---\n\n' + '\n'.join(lines))
    (folder / CARD).write_text(str(card), encoding='utf-8')
    written[CARD] = folder / CARD
    return written

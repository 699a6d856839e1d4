"""What evaluate.py does: sample every --checkpoint on the same prompts and seeds, each
exactly as sample.py would (through ccld.sample.sampler), so the images differ only by
the model; then judge them: the CLOOB score against their prompts, and the Frechet
distance and KID of their features against --reference-set; and lay them side by side.

The work is cut into units, one per checkpoint and prompt: one generate() call of -n
images from --seed, which is what one line of `sample.py --prompts-file` is. Each process
takes every world-th unit; each image file is written whole as soon as it is made, and a
unit whose images are all there is not sampled again, so a rerun after an interruption
loses at most the unit each process was on. The first process then reads every image
back from its file (what is judged is what the user sees) and writes the report, the
grids and the gallery.
"""

import hashlib
import itertools
import json
import os
import sys
import warnings
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .. import cli, software_version
from ..errors import UserError
from ..files import check_writable_dir, remove_stale_temps, sha256
from ..models import hub
from . import distances, features, gallery, generate, report as reports
from .cloob_score import scorer
from .png_files import save_png
from .prompts import read_prompts_file, slug
from .sampler import (check_checkpoint, check_sampling_flags, load_sampler, resolve_model_names,
                      sample)

DEFAULT_PROMPTS = Path(__file__).resolve().parents[2] / 'eval_prompts.txt'
REFERENCE_UNIT = 256  # reference images per loader unit (the units are dealt to workers)


@dataclass(frozen=True)
class Prompt:
    line: int
    text: str
    weight: float

    @property
    def prefix(self):
        """Its images' file names start with this, as sample.py --prompts-file names them."""
        return f'{self.line:05}_{slug(self.text)}'

    @property
    def recorded(self):
        """How its PNGs record it (sample.py's 'prompts' text)."""
        return json.dumps([(self.text, self.weight)])


@dataclass(frozen=True)
class Column:
    """One --checkpoint of the comparison."""
    name: str
    settings: object  # sampler.Settings
    sha256: str
    directory: Path   # its images; named by the file's content and the settings
    own: tuple        # its own (method, steps), None where not given (sampler.settings_for)

    def image(self, prompt, index):
        return generate.sample_path(self.directory, prompt.prefix, index)


@dataclass
class Plan:
    """Everything the flags ask for, checked, before any model loads."""
    args: object
    out: Path
    prompts_file: Path
    prompts: list
    columns: list
    device: object
    batch_size: int
    source: object            # the reference set (data.sources.Source), or None
    cache: Path               # where its features are cached
    inception_weights: object  # the weights file when the features are Inception's


def names(specs, settings):
    """Distinct labels of the columns (cli.CheckpointSpec, sampler.Settings): its label=
    where given, else the file name with as many parent folders as it takes to tell
    different files apart (a file from the hub: its hub name), and the sampler where the
    same file is sampled otherwise too; a file given again as it was is numbered.
    UserError for a label given twice."""
    given = [spec.label for spec in specs if spec.label]
    twice = sorted({label for label in given if given.count(label) > 1})
    if twice:
        raise UserError(f'--checkpoint: label={twice[0]} is given twice; each column needs a '
                        'label of its own.')
    resolved = [Path(spec.path).resolve() for spec in specs]
    samplers = [reports.sampler_text(s.metadata()) for s in settings]

    def tail(path, k):
        return '/'.join(path.parts[-k:])
    found = []
    for path, spec, sampler in zip(resolved, specs, samplers):
        if spec.label:
            found.append(spec.label)
            continue
        k = 1
        while k < len(path.parts) and any(other != path and tail(other, k) == tail(path, k)
                                          for other in resolved):
            k += 1
        name = hub.name_of(spec.path, pinned=False) if hub.cached_location(spec.path) \
            else tail(path, k)
        if len({s for other, s in zip(resolved, samplers) if other == path}) > 1:
            name = f'{name} ({sampler})'
        found.append(name)
    counts = {}
    for i, name in enumerate(found):
        counts[name] = counts.get(name, 0) + 1
        if counts[name] > 1:
            found[i] = f'{name} ({counts[name]})'
    return found


def image_directory(out, settings, digest, frozen, batch_size):
    """Where a checkpoint's images go: named by its file and a key of what makes them (its
    content, the settings, the frozen models' digests `frozen`), so a rerun made otherwise
    never takes earlier images for finished ones. A stochastic sampler's images also
    depend on how they are batched."""
    recipe = {'sha256': digest, 'frozen': frozen, **settings.metadata()}
    for key in ('checkpoint', 'width', 'height'):  # (size says them: earlier keys still hold)
        del recipe[key]
    if settings.stochastic:
        recipe['batch_size'] = batch_size
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]
    return out / 'images' / f'{slug(Path(settings.checkpoint).name)}-{key}'


def check_autoencoder(name, size):
    """The autoencoder NAME's files exist and its latents fit the U-Net at `size`."""
    from ..models.autoencoder import read_config, weights_path
    params = read_config(f'{name}.yaml')['model']['params']
    if not weights_path(name).is_file():
        raise UserError(f'--autoencoder: {weights_path(name)} does not exist (NAME means '
                        'NAME.yaml + NAME.ckpt).')
    generate.check_latent_shape(params['embed_dim'], 2 ** (len(params['ddconfig']['ch_mult']) - 1),
                                size)


def one_pair_of_frozen_models(settings):
    """The (autoencoder, CLOOB) that every checkpoint's Settings chose; UserError if they
    chose different ones (from their records)."""
    pairs = {(os.path.abspath(s.autoencoder),  # (a CLOOB file by path, a pretrained one by name)
              os.path.abspath(s.cloob) if os.path.isfile(s.cloob) else s.cloob)
             for s in settings}
    if len(pairs) > 1:
        shown = '; '.join(f'{Path(s.checkpoint).name}: {s.autoencoder}, {s.cloob}'
                          for s in settings)
        raise UserError(f'the checkpoints record different autoencoders or CLOOBs ({shown}); '
                        'pass --autoencoder and --cloob-checkpoint to sample them all with one.')
    return settings[0].autoencoder, settings[0].cloob


def make_plan(args):
    """Checks everything the user wrote and fetches what must be downloaded (CLOOB, the
    Inception weights), before any model loads: a mistake costs seconds, not a run."""
    from cloob_training.pretrained import resolve_checkpoint

    from ..data.sources import Source
    from ..models.autoencoder import describe as describe_autoencoder
    from ..models.cloob import describe as describe_cloob
    device, batch_size = check_sampling_flags(args)
    if device.type == 'cuda' and args.num_gpus > 1:
        cli.check_devices('gpu', args.num_gpus)
    prompts_file = Path(args.prompts_file or DEFAULT_PROMPTS)
    prompts = [Prompt(*p) for p in read_prompts_file(prompts_file, args.cond_scale)]
    out = Path(args.output_dir)
    check_writable_dir(out, '--output-dir')
    source, cache = None, Path(args.reference_cache or out / 'reference_cache')
    if args.reference_set:
        try:
            source = Source(args.reference_set, REFERENCE_UNIT, args.image_column,
                            args.dataset_split)
        except UserError as e:
            raise UserError(f'--reference-set: {e}') from None
        check_writable_dir(cache, '--reference-cache')
    elif args.inception_weights:
        warnings.warn('--inception-weights: there is no --reference-set to compare with, so '
                      'no features are computed.')
    args.checkpoint = [spec._replace(path=hub.resolve(spec.path, '--checkpoint'))
                       for spec in args.checkpoint]
    resolve_model_names(args)
    # A file that is not a diffusion model is refused here, before anything is sampled.
    specs, owns = args.checkpoint, [(spec.method, spec.steps) for spec in args.checkpoint]
    settings = [check_checkpoint(args, spec.path, own) for spec, own in zip(specs, owns)]
    warn_own_samplers(args, specs, settings)
    sizes = sorted({s.size for s in settings})
    if len(sizes) > 1:
        raise UserError(f'the checkpoints sample at different sizes '
                        f'({", ".join(map(cli.size_text, sizes))} px, from what they record); '
                        'pass --size to compare them at one.')
    # Every checkpoint is sampled with one autoencoder and CLOOB: from here on, the flags
    # name those the checkpoints chose (sampler.frozen_models).
    args.autoencoder, args.cloob_checkpoint = one_pair_of_frozen_models(settings)
    check_autoencoder(args.autoencoder, sizes[0])
    resolve_checkpoint(args.cloob_checkpoint)  # a pretrained name downloads now
    weights = None
    if source is not None and args.features == 'inception':
        weights = features.inception_weights(args.inception_weights)
        features.check_inception_weights(weights)
    digests = [sha256(spec.path) for spec in specs]
    frozen = [describe_autoencoder(args.autoencoder)['sha256'],
              describe_cloob(args.cloob_checkpoint)['sha256']]
    columns = [Column(name, s, digest, image_directory(out, s, digest, frozen, batch_size), own)
               for name, s, digest, own in zip(names(specs, settings), settings, digests, owns)]
    return Plan(args, out, prompts_file, prompts, columns, device, batch_size, source, cache,
                weights)


def warn_own_samplers(args, specs, settings):
    """A warning for each checkpoint that samples otherwise than the run's sampler flags
    ask, without a sampler of its own: a distilled student, which keeps its own."""
    for spec, s in zip(specs, settings):
        asked = (spec.method or args.method or s.method, spec.steps or args.steps or s.steps,
                 args.schedule, args.eta)
        if asked != (s.method, s.steps, s.schedule, s.eta):
            warnings.warn(f'{spec.path} is a distilled student: it samples with its own '
                          f'{reports.sampler_text(s.metadata(), full=True)} (--method, --steps, '
                          '--schedule and --eta are for the other checkpoints).')


class FrozenModels:
    """The autoencoder, CLOOB and feature network of one process, loaded on first use."""

    def __init__(self, args, device):
        self.args, self.device = args, device
        self.network = None

    def feature_network(self, plan):
        if self.network is None:
            self.network = feature_network(plan, self)
        return self.network

    @cached_property
    def autoencoder(self):
        from ..models.autoencoder import load_autoencoder
        return load_autoencoder(self.args.autoencoder, device=self.device)

    @cached_property
    def cloob(self):
        from ..models.cloob import load_cloob
        return load_cloob(self.args.cloob_checkpoint, self.device)


def feature_network(plan, models):
    if plan.args.features == 'inception':
        return features.inception(plan.inception_weights, models.device)
    from ..models.cloob import describe
    return features.cloob_image_tower(models.cloob, describe(plan.args.cloob_checkpoint))


def units(plan):
    """(column, prompt) of every unit, each image directory once (a checkpoint given twice
    is sampled once), in order."""
    seen, found = set(), []
    for column in plan.columns:
        if column.directory not in seen:
            seen.add(column.directory)
            found += [(column, prompt) for prompt in plan.prompts]
    return found


def made(column, prompt, n):
    """Whether all n images of a unit are there, made for this prompt."""
    for index in range(n):
        try:
            with Image.open(column.image(prompt, index)) as image:
                if image.text.get('prompts') != prompt.recorded:
                    return False
        except OSError:  # missing, or not a PNG
            return False
    return True


def counted(batches, bar):
    for batch in batches:
        yield batch
        bar.update(len(batch))


def image_metadata(plan, prompt, settings):
    """What each PNG records: what sample.py --prompts-file records for the same image."""
    return {'prompts': prompt.recorded, 'prompts_file': plan.prompts_file.name,
            'line': prompt.line, 'image_prompts': '[]', **settings.metadata()}


def sample_share(plan, models, rank, world, device):
    """Samples the units of this process that are not made yet; returns how many images."""
    n = plan.args.n
    share = [unit for i, unit in enumerate(units(plan)) if i % world == rank]
    todo = [(column, prompt) for column, prompt in share if not made(column, prompt, n)]
    if rank == 0:
        print(f'{len(units(plan)) * n} images to make on {world} process(es); this one makes '
              f'{len(todo) * n} ({(len(share) - len(todo)) * n} of its share already made).',
              file=sys.stderr, flush=True)
    bar = tqdm(total=len(todo) * n, unit='img', desc='sampling', disable=rank != 0)
    for column, group in itertools.groupby(todo, key=lambda unit: unit[0]):
        model, settings = load_sampler(plan.args, column.settings.checkpoint, device,
                                       column.own)
        bar.set_postfix_str(column.name, refresh=False)
        for _, prompt in group:
            embeds, weights = generate.embed_prompts(models.cloob, [(prompt.text, prompt.weight)],
                                                     [])
            batches = sample(model, settings, models.autoencoder, embeds, weights,
                             batch_size=plan.batch_size, device=device, progress=False)
            generate.write_samples(counted(batches, bar), column.directory, prompt.prefix,
                                   image_metadata(plan, prompt, settings), singles=True,
                                   grid_too=False, annotate=scorer(models.cloob, embeds, weights,
                                                                   []))
        del model
    bar.close()
    return len(todo) * n


def read_images(paths):
    """8-bit [n, 3, H, W] of PNG files."""
    arrays = []
    for path in paths:
        with Image.open(path) as image:
            arrays.append(np.asarray(image.convert('RGB')))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def features_of(paths, network, batch_size):
    return torch.cat([network(read_images(paths[i:i + batch_size]))
                      for i in range(0, len(paths), batch_size)]).numpy()


def cloob_score(path):
    with Image.open(path) as image:
        return float(image.text['cloob_score'])


def judge(plan, models, reference):
    """The report: each checkpoint's numbers, and each prompt's scores and grid."""
    n, out = plan.args.n, plan.out
    network = models.feature_network(plan) if reference is not None else None
    enough = reference is not None and len(reference.features) >= 2
    reference_stats = distances.statistics(reference.features) if enough else None
    checkpoints, prompt_scores = [], []
    for column in tqdm(plan.columns, unit='checkpoint', desc='judging'):
        paths = [column.image(prompt, i) for prompt in plan.prompts for i in range(n)]
        scores = np.array([cloob_score(path) for path in paths]).reshape(len(plan.prompts), n)
        per_prompt = scores.mean(1)
        prompt_scores.append(per_prompt.tolist())
        entry = {'name': column.name, 'path': column.settings.checkpoint,
                 'sha256': column.sha256, 'kind': column.settings.description,
                 'frechet_distance': None, 'kid': None, 'kid_std': None,
                 'cloob_score': float(per_prompt.mean()),
                 'cloob_score_std': float(per_prompt.std()), 'samples': len(paths),
                 'images': column.directory.relative_to(out).as_posix(),
                 'settings': {**column.settings.metadata(), 'batch_size': plan.batch_size}}
        if network is not None:
            generated = features_of(paths, network, plan.batch_size)
            if enough and len(generated) >= 2:
                entry['frechet_distance'] = distances.frechet_distance(
                    distances.statistics(generated), reference_stats)
            kid = distances.kernel_distance(generated, reference.features)
            if kid is not None:
                entry['kid'], entry['kid_std'] = kid
        checkpoints.append(entry)
    samples = len(plan.prompts) * n
    return {
        'checkpoints': checkpoints,
        'prompts': [{'line': p.line, 'text': p.text, 'weight': p.weight,
                     'grid': f'grids/{p.prefix}.png',
                     'cloob_scores': [scores[i] for scores in prompt_scores]}
                    for i, p in enumerate(plan.prompts)],
        'prompts_file': str(plan.prompts_file),
        'features': network.identity if network is not None else None,
        'reference_set': None if reference is None else {
            'spec': plan.source.spec, 'images': len(reference.features),
            'skipped': reference.skipped, 'cache_key': reference.key,
            'from_cache': reference.cached},
        'kid': None if reference is None else {
            'subsets': distances.KID_SUBSETS,
            'subset_size': min(distances.KID_SUBSET_SIZE, samples, len(reference.features))},
        'ccld_version': software_version(),
        'created': datetime.now(timezone.utc).isoformat(timespec='seconds'),
    }


def write_grids(plan, report):
    """grids/LINE_SLUG.png for each prompt: a column per checkpoint (its label and its
    sampler above it), a row per image."""
    names = [column.name for column in plan.columns]
    samplers = [reports.sampler_text(column.settings.metadata()) for column in plan.columns]
    # A label that names its sampler to tell a file's columns apart has it drawn once.
    drawn = [name.removesuffix(f' ({sampler})') for name, sampler in zip(names, samplers)]
    seed = plan.args.seed
    rows = [f'seed {seed} #{i}' for i in range(plan.args.n)]
    for prompt, entry in zip(plan.prompts, report['prompts']):
        tiles = [[Image.open(column.image(prompt, i)) for column in plan.columns]
                 for i in range(plan.args.n)]
        canvas, layout = gallery.comparison_grid(tiles, drawn, rows,
                                                 f'{prompt.line}: {prompt.text}', samplers)
        save_png(canvas, plan.out / entry['grid'],
                 {'prompt': prompt.text, 'line': prompt.line, 'columns': json.dumps(names),
                  'samplers': json.dumps(samplers), 'rows': json.dumps(rows), **layout})
        for row in tiles:
            for tile in row:
                tile.close()


def launch(args, device):
    """(rank, world size, device, barrier) of this process. Several processes (--num-gpus,
    --num-nodes; torchrun or srun start them on each node) are joined by Lightning Fabric."""
    processes = args.num_gpus * args.num_nodes
    if processes == 1:
        return 0, 1, device, lambda: None
    from lightning_fabric import Fabric
    from lightning_fabric.strategies import DDPStrategy
    # The processes finish their shares at different times; the wait for the slowest is long.
    fabric = Fabric(accelerator='cpu' if device.type == 'cpu' else 'cuda', devices=args.num_gpus,
                    num_nodes=args.num_nodes, strategy=DDPStrategy(timeout=timedelta(days=2)))
    fabric.launch()
    return fabric.global_rank, fabric.world_size, fabric.device, fabric.barrier


def run(args):
    """Evaluates what the parsed flags of evaluate.py name; returns the report (None in
    every process but the first)."""
    from ..processes import is_first_process
    from .reference_set import reference_features
    plan = make_plan(args)
    models = FrozenModels(args, plan.device)
    reference = None
    if is_first_process():  # what killed processes of a previous run left half-written
        if plan.source is not None:  # first: a set that cannot be read fails before any write
            remove_stale_temps(plan.cache)  # (made when the features are cached in it)
            reference = reference_features(plan.source, models.feature_network(plan),
                                           plan.columns[0].settings.size, plan.cache,
                                           plan.batch_size, args.num_workers)
        for folder in [plan.out, plan.out / 'grids', *(c.directory for c in plan.columns)]:
            folder.mkdir(parents=True, exist_ok=True)
            remove_stale_temps(folder)
    rank, world, device, barrier = launch(args, plan.device)
    if device != plan.device:
        models = FrozenModels(args, device)
    sample_share(plan, models, rank, world, device)
    barrier()
    if rank != 0:
        return None
    report = judge(plan, models, reference)
    write_grids(plan, report)
    reports.write_json(plan.out / 'report.json', report)
    reports.write_markdown(plan.out / 'report.md', report)
    gallery.write_index(plan.out / 'index.html', report)
    if args.wandb_project:
        images = [[[column.image(prompt, i) for column in plan.columns]
                   for i in range(args.n)] for prompt in plan.prompts]
        where = reports.log_to_wandb(args.wandb_project, plan.out, report, images)
        print(f'logged to wandb: {where}', file=sys.stderr)
    print(reports.markdown(report).split('\n\n')[1], file=sys.stderr)  # the table
    print(f'wrote {plan.out / "report.json"}, report.md and index.html (open it in a browser)',
          file=sys.stderr)
    return report

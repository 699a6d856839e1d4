"""An evaluation's numbers, written three ways: report.json (for scripts), report.md (a
table to read or paste) and, with --wandb-project, a wandb run holding the same table and
the images as a table of prompt and seed rows by checkpoint columns."""

import json

from ..files import atomic_write

# Below this many images a set's Frechet distance is dominated by its bias (the
# InceptionV3 features have 2048 dimensions): compare models at thousands.
FEW_IMAGES = 2048
# The settings each checkpoint has its own of (the others are the run's).
OWN_SETTINGS = ('method', 'steps', 'schedule', 'eta', 'autoencoder_scale', 'checkpoint')


def sampler_text(settings, full=False):
    """'plms, 50 steps' from a checkpoint's settings (sampler.Settings.metadata(), as the
    report records them); `full` adds the schedule, and eta where it adds noise."""
    steps = settings['steps']
    text = f"{settings['method']}, {steps} step{'' if steps == 1 else 's'}"
    if full:
        text += f", {settings['schedule']} schedule"
        if settings['method'] == 'ddim' and settings['eta']:
            text += f", eta {settings['eta']:g}"
    return text


def summary(report):
    """One sentence on what the numbers were computed from (each checkpoint's sampler is
    on its own row)."""
    reference = report['reference_set']
    images = report['checkpoints'][0]['samples']
    against = (f"against {reference['images']} images of {reference['spec']} "
               f"({reference['skipped']} unreadable skipped), {report['features']['network']} "
               'features' if reference else 'without a reference set (no Frechet distance or KID)')
    settings = report['checkpoints'][0]['settings']
    return (f"{images} images per checkpoint ({len(report['prompts'])} prompts x "
            f"{settings['n']} from seed {settings['seed']}; cond scale "
            f"{settings['cond_scale']}, {settings['size']} px; each checkpoint's sampler on its "
            f"row), {against}.")


def write_json(path, report):
    with atomic_write(path) as f:
        f.write(json.dumps(report, indent=1, ensure_ascii=False).encode('utf-8'))


def number(value, digits=4):
    return '–' if value is None else f'{value:.{digits}g}'


def cell(text):
    """Text in a cell of a markdown table."""
    return text.replace('|', '\\|')


def markdown(report):
    """report.md: the comparison table, what it was computed from, the per-prompt scores."""
    features = report['features']['network'] if report['features'] else 'none'
    lines = ['# Compare models', '',
             f'| checkpoint | sampler | Frechet distance ({features}) ↓ | KID ↓ | '
             'CLOOB score ↑ | spread over prompts | images | sha256 |',
             '| --- | --- | --- | --- | --- | --- | --- | --- |']
    for c in report['checkpoints']:
        kid = number(c['kid']) + (f' ± {number(c["kid_std"], 2)}' if c['kid'] is not None else '')
        lines.append(f'| {cell(c["name"])} | {sampler_text(c["settings"], full=True)} | '
                     f'{number(c["frechet_distance"])} | {kid} | '
                     f'{number(c["cloob_score"])} | {number(c["cloob_score_std"], 2)} | '
                     f'{c["samples"]} | `{c["sha256"][:12]}` |')
    lines += ['', summary(report), '']
    if report['reference_set'] and report['checkpoints'][0]['samples'] < FEW_IMAGES:
        lines += [f'With fewer than {FEW_IMAGES} images per checkpoint the Frechet distance is '
                  'mostly bias: read it as a smoke test, not a ranking.', '']
    names = ' | '.join(cell(c['name']) for c in report['checkpoints'])
    lines += ['## CLOOB score per prompt', '', f'| line | prompt | {names} |',
              '| --- | --- |' + ' --- |' * len(report['checkpoints'])]
    for p in report['prompts']:
        lines.append(f'| {p["line"]} | {cell(p["text"])} | '
                     + ' | '.join(number(s) for s in p['cloob_scores']) + ' |')
    lines += ['', 'The images side by side: [index.html](index.html).', '']
    return '\n'.join(lines)


def write_markdown(path, report):
    with atomic_write(path) as f:
        f.write(markdown(report).encode('utf-8'))


def log_to_wandb(project, directory, report, image_paths):
    """A wandb run with the metrics (a table and the run's summary) and the images as a
    table: a row per prompt and seed, a column per checkpoint. `image_paths[p][i][c]` is
    the i-th image of prompt p by checkpoint c. Returns the run's URL or directory."""
    import wandb
    names = [c['name'] for c in report['checkpoints']]
    run = wandb.init(project=project, dir=str(directory), job_type='evaluate',
                     config={'checkpoints': names, 'features': report['features'],
                             'reference_set': report['reference_set'],
                             'prompts_file': report['prompts_file'],
                             **{k: v for k, v in report['checkpoints'][0]['settings'].items()
                                if k not in OWN_SETTINGS}})
    metrics = wandb.Table(columns=['checkpoint', 'sampler', 'frechet_distance', 'kid', 'kid_std',
                                   'cloob_score', 'cloob_score_std', 'samples', 'sha256'])
    for c in report['checkpoints']:
        metrics.add_data(c['name'], sampler_text(c['settings'], full=True),
                         c['frechet_distance'], c['kid'], c['kid_std'],
                         c['cloob_score'], c['cloob_score_std'], c['samples'], c['sha256'])
        for key in ('frechet_distance', 'kid', 'cloob_score'):
            run.summary[f'{c["name"]}/{key}'] = c[key]
    seed = report['checkpoints'][0]['settings']['seed']
    images = wandb.Table(columns=['prompt', 'line', 'seed', 'index', *names])
    for prompt, rows in zip(report['prompts'], image_paths):
        for index, paths in enumerate(rows):
            images.add_data(prompt['text'], prompt['line'], seed, index,
                            *[wandb.Image(str(path)) for path in paths])
    run.log({'metrics': metrics, 'images': images})
    where = run.url or str(run.dir)
    run.finish()
    return where

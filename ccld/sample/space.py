"""The Gradio Space export_model.py --space writes for a model it shares: a folder that the
Hugging Face hub runs as a Space, and that `python3 DIR/app.py` runs here the same way.

    README.md         the Space's front matter (sdk gradio at the installed version, app.py)
    app.py            ccld's web page (ccld.app) on the model: on a Space (SPACE_ID set) on
                      0.0.0.0:7860, behind the hub's own access rules; elsewhere 127.0.0.1
    requirements.txt  ccld at a fixed version: its git origin at the commit it runs from
    the model         its hf:// name when it is pushed, else the export copied here
    frozen models     a local autoencoder (NAME.yaml + weights) and a local CLOOB .pkl copied
                      here; hub names and pretrained CLOOB names are fetched at run time

The Space's app.py passes every model explicitly, since the paths an export records are
those of the machine that wrote it.
"""

import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

from .. import software_version
from ..errors import UserError
from ..models import frozen_files, hub
from .model_card import read_shared

CARD, APP, REQUIREMENTS = 'README.md', 'app.py', 'requirements.txt'
PORT = 7860  # where a Gradio Space's app must listen
PROJECT = Path(__file__).resolve().parents[2]  # the checkout ccld runs from


def check_dir(path, flag='--space'):
    """UserError unless `path` can be made, or is an empty folder."""
    from ..files import check_writable_dir
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UserError(f'{flag}: {path} exists and is not an empty folder; name a new one.')
    check_writable_dir(path, flag)


def check_requirement(spec, pushing):
    """--space-requirement `spec` (None if not given), checked to be a pip requirement of
    ccld; UserError when a Space to be pushed has neither it nor an origin to pin."""
    from packaging.requirements import InvalidRequirement, Requirement
    if spec is None:
        if pushing and origin_commit() is None:
            raise UserError('--space: the Space must install this ccld, and its checkout has no '
                            'origin on a server to install it from: pass --space-requirement '
                            "SPEC (e.g. 'ccld @ git+https://HOST/OWNER/REPO.git@COMMIT').")
        return None
    try:
        name = Requirement(spec).name
    except InvalidRequirement as e:
        raise UserError(f'--space-requirement: {spec!r} is no pip requirement ({e}).') from None
    if name.lower() != 'ccld':
        raise UserError(f'--space-requirement: {spec!r} installs {name}; name ccld, e.g. '
                        "'ccld @ git+https://HOST/OWNER/REPO.git@COMMIT'.")
    return spec


def _git(*args, root=PROJECT):
    try:
        done = subprocess.run(['git', '-C', str(root), *args], capture_output=True, text=True,
                              timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def public_url(url):
    """An origin's URL as pip on another machine can fetch it (https, no credentials);
    None for a local one."""
    scp = re.fullmatch(r'[\w.-]+@([\w.-]+):(.+)', url)  # git@github.com:owner/repo.git
    if scp:
        return f'https://{scp[1]}/{scp[2]}'
    remote = re.fullmatch(r'(?:https?|ssh|git)://(?:[^@/]+@)?([^/]+)/(.+)', url)
    if remote:
        host = remote[1].split(':')[0] if url.startswith('ssh') else remote[1]
        return f'https://{host}/{remote[2]}'
    return None


def origin_commit(root=PROJECT):
    """(URL pip can fetch, HEAD commit) of the checkout `root` that ccld runs from; None
    where it is no git checkout or its origin is not on a server."""
    top = _git('rev-parse', '--show-toplevel', root=root)
    url = _git('remote', 'get-url', 'origin', root=root)
    commit = _git('rev-parse', 'HEAD', root=root)
    if not (top and Path(top).resolve() == Path(root).resolve() and url and commit):
        return None
    url = public_url(url)
    return (url, commit) if url else None


def pinned_requirement(root=PROJECT):
    """`ccld @ git+URL@COMMIT` of origin_commit(root), or None. Warns when the checkout
    holds changes not committed, or a commit no branch of origin holds."""
    found = origin_commit(root)
    if found is None:
        return None
    url, commit = found
    if _git('status', '--porcelain', '--untracked-files=no', root=root):
        warnings.warn(f'the Space installs ccld at commit {commit[:12]}, without the changes '
                      f'not committed in {root}.')
    if not _git('branch', '--remotes', '--contains', commit, root=root):
        warnings.warn(f'commit {commit[:12]} is on no branch of origin that this checkout '
                      'knows of: push it, or the Space cannot install it.')
    return f'ccld @ git+{url}@{commit}'


def requirement(spec):
    """requirements.txt's line for ccld: `spec` (--space-requirement), else this checkout's
    commit on its origin (pinned_requirement), else, for a Space only written here
    (check_requirement refuses to push one), the installed version with a comment saying
    to replace it."""
    pinned = spec or pinned_requirement()
    if pinned:
        return pinned
    warnings.warn(f'requirements.txt installs ccld=={software_version()}, which no package '
                  'index holds: replace it with where the Space is to install ccld from, or '
                  'pass --space-requirement.')
    return (f'# Replace with where the Space installs ccld from, e.g. ccld @ '
            f'git+https://HOST/OWNER/REPO.git@COMMIT\nccld=={software_version()}')


def frozen_models(record, what, beside):
    """The autoencoder and CLOOB of a model's record, as (value, local files to copy):
    hub names and pretrained CLOOB names as they are, nothing to copy; a local autoencoder
    NAME (NAME.yaml + weights) or CLOOB .pkl (+ its .json) found as sampling finds them
    (frozen_files.find, from folder `beside`). UserError when one is not here."""
    from ..models.autoencoder import weights_path
    found = []
    for kind, flag in ((frozen_files.AUTOENCODER, '--autoencoder'),
                       (frozen_files.CLOOB, '--cloob-checkpoint')):
        value = record.get(kind)
        if not value:
            raise UserError(f'--space: the Space needs the autoencoder and CLOOB {what} was '
                            'trained with, and it records none: export a ccld checkpoint.')
        local = frozen_files.find(kind, value, beside, 'the Space')
        if local is None:
            raise UserError(f'--space: the Space needs the {kind.split("_")[0]} {value} that '
                            f'{what} records, and it is not here: run from where it is.')
        if hub.is_hub_name(value) or not Path(local).is_file() and kind == frozen_files.CLOOB:
            found.append((flag, value, []))  # fetched at run time (a pretrained CLOOB name)
        elif kind == frozen_files.AUTOENCODER:
            found.append((flag, local, [Path(f'{local}.yaml'), weights_path(local)]))
        else:
            config = Path(local).with_suffix('.json')
            found.append((flag, local, [Path(local)] + [config] * config.is_file()))
    return found


def front_matter(title, repo_id):
    """The Space's metadata: what the hub builds and runs it with."""
    import gradio
    from huggingface_hub import SpaceCardData
    data = {'title': title, 'sdk': 'gradio', 'sdk_version': gradio.__version__,
            'python_version': f'{sys.version_info.major}.{sys.version_info.minor}',
            'app_file': APP, 'tags': ['ccld', 'text-to-image']}
    if repo_id:
        data['models'] = [repo_id]
    return SpaceCardData(**data)


def app_source(flags, name):
    """The Space's app.py: ccld's app with `flags` [(flag, value, local)], a local value
    named by its file in the Space's folder."""
    shown = ',\n          '.join(
        f'{flag!r}, ' + (f'str(HERE / {Path(value).name!r})' if local else repr(value))
        for flag, value, local in flags)
    return f'''#!/usr/bin/env python3
"""A Gradio Space of the ccld model {name}: ccld's web page on it (see README.md).

On a Space (SPACE_ID is set) it serves 0.0.0.0:{PORT} without a password of its own: the
Space's visibility says who may use it. Run elsewhere, `python3 app.py` binds 127.0.0.1 as
ccld's app.py does, and takes its flags (python3 app.py --help).
"""

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODELS = [{shown}]
SPACE = ['--listen', '--insecure-no-auth', '--port', '{PORT}']


def flags(argv, environ=os.environ):
    """app.py's flags: the models, a Space's address on a Space, then `argv`."""
    return [*MODELS, *(SPACE if environ.get('SPACE_ID') else []), *argv]


def main(argv):
    try:
        from ccld import cli
        from ccld.app.flags import PROG, parser
        from ccld.app.serve import serve
    except ModuleNotFoundError as e:
        if e.name != 'ccld':
            raise
        sys.exit(f'{{Path(__file__).name}}: error: ccld is not installed: pip install -r '
                 f'{{HERE / "requirements.txt"}}')
    cli.run(lambda: serve(parser().parse_args(flags(argv))), PROG)


if __name__ == '__main__':
    main(sys.argv[1:])
'''


def readme(data, name, repo_id, requirement):
    from huggingface_hub import SpaceCard
    model = f'[{repo_id}](https://huggingface.co/{repo_id})' if repo_id else f'`{name}`'
    lines = [f'# {data.title}', '',
             f'Try the CLOOB-conditioned latent diffusion model {model} in the browser: text '
             'and image prompts, image to image. The page is ccld\'s app.py; its generation is '
             'also an API (`/generate`) for `gradio_client`.', '',
             'Run it on your own machine the same way:', '', '```sh',
             f'pip install -r {REQUIREMENTS}', f'python3 {APP}    # then open '
             f'http://127.0.0.1:{PORT}', '```', '',
             f'`{REQUIREMENTS}` installs ccld as `{requirement.splitlines()[-1]}`.']
    return SpaceCard(f'---\n{data.to_yaml()}\n---\n\n' + '\n'.join(lines) + '\n')


def write_space(folder, model, *, repo_id=None, requirement):
    """Writes the Space of the shared file `model` into `folder` (check_dir first): the
    model named hf://`repo_id` when it is pushed there, else copied in. Returns {path in
    the Space repository: file} of what it wrote."""
    folder, model = Path(folder), Path(model)
    record = read_shared(model)
    frozen = frozen_models(record, model.name, model.parent)
    checkpoint = ('--checkpoint', f'{hub.PREFIX}{repo_id}', []) if repo_id else \
        ('--checkpoint', str(model), [model])
    flags = [checkpoint, *frozen]
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for _, _, files in flags:
        for file in files:
            target = folder / file.name
            if not target.exists() or not target.samefile(file):
                shutil.copyfile(file, target)
            written[file.name] = target
    name = f'{hub.PREFIX}{repo_id}' if repo_id else model.name
    title = repo_id.split('/')[-1] if repo_id else model.stem
    texts = {CARD: str(readme(front_matter(title, repo_id), name, repo_id, requirement)),
             APP: app_source(flags, name), REQUIREMENTS: requirement + '\n'}
    for file, text in texts.items():
        (folder / file).write_text(text, encoding='utf-8')
        written[file] = folder / file
    return dict(sorted(written.items()))

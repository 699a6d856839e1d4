"""Model files on the Hugging Face hub, by name: hf://OWNER/NAME[@REVISION][/FILE].

Every flag that takes a model file also takes such a name. A tool resolves it once, where
it checks its flags and before any model loads, to a file in huggingface_hub's cache
(downloaded there if need be): a second run reads the cache, and HF_HUB_OFFLINE=1 works on
what was fetched before. From then on it is a local file like any other, loaded the same
safe way (weights only). What a tool records of such a file is `name_of(path)`, its hub
name pinned to the commit it came from, beside the digests records hold already.

The other way, `upload` commits chosen files to a repository: a model's, or a Space's.

These names are model repositories; hf://OWNER/NAME given to --train-set is a dataset,
which ccld.data.hf_datasets streams.
"""

import dataclasses
import re
from pathlib import Path

from ..errors import UserError

PREFIX = 'hf://'
SPEC = 'hf://OWNER/NAME[@REVISION][/FILE]'
LOGIN = 'hf auth login'  # huggingface_hub's command line (its 1.x renamed huggingface-cli)
WEIGHTS = ('.safetensors', '.ckpt', '.pth', '.pt', '.bin')
AUTOENCODER_WEIGHTS = ('.safetensors', '.ckpt')  # in the order they are preferred
COMMIT = re.compile(r'[0-9a-f]{40}')


def is_hub_name(text):
    return isinstance(text, str) and text.startswith(PREFIX)


def resolve(name, flag, suffixes=WEIGHTS):
    """The local file `name` stands for: itself, if it is no hub name; else FILE of the
    repository (without FILE: its one file ending in `suffixes`, or the one its card names),
    from the cache or downloaded into it. UserError in one line, naming `flag`, if it
    cannot be had."""
    if not is_hub_name(name):
        return name
    uri = _parse(name, flag)
    filename = uri.path_in_repo or _model_file(uri, name, flag, suffixes)
    return _download(uri, filename, name, flag)


def resolve_autoencoder(name, flag):
    """The local autoencoder NAME (NAME.yaml beside NAME.safetensors or NAME.ckpt) that
    `name` stands for: itself, if it is no hub name; else STEM.yaml and STEM's weights
    from hf://OWNER/NAME[@REVISION][/STEM] (without STEM: the repository's one .yaml with
    weights of its name beside it), fetched into the cache. A .ckpt from the hub must hold
    weights alone: the autoencoder loader would unpickle other objects in full."""
    if not is_hub_name(name):
        return name
    uri = _parse(name, flag)
    files = set(_listing(uri, name, flag))
    stem = re.sub(r'\.(yaml|ckpt|safetensors)$', '', uri.path_in_repo)
    stems = [stem] if stem else sorted(f[:-len('.yaml')] for f in files if f.endswith('.yaml')
                                       and any(f[:-len('.yaml')] + s in files
                                               for s in AUTOENCODER_WEIGHTS))
    if len(stems) != 1:
        found = f'{len(stems)} ({", ".join(stems[:4])})' if stems else 'none'
        raise UserError(f'{flag}: {name} holds {found} autoencoders as STEM.yaml beside '
                        f'STEM.safetensors or STEM.ckpt; name one: {_with_file(uri, "STEM")}.')
    weights = next((stems[0] + s for s in AUTOENCODER_WEIGHTS if stems[0] + s in files), None)
    if weights is None or f'{stems[0]}.yaml' not in files:
        raise UserError(f'{flag}: {name}: the repository has no {stems[0]}.yaml with '
                        f'{stems[0]}.safetensors or {stems[0]}.ckpt beside it (an autoencoder '
                        'NAME is NAME.yaml + its weights).')
    local = _download(uri, weights, name, flag)
    # The config from the same commit, so that both land in one snapshot folder.
    commit = cached_location(local)[1]
    _download(dataclasses.replace(uri, revision=commit), f'{stems[0]}.yaml', name, flag)
    stem = str(Path(local).with_suffix(''))
    from .autoencoder import weights_path
    if weights_path(stem).suffix == '.ckpt':  # what the loader will read
        from .checkpoint_files import safe_load
        safe_load(weights_path(stem))  # UserError for a file that holds more than weights
    return stem


def resolve_cloob(name, flag='--cloob-checkpoint'):
    """`name` itself: a pretrained CLOOB name or a .pkl path. A hub name is refused: CLOOB
    checkpoints are pickles, which run code as they load, so ccld loads none it did not
    check (the pretrained names download from a fixed address and are checked by sha256)."""
    if is_hub_name(name):
        raise UserError(f'{flag}: {name}: CLOOB checkpoints are pickles, which can run code as '
                        'they load, so ccld does not load them from the hub; pass a pretrained '
                        'name or a .pkl file you trust.')
    return name


def resolve_frozen_models(args, autoencoder='vqgan_model'):
    """The autoencoder and CLOOB flags of `args` (the autoencoder's under `autoencoder`),
    their hub names resolved."""
    flag = '--' + autoencoder.replace('_', '-')
    setattr(args, autoencoder, resolve_autoencoder(getattr(args, autoencoder), flag))
    resolve_cloob(args.cloob_checkpoint)
    return args


def cached_location(path):
    """(OWNER/NAME, commit, FILE) of a file (or autoencoder NAME) in the hub cache's
    models--OWNER--NAME/snapshots/COMMIT/FILE; None for any other path."""
    parts = Path(path).parts
    for i in range(len(parts) - 3):
        repo = parts[i].split('--')
        if len(repo) == 3 and repo[0] == 'models' and parts[i + 1] == 'snapshots':
            return '/'.join(repo[1:]), parts[i + 2], '/'.join(parts[i + 3:])
    return None


def name_of(path, pinned=True):
    """How records name a file: its hub name for a file of the hub cache (pinned to the
    commit it came from unless not `pinned`), else the path as it is."""
    found = cached_location(path)
    if found is None:
        return str(path)
    repo, commit, file = found
    return f'{PREFIX}{repo}{"@" + commit if pinned else ""}/{file}'


def repo_of(name):
    """OWNER/NAME of a hub name (pinned or not); None for other names."""
    if not is_hub_name(name):
        return None
    return '/'.join(re.split(r'[@/]', name[len(PREFIX):])[:2])


def _parse(name, flag):
    from huggingface_hub import parse_hf_uri
    from huggingface_hub.errors import HfUriError
    try:
        uri = parse_hf_uri(name)
    except HfUriError as e:
        raise UserError(f'{flag}: {name} is not a hub name ({e.msg.strip().rstrip(".")}); write '
                        f'{SPEC}.') from None
    if uri.type != 'model':
        raise UserError(f'{flag}: {name} names a {uri.type} repository; {flag} takes a model '
                        f'repository, {SPEC}.')
    return uri


def _with_file(uri, file):
    revision = f'@{uri.revision}' if uri.revision else ''
    return f'{PREFIX}{uri.id}{revision}/{file}'


def _cache_folder(uri):
    from huggingface_hub import constants
    return Path(constants.HF_HUB_CACHE) / f'models--{uri.id.replace("/", "--")}'


def _cached_commit(uri):
    """The commit the cache holds for the revision, or None."""
    revision = uri.revision or 'main'
    if COMMIT.fullmatch(revision):
        return revision if (_cache_folder(uri) / 'snapshots' / revision).is_dir() else None
    ref = _cache_folder(uri) / 'refs' / revision
    return ref.read_text().strip() if ref.is_file() else None


def _cached_files(uri):
    """The files the cache holds of the revision, or None when it holds none of it."""
    commit = _cached_commit(uri)
    snapshot = _cache_folder(uri) / 'snapshots' / str(commit)
    if commit is None or not snapshot.is_dir():
        return None
    return sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob('*') if p.is_file())


def _listing(uri, name, flag):
    """The files of the repository at the revision: the hub's, or, offline or when the hub
    cannot be reached, those in the cache."""
    import httpx2
    from huggingface_hub import HfApi, is_offline_mode
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
    if not is_offline_mode():
        try:
            return HfApi().list_repo_files(uri.id, revision=uri.revision)
        except HfHubHTTPError as e:
            raise _hub_error(e, uri, name, flag) from None
        except (httpx2.TransportError, OfflineModeIsEnabled):
            pass  # the cache is all there is
    files = _cached_files(uri)
    if files is None:
        raise _not_cached(uri, name, flag) from None
    return files


def _model_file(uri, name, flag, suffixes):
    """The repository's one model file, or the one its card names (ccld: model_file)."""
    files = _listing(uri, name, flag)
    found = [f for f in files if f.endswith(suffixes)]
    if len(found) > 1 and 'README.md' in files:
        section = card_data(name).get('ccld')
        named = section.get('model_file') if isinstance(section, dict) else None
        found = [named] if named in found else found
    if len(found) == 1:
        return found[0]
    what = f'{len(found)} model files ({", ".join(found[:4])}{", ..." * (len(found) > 4)})' \
        if found else f'no model file ({"/".join(suffixes)})'
    raise UserError(f'{flag}: {name} holds {what}; name one: {_with_file(uri, "FILE")}.')


def card_data(name):
    """The front matter of the model card (README.md) of the repository a hub name is in,
    at its revision, as a dict; {} when there is none or it cannot be had."""
    from huggingface_hub import ModelCard
    try:
        uri = _parse(name, 'card')
        path = _download(uri, 'README.md', name, 'card')
    except UserError:
        return {}
    return ModelCard.load(path, ignore_metadata_errors=True).data.to_dict()


def _download(uri, filename, name, flag):
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    try:
        return hf_hub_download(uri.id, filename, revision=uri.revision)
    except LocalEntryNotFoundError:
        raise _not_cached(uri, name, flag, filename) from None
    except HfHubHTTPError as e:
        raise _hub_error(e, uri, name, flag, filename) from None
    except OSError as e:
        raise UserError(f'{flag}: {name}: could not write {filename} into the hub cache '
                        f'({e.strerror or e}); free some space, or set HF_HUB_CACHE.') from None


def _hub_error(e, uri, name, flag, filename=None):
    """What the hub answered, as one line that says what to do."""
    from huggingface_hub.errors import (GatedRepoError, RemoteEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)
    if isinstance(e, GatedRepoError):
        return UserError(f'{flag}: {name}: {uri.id} is gated: ask for access at '
                         f'https://huggingface.co/{uri.id}, then log in with `{LOGIN}`.')
    if isinstance(e, RepositoryNotFoundError):
        return UserError(f'{flag}: {name}: there is no model repository {uri.id} on the hub, or '
                         f'it is private (log in with `{LOGIN}` to reach yours).')
    if isinstance(e, RevisionNotFoundError):
        return UserError(f'{flag}: {name}: {uri.id} has no revision {uri.revision}.')
    if isinstance(e, RemoteEntryNotFoundError):
        return UserError(f'{flag}: {name}: {uri.id} has no file {filename} at revision '
                         f'{uri.revision or "main"}.')
    status = e.response.status_code if e.response is not None else '?'
    login = f'; log in with `{LOGIN}`' if status in (401, 403) else ''
    return UserError(f'{flag}: {name}: the hub answered {status} '
                     f'({str(e).strip().splitlines()[0] if str(e).strip() else "no reason"})'
                     f'{login}.')


def _not_cached(uri, name, flag, filename=None):
    """Offline (or the hub out of reach): which part of `name` the cache lacks."""
    from huggingface_hub import constants, is_offline_mode
    why = 'HF_HUB_OFFLINE is set' if is_offline_mode() else 'the hub cannot be reached'
    revision = uri.revision or 'main'
    files = _cached_files(uri)
    if not _cache_folder(uri).is_dir():
        what = f'{uri.id} is not in the hub cache ({constants.HF_HUB_CACHE})'
    elif files is None:
        what = f'revision {revision} of {uri.id} is not in the hub cache'
    else:
        held = ', '.join(files[:4]) + ', ...' * (len(files) > 4) if files else 'nothing'
        what = f'{filename} of {uri.id} at {revision} is not in the hub cache (it holds {held})'
    return UserError(f'{flag}: {name}: {what}, and {why}: fetch it once online, or pass a '
                     'local file.')


def check_can_push(repo_id, private=False, repo_type='model', flag='--push-to-hub'):
    """Before anything is made: `repo_id` is OWNER/NAME, the hub is online, there is a
    login (huggingface_hub's token), and a `private` upload goes to no public repository
    that exists. Returns the user name."""
    from huggingface_hub import HfApi, is_offline_mode
    from huggingface_hub.errors import (HFValidationError, HfHubHTTPError, LocalTokenNotFoundError,
                                        RepositoryNotFoundError)
    from huggingface_hub.utils import validate_repo_id
    try:
        validate_repo_id(repo_id)
        if '/' not in repo_id:
            raise HFValidationError('it has no OWNER/')
    except HFValidationError as e:
        raise UserError(f'{flag}: {repo_id} is not a repository name OWNER/NAME '
                        f'({str(e).splitlines()[0].rstrip(".")}).') from None
    if is_offline_mode():
        raise UserError(f'{flag}: HF_HUB_OFFLINE is set; unset it to upload, or write the card '
                        'with --card-only DIR.')
    api = HfApi()
    try:
        user = api.whoami()['name']
    except (LocalTokenNotFoundError, HfHubHTTPError) as e:
        raise UserError(f'{flag}: not logged in to the hub ({str(e).splitlines()[0]}); log in '
                        f'with `{LOGIN}` (a token that can write to {repo_id.split("/")[0]}).') \
            from None
    try:
        public = private and not api.repo_info(repo_id, repo_type=repo_type).private
    except RepositoryNotFoundError:
        public = False  # (it will be made, private)
    if public:
        raise UserError(f'--private: the {repo_type} repository {repo_id} exists and is public; '
                        'make it private on the hub first (its Settings), or drop --private.')
    return user


def upload(repo_id, files, *, repo_type='model', private=False, message, space_sdk=None):
    """Creates the repository (`repo_type` 'model' or 'space', with `space_sdk`), private
    if `private`, if it does not exist, and commits exactly `files`, {path in the
    repository: local file}, in one commit (check_can_push first). Returns the commit's
    URL."""
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError
    api = HfApi()
    where = f'{repo_type} repository {repo_id}'
    try:
        api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True,
                        space_sdk=space_sdk)
        operations = [CommitOperationAdd(path_in_repo=target, path_or_fileobj=str(local))
                      for target, local in files.items()]
        commit = api.create_commit(repo_id, operations, commit_message=message,
                                   repo_type=repo_type)
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else '?'
        reason = str(e).strip().splitlines()[0] if str(e).strip() else 'no reason'
        hint = f'log in with `{LOGIN}` as one who can write there' if status in (401, 403) \
            else 'check the card\'s front matter (--license)' if 'metadata' in str(e).lower() \
            else 'try again'
        raise UserError(f'could not upload to the {where}: the hub answered {status} '
                        f'({reason}); {hint}.') from None
    return commit.commit_url

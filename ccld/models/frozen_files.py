"""Where the frozen models a record names are: the autoencoder NAME (NAME.yaml + NAME.ckpt)
and the CLOOB (a pretrained name, or a .pkl) that checkpoints, exports and adapters record,
so that sampling can default to them.

Records name files so that they resolve wherever the user runs the next command: as
absolute paths (pretrained CLOOB names stay names, and a file from the hub cache is named
by its pinned hub name, ccld.models.hub.name_of, which resolves the same way a flag's hub
name does: from the cache, or downloaded into it). Records written before that hold the
paths as the user typed them, relative to where training ran; and a file shared with its
frozen models may be read on another machine. So a recorded path is looked for as
recorded, then beside the file that records it, then by its last part in the current
folder and beside that file; the sha256 the record also holds says whether what was found
is the same file (generate.check_frozen_models warns when not).
"""

import os
from pathlib import Path

from . import hub

AUTOENCODER, CLOOB = 'autoencoder', 'cloob_checkpoint'  # their keys in records


def recorded(kind, value):
    """How a record names the autoencoder NAME or the CLOOB `value` given on a command line:
    its absolute path (a pretrained CLOOB name or a hub name as it is, a file of the hub
    cache by its pinned hub name; links are kept, not resolved)."""
    if value is None or hub.is_hub_name(value) or (kind == CLOOB and _pretrained(value)):
        return value
    return hub.name_of(os.path.abspath(value))


def find(kind, value, beside, flag):
    """The autoencoder NAME or CLOOB that a record naming `value` (kind AUTOENCODER or
    CLOOB), in the file whose folder is `beside`, means here; None if it is nowhere to be
    found (see the module's docstring for where it is looked for). A hub name resolves as
    the flags' do (hub.resolve_autoencoder, hub.resolve_cloob; UserError naming `flag`
    when it cannot be had)."""
    if hub.is_hub_name(value):
        return hub.resolve_autoencoder(value, flag) if kind == AUTOENCODER else \
            hub.resolve_cloob(value, flag)
    if kind == CLOOB and _pretrained(value):
        return value
    path, beside = Path(value), Path(beside)
    candidates = [path] if path.is_absolute() else [path, beside / path]
    candidates += [Path(path.name), beside / path.name]
    exists = _autoencoder_exists if kind == AUTOENCODER else Path.is_file
    return next((str(c) for c in candidates if exists(c)), None)


def carried(record, beside):
    """`record` with its frozen models named as `recorded` names them, each found from the
    file in folder `beside` that held it (left as it was where it is not found here): what
    a file made from another (an export, an adapter) records. Hub names stay as they are."""
    record = dict(record)
    for kind in (AUTOENCODER, CLOOB):
        if record.get(kind) and not hub.is_hub_name(record[kind]):
            found = find(kind, record[kind], beside, kind)
            record[kind] = recorded(kind, found) if found else record[kind]
    return record


def _pretrained(name):
    from cloob_training.pretrained import list_configs
    return name in list_configs()


def _autoencoder_exists(name):
    from .autoencoder import weights_path
    return Path(f'{name}.yaml').is_file() and weights_path(name).is_file()

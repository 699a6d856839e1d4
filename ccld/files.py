"""Files that are either whole or absent: atomic writes, content digests, stale temp files.

A checkpoint or cache shard is written to a temp file beside its final name (so the
rename never crosses file systems), flushed to disk, then renamed over the name: a kill
at any moment leaves the old file or the new one, never half of one.
"""

import contextlib
import hashlib
import os
import shutil
import socket
from pathlib import Path

TEMP_MARK = '.tmp-'


def sha256(path):
    """Hex sha256 of a file's content."""
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()


def temp_name(path):
    """A hidden name beside `path` for writing it. Host and pid are in the name: several
    processes (DDP ranks, nodes) may write one directory, and stale ones are found by it."""
    path = Path(path)
    return path.parent / f'.{path.name}{TEMP_MARK}{socket.gethostname()}-{os.getpid()}'


def fsync_dir(directory):
    """Makes a rename in `directory` durable (a no-op where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_write(path, mode='wb'):
    """Opens a temp file beside `path`; on a clean exit it is synced and renamed to `path`.

    On any error the temp file is removed and `path` keeps its old content.
    """
    path = Path(path)
    tmp = temp_name(path)
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def remove_stale_temps(directory):
    """Deletes temp files and directories that this host's dead processes left in
    `directory` (after a kill -9). Those of live processes, or of other hosts, are left
    alone. Returns the paths removed.
    """
    host = socket.gethostname()
    removed = []
    for tmp in Path(directory).glob(f'.*{TEMP_MARK}*'):
        owner = tmp.name.rpartition(TEMP_MARK)[2]
        owner_host, _, pid = owner.rpartition('-')
        if owner_host != host or not pid.isdigit() or _alive(int(pid)):
            continue
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

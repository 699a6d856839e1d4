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
import tempfile
from pathlib import Path

from .errors import UserError

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


def check_writable_dir(path, flag):
    """Checks that directory `path` can be written: that a file can be made in it, or, if
    it does not exist yet, in the nearest folder above it that does (where it will be
    made). Makes nothing, so a run that fails before it writes leaves no empty folder
    behind. UserError naming `flag` if not."""
    path = Path(path)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        if existing == path:
            raise UserError(f'{flag}: {path} is a file; pass a directory.')
        raise UserError(f'{flag}: cannot write in {path} ({existing} is a file); pass a '
                        'writable directory.')
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as e:
        raise UserError(f'{flag}: cannot write in {existing} ({e.strerror or e}); pass a '
                        'writable directory.') from None


def make_dirs(path):
    """Makes directory `path` and the folders above it that are missing; returns those it
    made, the deepest first (for remove_empty_dirs)."""
    path = Path(path)
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        folder.mkdir(exist_ok=True)
    return missing


def remove_empty_dirs(folders):
    """Removes each of `folders` (the deepest first) while it is empty: what a run made
    and then wrote nothing into."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty (or gone): neither it nor those above it are ours to drop
            return


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


def not_a_file(path):
    """Why `path` is no file to read, as the end of a sentence ('does not exist', 'is a
    directory, not a file'), or None when it is one."""
    path = Path(path)
    if path.is_file():
        return None
    if path.is_dir():
        return 'is a directory, not a file'
    return 'does not exist'


def read_text_lines(path, what):
    """The non-blank, stripped lines of a UTF-8 text file; UserError for a missing,
    binary or non-UTF-8 file. `what` names the file in messages ('path list ...')."""
    return [line for _, line in read_numbered_lines(path, what)]


def read_numbered_lines(path, what):
    """(1-based line number, line) of each non-blank line, stripped, as read_text_lines;
    the numbers are for messages and names that point back into the file."""
    path = Path(path)
    if not_a_file(path):
        raise UserError(f'{what} {path} {not_a_file(path)}.')
    raw = path.read_bytes()
    if b'\0' in raw:
        raise UserError(f'{what} {path} is a binary file, not text with one entry a line.')
    try:
        text = raw.decode('utf-8-sig')  # a byte order mark (Notepad) is not content
    except UnicodeDecodeError as e:
        raise UserError(f'{what} {path} is not UTF-8 text (byte {e.start}); save it as UTF-8 '
                        'with one entry a line.') from None
    return [(number, line.strip()) for number, line in enumerate(text.splitlines(), 1)
            if line.strip()]

"""Checkpoints that are never half-written, never overwrite good work and never claim a
save that failed; and finding the one to resume from.

- Every checkpoint is written to a temp file beside its name, synced and renamed.
- A write that fails (disk full, read-only) is reported at once, keeps every older
  checkpoint (nothing is pruned until a write succeeds again) and fails the run at the end.
- `step=N.ckpt` every --checkpoint-every steps (optionally only the newest --keep-last),
  `last.ckpt` with it, every --checkpoint-minutes and at the end, and both when a stop
  signal ends the run.
"""

import os
import sys
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins import TorchCheckpointIO
from pytorch_lightning.callbacks import ModelCheckpoint

from ..files import atomic_write, remove_stale_temps
from .signals import StopRequested

STEP_NAME = '{step:08d}'  # files are step=00001234.ckpt


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes checkpoints atomically beside their final name and reads them safely.

    A failed write is reported and remembered, never raised mid-run: under DDP only rank
    zero writes, so raising there would leave the other ranks waiting for it forever.

    `resumed`: (path, checkpoint), the checkpoint at path as the tool read it (mapped,
    safe_load) to build its model from the file's own tensors; the first load of that path
    returns it, and Lightning's load_state_dict then copies each weight onto itself, which
    copies nothing.
    """

    def __init__(self, prog='ccld', resumed=None):
        super().__init__()
        self.prog = prog
        self.resumed = resumed
        self.failures = []        # (path, reason) of every failed write
        self.last_written = None  # the newest checkpoint that was written whole
        self.failed_since_last_write = False

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_write(path) as f:
                save(checkpoint, f)
        except OSError as e:
            reason = e.strerror or str(e)
            self.failures.append((path, reason))
            self.failed_since_last_write = True
            print(f'{self.prog}: error: could not write the checkpoint {path} ({reason}); the '
                  'older checkpoints are kept, and the run will exit with an error.',
                  file=sys.stderr, flush=True)
            return
        self.last_written = path
        self.failed_since_last_write = False

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        from ..models.checkpoint_files import safe_load
        resumed, self.resumed = self.resumed, None
        if resumed is not None and os.path.realpath(resumed[0]) == os.path.realpath(path):
            return resumed[1]
        return safe_load(path)

    def remove_checkpoint(self, path):
        # Pruning after a failed write would leave fewer good checkpoints than asked for.
        if not self.failed_since_last_write:
            super().remove_checkpoint(path)


class _KeepsWriteErrors:
    """A file that remembers why a write failed: torch.save reports a failed write to a
    file object only as 'unexpected pos', without the cause (disk full, file too large)."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        return self.f.flush()


def save(obj, f):
    """torch.save to an open file; a failed write raises its OSError."""
    recording = _KeepsWriteErrors(f)
    try:
        torch.save(obj, recording)
    except RuntimeError:
        if recording.error is None:
            raise
        raise recording.error from None


class Checkpoints(ModelCheckpoint):
    """step=N.ckpt every `every` steps (the newest `keep_last`, or all), last.ckpt beside
    each, and both when a stop signal ends the run. Other exceptions save nothing: under
    DDP they may hit one rank only, and a collective save would then hang."""

    def __init__(self, dirpath, every, keep_last=None):
        pruning = dict(monitor='step', mode='max', save_top_k=keep_last) if keep_last else \
            dict(save_top_k=-1)
        super().__init__(dirpath=dirpath, filename=STEP_NAME, every_n_train_steps=every,
                         save_last=True, save_on_exception=True, enable_version_counter=False,
                         **pruning)

    def on_exception(self, trainer, module, exception):
        if isinstance(exception, StopRequested):
            super().on_exception(trainer, module, exception)

    def on_train_end(self, trainer, module):
        # last.ckpt holds the final step, also when it was not a checkpoint step.
        if self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class TimedLastCheckpoint(pl.Callback):
    """last.ckpt every `minutes` of training, so that a kill -9 loses at most that much.

    (Lightning's ModelCheckpoint ignores its time interval under manual optimisation.)
    Ranks' clocks differ a little: all of them save when any one finds the time is up.
    """

    def __init__(self, path, minutes):
        self.path, self.seconds = Path(path), minutes * 60

    def on_train_start(self, trainer, module):
        self.last = time.monotonic()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        due = time.monotonic() - self.last >= self.seconds
        if trainer.world_size > 1:
            flag = torch.tensor([int(due)], device=module.device)
            due = bool(trainer.strategy.reduce(flag, reduce_op='max'))
        if due:
            trainer.save_checkpoint(self.path)
            self.last = time.monotonic()


def checkpoint_files(directory):
    """The checkpoints in `directory`, newest first. Writes are renamed into place whole,
    so a file's modification time is when its save finished."""
    files = [p for p in Path(directory).glob('*.ckpt') if p.is_file()]
    return sorted(files, key=lambda p: p.stat().st_mtime_ns, reverse=True)


def newest_good_checkpoint(directory, read):
    """The newest checkpoint in `directory` that `read` accepts (it raises for bad ones),
    with a warning for each one skipped; None when there is none. Stale temp files from
    a killed save are removed first."""
    import warnings

    from ..errors import UserError
    if not Path(directory).is_dir():
        return None, None
    remove_stale_temps(directory)
    for path in checkpoint_files(directory):
        try:
            return path, read(path)
        except UserError as e:
            warnings.warn(f'--resume-from auto: skipping {path}: {e}')
    return None, None

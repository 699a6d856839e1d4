"""What every training tool's run shares, whatever it trains: the output directory's lock,
--resume-from auto, the logger, and a Lightning Trainer with atomic checkpoints, stop
signals and timed saves, ended the same way (128 + the signal on a stop, exit 1 naming the
last good checkpoint when a write failed).

A tool brings its LightningModule, its loader and its own callbacks (demo grids,
throughput); the flags these functions read come from the groups in flags.py.
"""

import contextlib
import fcntl
import functools
import logging
import os
import random
import shutil
import signal
import socket
import sys
import warnings
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_info

from ..errors import RunError, UserError
from ..files import check_writable_dir, make_dirs, remove_empty_dirs
from . import console
from .saving import (AtomicCheckpointIO, Checkpoints, TimedLastCheckpoint, checkpoint_files,
                     newest_good_checkpoint)
from .signals import StopOnSignal, StopRequested


class OutputDirLock:
    """OUTPUT_DIR/.lock, held (flock) by the run that writes OUTPUT_DIR. close() lets go
    and removes the file, and the folders claim_output_dir made if the run wrote nothing
    into them, so a finished or refused run leaves nothing of its own behind.

    The file is removed while still locked, and a process that takes the lock checks
    that the file it locked is still the one at OUTPUT_DIR/.lock (else it was removed
    under it, and it takes the new one): without that check, a process that opened the
    file just before its holder removed it would lock a file no one else can see, beside
    another run locking the new one. (A run killed before close() leaves the file; its
    lock went with the process, and the next run takes it as it is.)
    """

    NAME = '.lock'

    def __init__(self, directory):
        self.path = Path(directory) / self.NAME
        self.created = []
        for _ in range(100):  # each pass means another run let go in between
            self.created = make_dirs(directory) or self.created
            try:
                self.file = open(self.path, 'a+')
            except FileNotFoundError:  # a run that let go removed the folder it had made
                continue
            try:
                fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                self.file.seek(0)
                owner = self.file.read().strip() or 'another process'
                self.file.close()
                raise UserError(f'--output-dir: {directory} is in use by another run ({owner}); '
                                'wait for it to end or pass another --output-dir.') from None
            if self._is_at_path():
                break
            self.file.close()
        else:
            raise RunError(f'could not lock {self.path}: other runs keep taking and removing it.')
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f'pid {os.getpid()} on {socket.gethostname()}\n')
        self.file.flush()

    def _is_at_path(self):
        try:
            there = os.stat(self.path)
        except FileNotFoundError:
            return False
        held = os.fstat(self.file.fileno())
        return (held.st_dev, held.st_ino) == (there.st_dev, there.st_ino)

    @property
    def closed(self):
        return self.file.closed

    def close(self):
        if self.file.closed:
            return
        self.path.unlink(missing_ok=True)  # while locked: see the class's docstring
        self.file.close()
        remove_empty_dirs(self.created)


def claim_output_dir(output_dir, resume_from, checkpoint_bytes=None, checkpoint_dirs=None):
    """Checks --output-dir before any model loads and locks it for this run.

    Refuses a file, an unwritable directory, a directory another live run holds, and a
    new run into a directory that already holds checkpoints (in OUTPUT_DIR/checkpoints,
    or in any of `checkpoint_dirs` for a tool that keeps them elsewhere): a fresh one (no
    --resume-from), or one started from a file that is not one of those checkpoints (a
    model to finetune, another run's checkpoint), which would write its own step-N and
    last.ckpt over them. Warns when the free space looks short of two checkpoints of
    `checkpoint_bytes`. Returns the OutputDirLock, which the run holds until it ends.
    """
    out = Path(output_dir)
    check_writable_dir(out, '--output-dir')
    lock = OutputDirLock(out)
    dirs = checkpoint_dirs or [out / 'checkpoints']
    taken = [d for d in dirs if checkpoint_files(d)]
    if taken and not continues_run(resume_from, dirs):
        lock.close()
        started = '' if resume_from is None else \
            f', which a run started from {resume_from} (not one of them) would overwrite'
        raise UserError(f'--output-dir: {taken[0]} already holds checkpoints{started}; pass '
                        '--resume-from auto to continue that run, or a new --output-dir.')
    if checkpoint_bytes:
        needed, free = 2 * checkpoint_bytes, shutil.disk_usage(out).free
        if free < needed:
            warnings.warn(f'--output-dir {out} has {free / 2 ** 30:.1f} GiB free; two '
                          f'checkpoints of this model take about {needed / 2 ** 30:.1f} GiB.')
    return lock


def continues_run(resume_from, checkpoint_dirs):
    """Whether --resume-from continues the run whose checkpoints are in `checkpoint_dirs`:
    auto, or the path of one of its checkpoints (to go back to an earlier step)."""
    if resume_from == 'auto':
        return True
    if resume_from is None:
        return False
    folder = Path(resume_from).resolve().parent
    return any(folder == Path(d).resolve() for d in checkpoint_dirs)


def releasing_lock(run):
    """A tool's run(args) that releases the lock claim_output_dir took (args.lock) when it
    ends, however it ends."""
    @functools.wraps(run)
    def run_then_release(args):
        with released_on_exit(args.lock):
            return run(args)
    return run_then_release


@contextlib.contextmanager
def released_on_exit(lock, error_only=False):
    """Releases `lock` (an OutputDirLock, or None) when the block ends; with `error_only`,
    only when it raises (the checks after claim_output_dir in a tool's validate)."""
    try:
        yield lock
    except BaseException:
        if lock is not None:
            lock.close()
        raise
    if lock is not None and not error_only:
        lock.close()


def newest_checkpoint(output_dir, read):
    """--resume-from auto: (path, what `read` made of it) for the newest checkpoint in
    OUTPUT_DIR/checkpoints that `read` accepts, or (None, None) for a fresh start."""
    directory = Path(output_dir) / 'checkpoints'
    path, resume = newest_good_checkpoint(directory, read)
    if path is None:
        rank_zero_info(f'--resume-from auto: no checkpoint to resume in {directory}; '
                       'starting a fresh run.')
    return path, resume


def make_logger(args, output_dir, unlogged=()):
    """wandb with --wandb-project (its config: the flags, less the objects in `unlogged`),
    else a CSV file; and a phrase saying where the logs go."""
    from pytorch_lightning.loggers import CSVLogger, WandbLogger
    if args.wandb_project:
        config = {k: v for k, v in vars(args).items() if k not in ('lock', *unlogged)}
        logger = WandbLogger(project=args.wandb_project, save_dir=str(output_dir),
                             log_model=False, config=config)
        where = f'wandb project {args.wandb_project}'
        if os.environ.get('WANDB_MODE') == 'offline':
            where += f' (offline, under {output_dir / "wandb"})'
    else:
        logger = CSVLogger(str(output_dir), name='logs')
        where = f'{logger.log_dir}/metrics.csv (pass --wandb-project to log to wandb)'
    return logger, where


def strategy_for(args):
    if args.strategy != 'auto' or (args.devices == 1 and args.num_nodes == 1):
        return args.strategy
    from pytorch_lightning.strategies import DDPStrategy
    return DDPStrategy(find_unused_parameters=False)


def quiet_lightning():
    """Silences what Lightning warns about that these runs do on purpose."""
    # Frozen models are meant to stay in eval mode.
    warnings.filterwarnings('ignore', message='.*module\\(s\\) in eval mode')
    warnings.filterwarnings('ignore', message='.*isinstance\\(treespec, LeafSpec\\)')
    # The loader reshuffles on resume; the order of a random shuffle need not be restored.
    warnings.filterwarnings('ignore', message=".*dataloader is not resumable")
    # Checkpoints hold the state after the step they are named after, as meant.
    warnings.filterwarnings('ignore', message='.*no pre-optimization state was saved')
    # claim_output_dir has already decided that a run may write into its own directory.
    warnings.filterwarnings('ignore', message='Checkpoint directory .* exists and is not empty')
    # litdata splits its stream across loader workers itself.
    warnings.filterwarnings('ignore', message='.*`IterableDataset` has `__len__` defined')
    logging.getLogger('pytorch_lightning.utilities.rank_zero').addFilter(console.not_noise)


def set_tf32(tf32):
    """--tf32 / --no-tf32: TF32 matrix maths for matmuls and convolutions, or for neither;
    unset (None), torch's default (convolutions only)."""
    if tf32 is not None:
        import torch
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32


def seed_run(seed):
    """Seeds every generator (loader workers too) with --seed, or a random seed that the
    processes the DDP launcher starts inherit; returns it."""
    if seed is None:
        seed = int(os.environ.get('PL_GLOBAL_SEED', random.randrange(2 ** 31)))
    pl.seed_everything(seed, workers=True, verbose=False)
    return seed


class LoaderModule(pl.LightningDataModule):
    """Asks `make_loader(trainer)` for the training loader inside each process Lightning
    starts, once it knows its rank (which litdata and the tar splitter need)."""

    def __init__(self, make_loader):
        super().__init__()
        self.make_loader = make_loader

    def train_dataloader(self):
        return self.make_loader(self.trainer)


def make_trainer(args, prog, callbacks, logger, log_every_n_steps, resumed=None):
    """A Trainer from the run and device flags, saving atomically to
    OUTPUT_DIR/checkpoints (step=N.ckpt every --checkpoint-every steps, last.ckpt beside it
    and every --checkpoint-minutes), stopping on signals; `callbacks` are the tool's own.
    `resumed`: (path, checkpoint) the tool has read already (AtomicCheckpointIO)."""
    checkpoint_dir = Path(args.output_dir) / 'checkpoints'
    checkpoint_io = AtomicCheckpointIO(prog=prog, resumed=resumed)
    standard = [Checkpoints(checkpoint_dir, args.checkpoint_every, args.keep_last),
                StopOnSignal(signal.Signals[args.signal]),
                TimedLastCheckpoint(checkpoint_dir / 'last.ckpt', args.checkpoint_minutes),
                console.progress_bar(), console.ModuleTable()]
    return pl.Trainer(
        accelerator=args.accelerator, devices=args.devices, num_nodes=args.num_nodes,
        strategy=strategy_for(args), precision=args.fprecision, plugins=[checkpoint_io],
        max_steps=args.max_steps or -1, max_epochs=-1,
        callbacks=[standard[0], *callbacks, *standard[1:]], logger=logger,
        enable_model_summary=False,  # (console.ModuleTable is it, less what reads 0)
        default_root_dir=str(args.output_dir), log_every_n_steps=log_every_n_steps,
        # Bucketed batches are dealt to the ranks by their own sampler (data/bucketed.py).
        use_distributed_sampler=getattr(args, 'buckets', None) is None)


def fit(trainer, module, make_loader, ckpt_path, prog):
    """Trains; a stop signal exits with 128 + its number after the save, and a failed
    write (now or earlier in the run) is a RunError naming the newest good checkpoint."""
    checkpoint_io = trainer.strategy.checkpoint_io
    try:
        trainer.fit(module, datamodule=LoaderModule(make_loader), ckpt_path=ckpt_path)
    except StopRequested as stop:
        if trainer.is_global_zero:
            saved = checkpoint_io.last_written or 'nothing (the save failed)'
            print(f'{prog}: stopped by {stop.name} at step {trainer.global_step}; saved '
                  f'{saved}. Run the same command with --resume-from auto to continue.',
                  file=sys.stderr, flush=True)
        raise SystemExit(128 + stop.signum) from None
    except OSError as e:
        raise RunError(f'{e.filename or "a write"} failed ({e.strerror or e}); the latest '
                       f'checkpoint is {checkpoint_io.last_written or "none"}.') from None
    if checkpoint_io.failures:
        path, reason = checkpoint_io.failures[-1]
        raise RunError(f'{len(checkpoint_io.failures)} checkpoint write(s) failed, the last '
                       f'{path} ({reason}); the newest checkpoint written whole is '
                       f'{checkpoint_io.last_written or "none"}.')
    last = checkpoint_io.last_written or Path(trainer.default_root_dir) / 'checkpoints/last.ckpt'
    rank_zero_info(f'Stopped at step {trainer.global_step}; the latest checkpoint is {last}.')

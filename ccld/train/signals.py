"""Stopping a run on a signal without losing work, on one process or many.

SIGTERM (schedulers, preemption), SIGINT (Ctrl-C) and a chosen warning signal (SLURM's
SIGUSR1 by default) only set a flag. After the step in flight, every rank learns whether
any rank was signalled (one tiny all-reduce, at the same point of every step, so no
collective ever runs out of order), and then all of them stop together: the checkpoint
callback saves that step and the run exits with 128 + the signal's number. A second
signal exits at once.
"""

import os
import signal

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.exceptions import SIGTERMException


class StopRequested(SIGTERMException):
    """Raised on every rank at the same step when a stop signal arrived on any of them."""

    def __init__(self, signum):
        super().__init__(128 + signum)
        self.signum = signum

    @property
    def name(self):
        return signal.Signals(self.signum).name


class StopOnSignal(pl.Callback):
    """Turns stop signals into a StopRequested raised on every rank after the same step."""

    def __init__(self, extra_signal=signal.SIGUSR1):
        self.signals = {signal.SIGTERM, signal.SIGINT, extra_signal}
        self.received = None
        self._previous = {}

    def handle(self, signum, frame):
        if self.received is not None:
            os._exit(128 + signum)  # a second signal: stop now, whatever is in flight
        self.received = signum
        launcher = getattr(self.trainer.strategy, 'launcher', None)
        if getattr(launcher, 'kill', None) is not None:
            launcher.kill(signum)  # the processes this one started stop with it

    def on_train_start(self, trainer, module):
        # Lightning installed its own SIGTERM handler as fit started; this one replaces it
        # (Lightning puts the old handlers back when fit ends).
        self.trainer = trainer
        if trainer.received_sigterm and self.received is None:
            self.received = signal.SIGTERM
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self.handle)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        received = self.received or 0
        if trainer.world_size > 1:
            flag = torch.tensor([received], device=module.device)
            received = int(trainer.strategy.reduce(flag, reduce_op='max'))
        if received:
            raise StopRequested(received)

    def teardown(self, trainer, module, stage):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

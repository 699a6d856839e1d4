"""What every process of a run needs to know about itself: whether it is the one that was
launched (and so checks and writes), and how loader workers start."""

import os
import signal


def is_first_process():
    """True in the process that launches a run (global rank zero, or the only process).

    Processes started by a launcher (Lightning's own for --num-gpus, torchrun, srun) have
    their rank in the environment before anything is set up.
    """
    for name in ('RANK', 'SLURM_PROCID', 'LOCAL_RANK', 'NODE_RANK'):
        if os.environ.get(name, '0') != '0':
            return False
    return True


def ignore_stop_signals(worker_id=None):
    """For loader workers: the main process stops them itself once the step is done, so a
    signal sent to the whole process group must not kill them mid-batch."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def init_loader_worker(worker_id):
    """Seeds a loader worker as Lightning would, and keeps it alive through stop signals."""
    from lightning_fabric.utilities.seed import pl_worker_init_function

    ignore_stop_signals()
    pl_worker_init_function(worker_id)

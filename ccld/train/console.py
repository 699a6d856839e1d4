"""What a training run shows in the terminal besides its own lines: Lightning's progress
bar and table of modules, less what does not apply to these runs, and a filter for
Lightning's log lines that say nothing to a user here."""

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_info
from pytorch_lightning.utilities.imports import _RICH_AVAILABLE

# Lightning log lines dropped: its product tips, and the note its checkpoint callback
# writes when a stop signal's exception saves (fit() says what was saved, in one line).
UNSAID = ('💡 Tip', 'An StopRequested was raised with message')


def not_noise(record):
    """Drops the UNSAID lines (one function, so adding it as a filter is idempotent)."""
    return not str(record.msg).lstrip().startswith(UNSAID)


class StepLimitedProgressBar(pl.callbacks.RichProgressBar):
    """Lightning's rich progress bar, its epoch not shown out of a total: these runs end
    at --max-steps or a signal, and it shows the last epoch of a run without an epoch
    limit (max_epochs -1) as 'Epoch 2/-2'."""

    def _get_train_description(self, current_epoch):
        if self.trainer.max_epochs is not None and self.trainer.max_epochs < 0:
            return f'Epoch {current_epoch}'
        return super()._get_train_description(current_epoch)


def progress_bar():
    """Lightning's progress bar: rich's where rich is installed (Lightning's choice too),
    else tqdm's (which shows 'Epoch 2' alone)."""
    return StepLimitedProgressBar() if _RICH_AVAILABLE else pl.callbacks.TQDMProgressBar()


class ModuleTable(pl.callbacks.ModelSummary):
    """Lightning's table of the module's parts, their parameters and modes, without its
    FLOPs column and total: Lightning counts FLOPs only for a module that declares an
    example input, so here they all read 0 (throughput.py measures them instead)."""

    @staticmethod
    def summarize(summary_data, total_parameters, trainable_parameters, model_size,
                  total_training_modes, total_flops=0, **kwargs):
        columns = [(name, values) for name, values in summary_data if name != 'FLOPs']
        widths = [max(len(name), *(len(str(v)) for v in values)) for name, values in columns]
        rows = [[name for name, _ in columns], *zip(*(values for _, values in columns))]
        lines = ['  '.join(f'{str(cell):<{w}}' for cell, w in zip(row, widths)).rstrip()
                 for row in rows]
        counts = [('trainable parameters', trainable_parameters),
                  ('frozen parameters', total_parameters - trainable_parameters),
                  ('parameters', total_parameters)]
        lines += [f'{n:,} {what}' for what, n in counts]
        lines.append(f'{total_training_modes["train"]} modules in train mode, '
                     f'{total_training_modes["eval"]} in eval mode')
        rank_zero_info('\n'.join(lines))

"""Exponential moving average of the model weights, with the original's decay schedule."""

import copy
from contextlib import contextmanager, nullcontext

import torch


def ema_decay(step, decay_at=200_000):
    """0.99 for the first 20k steps, 0.999 until `decay_at`, then 0.9999.

    A fast start lets the average catch up with a quickly changing young model.
    """
    if step < 20_000:
        return 0.99
    if step < decay_at:
        return 0.999
    return 0.9999


def distillation_ema_decay(step, decay_at=200_000):
    """ema_decay, shortened at the start to (1 + step) / (10 + step): a distillation round
    of a few thousand steps then ends with an average of the trained student, not of the
    teacher's weights it started from."""
    return min(ema_decay(step, decay_at), (1 + step) / (10 + step))


@torch.no_grad()
def ema_update(model, averaged_model, decay):
    """averaged = decay * averaged + (1 - decay) * model; buffers are copied."""
    params = dict(model.named_parameters())
    for name, avg in averaged_model.named_parameters():
        if params[name] is not avg:  # (a frozen weight averaged_copy shares)
            avg.lerp_(params[name].detach().to(avg.dtype), 1 - decay)
    buffers = dict(model.named_buffers())
    for name, avg in averaged_model.named_buffers():
        avg.copy_(buffers[name])


def averaged_copy(model):
    """The frozen copy of `model` that ema_update averages into. Parameters that do not
    train in `model` (a LoRA run's base) are shared with it, not copied: the average of a
    constant is the constant, and a base held twice would double its memory (deepcopy is
    told they are copied already, so they are never copied, not even for a moment)."""
    frozen = {id(p): p for p in model.parameters() if not p.requires_grad}
    return copy.deepcopy(model, memo=frozen).requires_grad_(False).eval()


class OffloadedEma:
    """The EMA of a model on an accelerator, kept in CPU memory (--ema-device cpu): after
    each optimizer step the weights are copied into CPU buffers, without waiting, on a
    side stream, and a worker thread averages them in on the CPU while the next step
    runs. The average equals ema_update's on the same values.

    `averaged` is the CPU copy (the module's model_ema, so that checkpoints hold it as
    they always have); with CUDA its tensors and the copy buffers are pinned, which the
    copies need to run asynchronously. Call wait() before reading it, and fence() before
    the weights change again (the next optimizer step): the copy of the last ones must be
    done.
    """

    def __init__(self, averaged):
        self.averaged = averaged
        self.pin = torch.cuda.is_available()
        if self.pin:
            for t in self.tensors(averaged).values():
                t.data = t.data.pin_memory()
        self.staging = {name: torch.empty_like(t, pin_memory=self.pin)
                        for name, t in self.tensors(averaged).items()}
        self.params = {name for name, _ in averaged.named_parameters()}
        self.worker = self.stream = self.pending = self.copied = None

    @staticmethod
    def tensors(module):
        return dict(module.named_parameters()) | dict(module.named_buffers())

    def update(self, model, decay):
        """Starts averaging `model`'s current weights in with this decay."""
        from concurrent.futures import ThreadPoolExecutor
        self.wait()
        sources = self.tensors(model)
        device = next(iter(sources.values())).device
        stream = None
        if device.type == 'cuda':
            self.stream = stream = self.stream or torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
        with torch.no_grad(), torch.cuda.stream(stream) if stream else nullcontext():
            for name, buffer in self.staging.items():
                buffer.copy_(sources[name].detach(), non_blocking=stream is not None)
            if stream is not None:
                self.copied = torch.cuda.Event()
                self.copied.record(stream)
        if self.worker is None:
            self.worker = ThreadPoolExecutor(1, thread_name_prefix='ema')
        self.pending = self.worker.submit(self._average, self.copied, decay)

    @torch.no_grad()
    def _average(self, copied, decay):
        if copied is not None:
            copied.synchronize()
        current = self.tensors(self.averaged)
        for name, buffer in self.staging.items():
            if name in self.params:
                current[name].lerp_(buffer, 1 - decay)
            else:
                current[name].copy_(buffer)

    def fence(self):
        """Makes the current stream wait for the copy of the last weights."""
        if self.copied is not None:
            torch.cuda.current_stream().wait_event(self.copied)
            self.copied = None

    def wait(self):
        """Blocks until the last update is averaged in."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()

    @contextmanager
    def visiting(self, device):
        """The averaged model with its tensors on `device` for a while (to draw a demo
        grid), its CPU tensors kept and put back after."""
        self.wait()
        tensors = self.tensors(self.averaged)
        saved = {name: t.data for name, t in tensors.items()}
        try:
            for t in tensors.values():
                t.data = t.data.to(device, non_blocking=self.pin)
            yield self.averaged
        finally:
            for name, t in tensors.items():
                t.data = saved[name]

    def nbytes(self):
        """The copy buffers' bytes (the averaged model is counted with the module's)."""
        return sum(t.numel() * t.element_size() for t in self.staging.values())

"""The training speed flags: each takes effect in the run, trains and saves a checkpoint
that a model built without it loads, and none changes the math."""

import copy
from types import SimpleNamespace

import pytest
import torch

import tiny
import train_latent_diffusion
from ccld.models import unet
from ccld.train import diffusion_module, run as training_run
from ccld.models.checkpoint_files import build_model, read_checkpoint
from ccld.train.diffusion_module import v_objective
from ccld.train.throughput import training_flops_per_image


@pytest.fixture(scope='module')
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp('speed')
    paths = tiny.make_images(d / 'images', n=8, size=64)
    (d / 'prompts.txt').write_text('a red circle\n')
    return SimpleNamespace(train=tiny.write_path_list(paths, d / 'train.txt'),
                           autoencoder=tiny.tiny_autoencoder(d), cloob=str(tiny.tiny_cloob(d)),
                           prompts=d / 'prompts.txt')


def train_args(assets, out, *extra):
    return ['--train-set', str(assets.train), '--vqgan-model', assets.autoencoder,
            '--autoencoder-scale', '1.5', '--cloob-checkpoint', assets.cloob,
            '--demo-prompts', str(assets.prompts), '--output-dir', str(out),
            '--accelerator', 'cpu', '--num-workers', '0', '--batch-size', '2',
            '--base-channels', '64', '--channel-multipliers', '1,1,1,1', '--image-size', '64',
            '--max-steps', '2', '--checkpoint-every', '1000', '--demo-every', '1',
            '--demo-steps', '2', '--seed', '0', *extra]


def tf32():
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


def first_conv(run):
    return run.module.model.net[0].main[0].weight


SPEED_FLAGS = [  # (flags, what they change in the run they are given to)
    (['--compile'], lambda run: run.graphs > 0),
    (['--channels-last'],
     lambda run: first_conv(run).is_contiguous(memory_format=torch.channels_last)),
    (['--tf32'], lambda run: run.tf32 == (True, True)),
    (['--no-tf32'], lambda run: run.tf32 == (False, False)),
    (['--gradient-checkpointing'], lambda run: run.checkpointed > 0),
    (['--fprecision', 'bf16'], lambda run: run.trainer.precision == 'bf16-mixed'),
    (['--fprecision', '16', '--grad-clip', '1'],  # (Lightning runs it as bf16 on a CPU)
     lambda run: run.trainer.precision in ('16-mixed', 'bf16-mixed')),
    (['--num-workers', '2', '--prefetch-factor', '4'],
     lambda run: (run.loader.num_workers, run.loader.prefetch_factor) == (2, 4)),
]


@pytest.mark.parametrize('flags, applied', SPEED_FLAGS, ids=[' '.join(f) for f, _ in SPEED_FLAGS])
def test_each_speed_flag_takes_effect_and_saves_a_checkpoint_a_plain_model_loads(
        assets, tmp_path, monkeypatch, flags, applied):
    run = SimpleNamespace(graphs=0, checkpointed=0)

    # Inductor's code generation takes minutes on a small CPU; this backend counts the
    # graphs dynamo captures and runs them as they are.
    def backend(graph, example_inputs):
        run.graphs += 1
        return graph.forward

    def counted(*args, **kwargs):
        run.checkpointed += 1
        return checkpoint(*args, **kwargs)
    checkpoint = unet.checkpoint
    monkeypatch.setattr(diffusion_module, 'COMPILE_BACKEND', backend)
    monkeypatch.setattr(unet, 'checkpoint', counted)
    args = train_latent_diffusion.parser().parse_args(train_args(assets, tmp_path, *flags))
    before = tf32()
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, True
    try:  # from torch's defaults, which are put back after the run
        run.trainer, run.module = training_run.run(training_run.validate(args))
        run.tf32 = tf32()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
    run.loader = run.trainer.train_dataloader
    assert applied(run)
    assert run.trainer.global_step == 2
    assert len(list((tmp_path / 'demos').iterdir())) == 2  # the demo works with every flag
    saved = read_checkpoint(tmp_path / 'checkpoints' / 'last.ckpt')
    assert not [k for k in saved.raw['state_dict'] if '_orig_mod' in k]
    for state in (saved.model, saved.model_ema):
        assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in state.values())
        build_model(state)  # strict: a model built without the flag takes the weights


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 512, generator=g),
            torch.rand(4, generator=g))


def loss_and_grads(model, x0, cond, t):
    torch.manual_seed(1)  # the same dropout mask and noise
    loss = v_objective(model, x0, cond, t)
    loss.backward()
    return loss.item(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize('variant', ['compile', 'gradient checkpointing', 'channels last'])
def test_speed_variants_give_the_eager_loss_and_gradients(variant):
    """Tolerance: 1e-5 relative on the loss, 1e-4 on gradients (float32 sums in another
    order); gradient checkpointing recomputes the same ops and must match exactly."""
    model = tiny.tiny_diffusion(base_channels=64, channel_multipliers=(1, 1, 1, 1)).train()
    other = copy.deepcopy(model)
    x0, cond, t = batch()
    if variant == 'compile':
        other.compile(backend='aot_eager')
    elif variant == 'gradient checkpointing':
        other.set_gradient_checkpointing()
    else:
        other.to(memory_format=torch.channels_last)
        x0 = x0.contiguous(memory_format=torch.channels_last)
    (loss, grads), (other_loss, other_grads) = (loss_and_grads(m, x0, cond, t)
                                                for m in (model, other))
    if variant == 'gradient checkpointing':
        assert loss == other_loss
        assert all(torch.equal(a, b) for a, b in zip(grads, other_grads))
    else:
        assert other_loss == pytest.approx(loss, rel=1e-5)
        for a, b in zip(grads, other_grads):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    assert [k for k in other.state_dict()] == [k for k in model.state_dict()]


def test_flop_count_of_the_danbooru_size_unet():
    """The issue's own count (torch.utils.flop_counter): the 557M U-Net's forward at
    256 px is 130 GFLOP per image; forward and backward are about three times that."""
    flops = training_flops_per_image(128, [4, 4, 8, 8], 32)
    assert 3 * 125e9 < flops < 3 * 135e9

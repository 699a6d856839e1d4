"""Full finetuning in less memory: --optimizer adamw8bit, --ema-device cpu, and the model
states the run prints (tests/test_survival.py resumes both bit for bit)."""

import logging
import math

import pytest
import torch

from ccld.models.unet import DiffusionModel
from ccld.train import memory, optimizers
from ccld.train.diffusion_module import LightningDiffusion
from ccld.train.ema import OffloadedEma, ema_update
import test_train
from test_train import load, run_cli, train, train_args

assets = test_train.assets  # its tiny models and images, as a fixture of this module too

EIGHT_BIT = optimizers.adamw8bit_unavailable('cpu') is None
needs_8bit = pytest.mark.skipif(not EIGHT_BIT,
                                reason="bitsandbytes' 8-bit AdamW cannot run here")


def test_the_cpu_ema_averages_as_ema_update_does():
    torch.manual_seed(0)
    model = DiffusionModel(16, [4, 4, 4, 4], 2.0)
    reference, averaged = DiffusionModel(16, [4, 4, 4, 4], 1.0), DiffusionModel(16, [4, 4, 4, 4])
    averaged.load_state_dict(reference.state_dict())
    offloaded = OffloadedEma(averaged)
    for decay in (0.9, 0.99, 0.5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema_update(model, reference, decay)
        offloaded.update(model, decay)
        offloaded.wait()
        for key, value in reference.state_dict().items():
            assert torch.equal(averaged.state_dict()[key], value), key
    assert float(averaged.autoencoder_scale) == 2.0
    assert offloaded.nbytes() == sum(t.numel() * t.element_size()
                                     for t in reference.state_dict().values())


def nbytes(tensors):
    """{device: bytes}, counted here independently of ccld.train.memory."""
    total = {}
    for t in tensors:
        total[str(t.device)] = total.get(str(t.device), 0) + t.numel() * t.element_size()
    return total


def module_tensors(module):
    return [*module.parameters(), *module.buffers()]


def gb_row(name, value):
    return f'  {name:<16}{value / 1e9:>12.3f}'


@pytest.fixture(scope='module')
def small_run(assets, tmp_path_factory):
    """Two steps with both flags (one without them is test_train's first_run)."""
    out = tmp_path_factory.mktemp('small_run')
    flags = ['--ema-device', 'cpu', '--max-steps', '2'] + \
        (['--optimizer', 'adamw8bit'] if EIGHT_BIT else [])
    trainer, module = train(train_args(assets, out, *flags))
    report = next(c for c in trainer.callbacks if isinstance(c, memory.MemoryReport))
    return trainer, module, report, out


def expected_states(module, optimizer_state):
    params = list(module.model.parameters())
    ema = nbytes(module_tensors(module.model_ema))['cpu']
    if module.offloaded_ema is not None:
        ema *= 2  # the average and the buffers the weights are copied into
    return {'parameters': nbytes(module_tensors(module.model)),
            'gradients': nbytes(params), 'optimizer state': optimizer_state,
            'EMA': {'cpu': ema},
            'frozen models': nbytes(module_tensors(module.ae_model) +
                                    module_tensors(module.cloob))}


@needs_8bit
def test_adamw8bit_steps_with_uint8_moments_and_they_are_saved(small_run):
    trainer, module, _, out = small_run
    optimizer = trainer.optimizers[0]
    assert type(optimizer).__name__ == 'AdamW8bit'
    big = max(module.model.parameters(), key=torch.Tensor.numel)
    state = optimizer.state[big]
    assert state['state1'].dtype == state['state2'].dtype == torch.uint8 and state['step'] == 2
    saved = load(out / 'checkpoints' / 'step=00000002.ckpt')['optimizer_states'][0]['state']
    assert any(t.dtype == torch.uint8 for t in tensors_in(saved))


def tensors_in(state):
    """Every tensor in a (nested) optimizer state."""
    for value in state.values():
        if isinstance(value, dict):
            yield from tensors_in(value)
        elif isinstance(value, torch.Tensor):
            yield value


def test_the_printed_model_states_are_those_of_the_tensors(small_run, caplog):
    trainer, module, report, _ = small_run
    optimizer = trainer.optimizers[0]
    counted = {}  # the optimizer's state as it holds it, each shared code book once
    seen = set()
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.data_ptr() not in seen:
                seen.add(value.data_ptr())
                counted['cpu'] = counted.get('cpu', 0) + value.numel() * value.element_size()
    n = [p.numel() for p in module.model.parameters()]
    if EIGHT_BIT:  # 2 uint8 moments and 2 fp32 scales a block of 256; fp32 moments if small
        per_parameter = sum(8 * k if k < 4096 else 2 * k + 8 * math.ceil(k / 256) for k in n)
        assert counted['cpu'] == per_parameter + 2 * 256 * 4
    else:  # two fp32 moments and an fp32 step
        assert counted['cpu'] == sum(8 * k + 4 for k in n)
    want = expected_states(module, counted)
    # Before the first step, from a count per parameter; after it, from the tensors.
    assert report.at_start == want and report.after_step == want
    # (caplog holds this test's records only: the run's were printed in the fixture.)


def test_the_table_is_printed_before_the_first_step_with_a_warning_when_it_does_not_fit(
        assets, tmp_path, monkeypatch, caplog, recwarn):
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(memory, 'device_memory', lambda device: 10 ** 6)
    seen = []
    training_step = LightningDiffusion.training_step

    def spy(self, batch, batch_idx):
        seen.append((caplog.text, [str(w.message) for w in recwarn]))
        return training_step(self, batch, batch_idx)
    monkeypatch.setattr(LightningDiffusion, 'training_step', spy)
    _, module = train(train_args(assets, tmp_path, '--max-steps', '1'))
    text, warned = seen[0]
    n = sum(p.numel() for p in module.model.parameters())
    want = expected_states(module, {'cpu': 8 * n + 4 * len(list(module.model.parameters()))})
    total = sum(row['cpu'] for row in want.values())
    for name, row in [*want.items(), ('total', {'cpu': total}),
                      ('device memory', {'cpu': 10 ** 6})]:
        assert gb_row(name, row['cpu']) in text, (name, text)
    assert [w for w in warned if f'model states alone take {total / 1e9:.1f} GB on cpu' in w]
    assert '  activations come on top, of batches of up to 4 x 4 x 8 x 8 latents (64x64 px)\n' \
        in text
    assert 'Model states after the first optimizer step' in caplog.text
    assert 'Model states after the first optimizer step' not in text


def test_adamw8bit_is_refused_in_one_line_where_it_cannot_run(
        assets, tmp_path, capsys, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError('a model was loaded before the arguments were checked')
    monkeypatch.setattr('ccld.models.autoencoder.load_autoencoder', refuse)
    monkeypatch.setattr(optimizers, 'adamw8bit_unavailable',
                        lambda device_type: f'no 8-bit kernel for {device_type}')
    code = run_cli(train_args(assets, tmp_path / 'out', '--optimizer', 'adamw8bit'))
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert '--optimizer adamw8bit: no 8-bit kernel for cpu' in err
    assert not (tmp_path / 'out').exists()


def test_the_cpu_ema_is_the_ema_of_a_plain_run_and_stays_on_the_cpu(small_run, assets, tmp_path):
    trainer, module, _, out = small_run
    assert module.offloaded_ema is not None
    assert all(t.device.type == 'cpu' for t in module_tensors(module.model_ema))
    assert len(list((out / 'demos').iterdir())) == 2  # drawn from the CPU EMA
    plain = ['--max-steps', '2'] + (['--optimizer', 'adamw8bit'] if EIGHT_BIT else [])
    train(train_args(assets, tmp_path, *plain))
    a, b = (load(d / 'checkpoints' / 'step=00000002.ckpt')['state_dict'] for d in (out, tmp_path))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize('name', ['adamw', pytest.param('adamw8bit', marks=needs_8bit)])
def test_the_count_before_the_first_step_is_what_the_optimizer_then_holds(name):
    """Frozen parameters (as under LoRA) get no state; small tensors keep fp32 moments."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Linear(128, 80),
                                torch.nn.Linear(80, 3))  # 10240 values in 40 blocks, then 240
    model[0].requires_grad_(False)
    optimizer = optimizers.make_optimizer(name, model.parameters(), 1e-3)
    expected = optimizers.expected_state_bytes(optimizer)
    model(torch.randn(2, 64)).square().sum().backward()
    optimizer.step()
    held = {'cpu': sum(t.numel() * t.element_size() for t in
                       {t.data_ptr(): t for s in optimizer.state.values() for t in s.values()
                        if isinstance(t, torch.Tensor)}.values())}
    assert expected == held == memory.tensor_bytes(memory.optimizer_tensors(optimizer))
    if name == 'adamw8bit':
        assert optimizer.state[model[1].weight]['state1'].dtype == torch.uint8


def test_with_buckets_the_table_and_the_warning_name_the_largest_bucket(
        assets, tmp_path, monkeypatch, caplog, recwarn):
    """At --image-size 320, --bucket-step 128, --max-aspect 2 the buckets are, by hand,
    256x384 and 384x256 (width 128 gives 128x768 and 512 gives 512x128, beyond 2:1): of
    98304 px, the most (less than 320 x 320). Batches of 2 of the wider: 2 x 4 x 32 x 48
    latents, where the square would be 2 x 4 x 40 x 40."""
    from PIL import Image
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(memory, 'device_memory', lambda device: 10 ** 6)
    paths = [tmp_path / f'{i}.png' for i in range(2)]
    for path in paths:
        Image.new('RGB', (200, 300), (200, 30, 30)).save(path)  # tall, but the table says the bound
    (tmp_path / 'list.txt').write_text(''.join(f'{p}\n' for p in paths))
    train(train_args(assets, tmp_path / 'out', '--train-set', str(tmp_path / 'list.txt'),
                     '--aspect-buckets', '--image-size', '320', '--bucket-step', '128',
                     '--batch-size', '2', '--max-steps', '1'))
    largest = '2 x 4 x 32 x 48 latents (384x256 px, the largest bucket)'
    assert f'  activations come on top, of batches of up to {largest}\n' in caplog.text
    assert [w for w in recwarn if f'before the activations of batches of up to {largest}: '
            in str(w.message)]

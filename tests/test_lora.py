"""LoRA finetuning (models/lora.py): train_latent_diffusion.py --lora-rank on a frozen base,
checkpoints of adapters alone, export_model.py (the adapter, or --merge), sample.py and
evaluate.py --lora; all on tiny models on the CPU."""

import copy
import io
import json
import signal
from contextlib import redirect_stderr
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import evaluate
import export_model
import learning
import sample
import tiny
import train_latent_diffusion
from ccld.diffusion.guidance import cfg_model_fn
from ccld.diffusion.sampling import plms_sample
from ccld.errors import UserError
from ccld.diffusion.schedule import sampling_timesteps
from ccld.models import lora
from ccld.models.checkpoint_files import read_checkpoint, safe_load
from ccld.train import diffusion_module, run as training_run
from ccld.train.memory import MemoryReport
from conftest import FIXTURES, fill_state_dict
from test_survival import assert_same, assets, start, stderr_of, train_args, wait_for, weights

__all__ = ['assets']  # test_survival's images, tiny frozen models and latent cache
SAMPLE_ARGS = ['a red fox', '-n', '2', '--steps', '2', '--method', 'ddim', '--seed', '7',
               '--device', 'cpu', '--size', '64']


def golden_base():
    """The U-Net of the golden fixture's widths, filled by the fixture's rule."""
    cfg = torch.load(FIXTURES / 'unet_golden.pt', weights_only=False)['config']
    model = tiny.tiny_diffusion(base_channels=cfg['base_channels'],
                                channel_multipliers=cfg['channel_multipliers'])
    return fill_state_dict(model, {'autoencoder_scale': 1.5})


def perturbed(model, seed=0):
    """Gives every adapter B weight random values (a fresh adapter's are zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if '.lora_B.' in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model


def lora_checkpoint(path, base, base_path, record=None, rank=4, alpha=8.0):
    """A checkpoint as a --lora-rank run writes it: the adapters (perturbed) and their EMA,
    the base named by path and digest; returns (path, the adapted model)."""
    adapter = lora.spec_of(rank, alpha, None, base_path, base.state_dict())
    # The A weights peft draws from the global generator: seeded, so that they are the same
    # whatever ran before (and however loading the base draws, which it no longer does).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = perturbed(lora.adapted_model(base.state_dict(), adapter))
    kept = {k: v for k, v in model.state_dict().items()
            if lora.is_adapter_key(k) or k == 'autoencoder_scale'}
    ccld = {'lora': adapter.spec(), 'base_channels': adapter.widths[0],
            'channel_multipliers': adapter.widths[1], 'autoencoder_scale': 1.5,
            'image_size': 64, **(record or {})}
    torch.save({'state_dict': {f'{m}.{k}': v for m in ('model', 'model_ema')
                               for k, v in kept.items()},
                'ccld': ccld, 'global_step': 7, 'pytorch-lightning_version': '2.6.0'}, path)
    return Path(path), model.eval()


@pytest.fixture(scope='module')
def files(assets):
    """A golden-width base (bare), another base, a LoRA checkpoint of the first and its
    adapter and merged exports."""
    d = assets.dir / 'lora_files'
    d.mkdir()
    base = golden_base().eval()
    base_path = tiny.save_bare(base, d / 'base.pth')
    other = tiny.save_bare(tiny.tiny_diffusion(seed=3, base_channels=64,
                                               channel_multipliers=(1, 1, 2, 2)), d / 'other.pth')
    ckpt, adapted = lora_checkpoint(d / 'lora.ckpt', base, base_path)
    adapter, merged = d / 'adapter.safetensors', d / 'merged.safetensors'
    assert export(ckpt, adapter, '--dtype', 'fp32') == 0
    assert export(ckpt, merged, '--merge', '--dtype', 'fp32') == 0
    return SimpleNamespace(dir=d, base=base, base_path=base_path, other=other, ckpt=ckpt,
                           adapted=adapted, adapter=adapter, merged=merged)


def export(*argv):
    return tiny.exit_code(export_model.main, 'export_model.py', [str(a) for a in argv])


def run_in_process(argv):
    return training_run.run(training_run.validate(train_latent_diffusion.parser().parse_args(argv)))


def model_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, 8, 8, generator=g), torch.rand(2, generator=g),
            torch.randn(2, 512, generator=g))


def test_a_fresh_adapter_leaves_the_output_and_trains_only_itself():
    base = tiny.tiny_diffusion(base_channels=64, channel_multipliers=(1, 1, 1, 1))
    before = {k: v.clone() for k, v in base.state_dict().items()}
    x, t, cond = model_inputs()
    with torch.no_grad():
        expected = base(x, t, cond)
    model = lora.add_adapter(copy.deepcopy(base), 4, 4, lora.DEFAULT_TARGETS)
    with torch.no_grad():
        assert torch.equal(model(x, t, cond), expected)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    targets = lora.target_modules(base, lora.DEFAULT_TARGETS)
    assert trained == {f'{m}.lora_{ab}.default.weight' for m in targets for ab in 'AB'}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model(x, t, cond).pow(2).mean().backward()
        assert all((p.grad is not None) == p.requires_grad for p in model.parameters())
        optimizer.step()
    with torch.no_grad():
        assert not torch.equal(model(x, t, cond), expected)  # it trained
    for key, value in model.state_dict().items():
        if not lora.is_adapter_key(key):
            assert torch.equal(value, before[key.replace('.base_layer.', '.')]), key


def test_every_target_group_names_layers_of_its_own():
    from ccld import cli
    model = tiny.tiny_diffusion(base_channels=64, channel_multipliers=(1, 1, 2, 2))
    groups = {g: set(lora.target_modules(model, [g])) for g in cli.LORA_TARGETS}
    assert all(groups.values())
    assert sum(map(len, groups.values())) == len(set().union(*groups.values()))
    assert all(name.endswith(('qkv_proj', 'out_proj')) for name in groups['attention'])
    assert all(name.startswith('mapping.') for name in groups['mapping'])
    assert all(model.get_submodule(n).kernel_size == (3, 3) for n in groups['conv'])


def test_the_adapter_file_round_trips_and_the_merge_matches_it_with_the_original_keys(files):
    with safe_open(str(files.adapter), 'pt') as f:
        meta, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    expected = lora.adapter_state(files.adapted.state_dict())
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in state)
    assert {k: meta[k] for k in ('format', 'rank', 'alpha', 'targets', 'step')} == {
        'format': 'ccld-lora', 'rank': '4', 'alpha': '8.0', 'targets': 'conv,attention,mapping',
        'step': '7'}
    levels = [int(meta['base_channels']) * int(m) for m in meta['channel_multipliers'].split(',')]
    assert levels == [64, 64, 128, 128]
    assert meta['base'] == str(files.base_path.resolve())
    assert meta['base_sha256'] == lora.weights_digest(files.base.state_dict())
    assert files.adapter.stat().st_size < files.base_path.stat().st_size / 5

    golden = torch.load(FIXTURES / 'unet_golden.pt', weights_only=False)['state_dict_keys']
    with safe_open(str(files.merged), 'pt') as f:
        merged = {k: f.get_tensor(k) for k in f.keys()}
    assert sorted([k, list(v.shape)] for k, v in merged.items()) == sorted(golden)
    applied = lora.apply(golden_base().eval(), [(lora.read(files.adapter), 1.0)])
    x, t, cond = model_inputs()
    model = tiny.tiny_diffusion(base_channels=64, channel_multipliers=(1, 1, 2, 2))
    model.load_state_dict(merged)
    with torch.no_grad():
        want, got, base = applied(x, t, cond), model(x, t, cond), files.base(x, t, cond)
    assert (got - base).abs().max() > 1e-3  # the adapter changes the output
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_merge_of_a_whole_model_and_a_lora_checkpoint_elsewhere_are_one_line(
        files, tmp_path, capsys):
    assert export(files.base_path, tmp_path / 'x.safetensors', '--merge') == 2
    assert 'drop --merge' in capsys.readouterr().err
    argv = [*SAMPLE_ARGS, '--checkpoint', str(files.ckpt), '--output-dir', str(tmp_path)]
    assert tiny.exit_code(sample.main, 'sample.py', argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'is a LoRA checkpoint' in err[0], err


def pixels(directory):
    return [np.asarray(Image.open(p)).astype(int) for p in sorted(Path(directory).glob('*.png'))]


def test_sample_py_lora_applies_the_adapter_at_its_strength_and_refuses_another_base(
        assets, files, tmp_path, capsys):
    """... and takes the base's fp16 export for its base (the digest is of fp16 weights)."""
    def run(name, checkpoint, *extra):
        argv = [*SAMPLE_ARGS, '--checkpoint', str(checkpoint), '--autoencoder',
                assets.autoencoder, '--cloob-checkpoint', assets.cloob, '--no-grid',
                '--output-dir', str(tmp_path / name), *extra]
        return tiny.exit_code(sample.main, 'sample.py', argv)
    assert run('base', files.base_path) == 0
    assert run('strength0', files.base_path, '--lora', f'{files.adapter}:0') == 0
    assert run('applied', files.base_path, '--lora', str(files.adapter)) == 0
    assert run('halves', files.base_path, '--lora', f'{files.adapter}:0.5', '--lora',
               f'{files.adapter}:0.5') == 0
    assert run('merged', files.merged) == 0
    assert export(files.base_path, tmp_path / 'base_fp16.safetensors', '--dtype', 'fp16') == 0
    assert run('fp16', tmp_path / 'base_fp16.safetensors', '--lora', str(files.adapter)) == 0
    base, zero, applied, halves, merged, fp16 = (pixels(tmp_path / n) for n in (
        'base', 'strength0', 'applied', 'halves', 'merged', 'fp16'))
    assert all(np.array_equal(a, b) for a, b in zip(base, zero))
    assert not any(np.array_equal(a, b) for a, b in zip(base, applied))
    for ours in (halves, merged):  # within one level of rounding
        assert all(np.abs(a - b).max() <= 1 for a, b in zip(applied, ours))
    assert all(np.abs(a - b).mean() < 1 for a, b in zip(applied, fp16))  # the base rounded
    with Image.open(sorted((tmp_path / 'applied').glob('*.png'))[0]) as image:
        assert image.text['lora'] == 'adapter.safetensors:1'
    capsys.readouterr()
    assert run('other', files.other, '--lora', str(files.adapter)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'is an adapter for another base' in err[0], err
    assert not (tmp_path / 'other').exists() or not list((tmp_path / 'other').iterdir())


def test_evaluate_py_lora_gives_the_images_of_sample_py_lora(assets, files, tmp_path):
    (tmp_path / 'one.txt').write_text('a red fox\n')
    common = ['--autoencoder', assets.autoencoder, '--cloob-checkpoint', assets.cloob,
              '--device', 'cpu', '-n', '2', '--steps', '2', '--method', 'ddim', '--size', '64',
              '--lora', f'{files.adapter}:0.7']
    assert tiny.exit_code(evaluate.main, 'evaluate.py', [
        '--checkpoint', str(files.base_path), '--prompts-file', str(tmp_path / 'one.txt'),
        '--features', 'cloob', '--output-dir', str(tmp_path / 'eval'), *common]) == 0
    assert tiny.exit_code(sample.main, 'sample.py', [
        '--prompts-file', str(tmp_path / 'one.txt'), '--checkpoint', str(files.base_path),
        '--no-grid', '--output-dir', str(tmp_path / 'sample'), *common]) == 0
    report = json.loads((tmp_path / 'eval' / 'report.json').read_text())
    made = pixels(tmp_path / 'eval' / report['checkpoints'][0]['images'])
    expected = pixels(tmp_path / 'sample')
    assert len(made) == len(expected) == 2
    assert all(np.array_equal(a, b) for a, b in zip(made, expected))
    assert report['checkpoints'][0]['settings']['lora'] == 'adapter.safetensors:0.7'


@pytest.fixture(scope='module')
def own_run(assets, files):
    """An adapter whose run trained at another autoencoder scale (2) than its base records
    (1.5), at 64 px where the base records no size (so 256), with its frozen models
    recorded as a run records them; its adapter and merged exports, and what
    export_model.py printed."""
    d = files.dir / 'own_run'
    d.mkdir()
    record = {'autoencoder_scale': 2.0, 'autoencoder': assets.autoencoder,
              'cloob_checkpoint': assets.cloob}
    ckpt, _ = lora_checkpoint(d / 'lora.ckpt', files.base, files.base_path, record)
    printed = []
    for name, *flags in (('adapter', '--dtype', 'fp32'), ('merged', '--merge', '--dtype', 'fp32')):
        with redirect_stderr(io.StringIO()) as err:
            assert export(ckpt, d / f'{name}.safetensors', *flags) == 0
        printed.append(err.getvalue())
    return SimpleNamespace(dir=d, adapter=d / 'adapter.safetensors',
                           merged=d / 'merged.safetensors', printed=printed[0])


def test_base_and_adapter_sample_at_the_adapter_runs_scale_and_size_as_its_merge_does(
        assets, files, own_run, tmp_path):
    """No --size or --autoencoder-scale: the same seed gives the merged export's images (to
    a level of rounding: the merge sums in another order)."""
    def run(name, *checkpoint):
        argv = ['a red fox', '-n', '2', '--steps', '2', '--method', 'ddim', '--seed', '7',
                '--device', 'cpu', '--autoencoder', assets.autoencoder, '--cloob-checkpoint',
                assets.cloob, '--no-grid', '--output-dir', str(tmp_path / name), *checkpoint]
        assert tiny.exit_code(sample.main, 'sample.py', argv) == 0
        return pixels(tmp_path / name)
    applied = run('applied', '--checkpoint', str(files.base_path), '--lora', str(own_run.adapter))
    merged = run('merged', '--checkpoint', str(own_run.merged))
    assert [a.shape for a in applied] == [b.shape for b in merged] == [(64, 64, 3)] * 2
    assert all(np.abs(a - b).max() <= 1 for a, b in zip(applied, merged))
    with Image.open(sorted((tmp_path / 'applied').glob('*.png'))[0]) as image:
        assert image.text['autoencoder_scale'] == '2.0'


def test_the_adapters_printed_command_samples_as_printed_from_another_folder(own_run, tmp_path):
    """With the frozen models the adapter's run recorded, no flag naming them."""
    assert tiny.run_printed_sample_command(own_run.printed, tmp_path, '-n', '1', '--steps', '2',
                                           '--device', 'cpu') == 0
    assert Image.open(tmp_path / 'out_00000.png').size == (64, 64)


def lora_args(assets, out, base, *extra):
    """test_survival's tiny run from the latent cache, as a LoRA run of `base`."""
    return train_args(assets, out, '--resume-from', str(base), '--lora-rank', '4', *extra,
                      data=['--train-latents', str(assets.latents)])


@pytest.fixture(scope='module')
def run_base(assets):
    """A base of the run's widths, as a released state dict."""
    return tiny.save_bare(tiny.tiny_diffusion(seed=5, base_channels=64,
                                              channel_multipliers=(1, 1, 1, 1)),
                          assets.dir / 'run_base.pth')


def test_a_lora_run_checkpoints_the_adapters_and_the_base_identity_and_keeps_the_base(
        assets, run_base, tmp_path):
    trainer, module = run_in_process(lora_args(
        assets, tmp_path, run_base, '--lora-alpha', '8', '--lora-targets', 'conv,attention',
        '--max-steps', '2', '--checkpoint-every', '2', '--demo-every', '2'))
    assert trainer.global_step == 2
    assert sorted(p.name for p in (tmp_path / 'demos').iterdir()) == [
        'demo_00000001.png', 'demo_00000002.png']
    base = torch.load(run_base, weights_only=True)
    adapted = module.model.state_dict()
    for key, value in base.items():  # the base is bit for bit what it was
        if key != 'autoencoder_scale':
            ours = adapted.get(key, adapted.get(key.rsplit('.', 1)[0] + '.base_layer.'
                                                + key.rsplit('.', 1)[1]))
            assert torch.equal(ours, value), key
    # The EMA holds the frozen base as the model's own tensors, not a second copy, and the
    # memory table's EMA row is the adapters (and the buffers) alone.
    ema = dict(module.model_ema.named_parameters())
    frozen = [(n, p) for n, p in module.model.named_parameters() if not p.requires_grad]
    assert frozen and all(ema[n] is p for n, p in frozen)
    own = [p for n, p in ema.items() if lora.is_adapter_key(n)] + list(module.model_ema.buffers())
    report = next(c for c in trainer.callbacks if isinstance(c, MemoryReport))
    assert report.at_start['EMA'] == {'cpu': sum(t.numel() * t.element_size() for t in own)}
    path = tmp_path / 'checkpoints' / 'last.ckpt'
    raw = safe_load(path, mmap=False)
    targets = lora.target_modules(tiny.tiny_diffusion(base_channels=64,
                                                      channel_multipliers=(1, 1, 1, 1)),
                                  ['conv', 'attention'])
    adapters = {f'{m}.lora_{ab}.default.weight' for m in targets for ab in 'AB'}
    buffers = {'autoencoder_scale', 'mapping_timestep_embed.weight', 'timestep_embed.weight'}
    assert set(raw['state_dict']) == {f'{m}.{k}' for m in ('model', 'model_ema')
                                      for k in adapters | buffers}
    assert len(raw['optimizer_states'][0]['state']) == len(adapters)
    assert raw['ccld']['lora'] == {'rank': 4, 'alpha': 8.0, 'targets': ['conv', 'attention'],
                                   'base': str(run_base.resolve()),
                                   'base_sha256': lora.weights_digest(base)}
    assert path.stat().st_size < run_base.stat().st_size / 4
    ema_b = [v for k, v in raw['state_dict'].items() if k.startswith('model_ema.')
             and '.lora_B.' in k]
    assert any(v.abs().max() > 0 for v in ema_b)  # the EMA of the adapters moved
    # The adapter export names its base; the merged one is a whole model.
    assert export(path, tmp_path / 'a.safetensors') == 0
    assert export(path, tmp_path / 'm.safetensors', '--merge') == 0
    assert read_checkpoint(tmp_path / 'm.safetensors').kind == 'bare'


def test_speed_flags_and_16_bit_precision_work_with_lora(assets, run_base, tmp_path,
                                                         monkeypatch):
    """--compile (a backend that counts dynamo's graphs), --gradient-checkpointing,
    --channels-last and --fprecision bf16 together: the base is bf16 and frozen, the
    adapters fp32, the demo grids are drawn, the checkpoint's adapters are fp32."""
    from ccld.models import unet
    graphs, checkpointed, checkpoint = [], [], unet.checkpoint

    def backend(graph, example_inputs):
        graphs.append(graph)
        return graph.forward
    monkeypatch.setattr(diffusion_module, 'COMPILE_BACKEND', backend)
    monkeypatch.setattr(unet, 'checkpoint', lambda *a, **k: checkpointed.append(1) or
                        checkpoint(*a, **k))
    trainer, module = run_in_process(lora_args(
        assets, tmp_path, run_base, '--compile', '--gradient-checkpointing', '--channels-last',
        '--fprecision', 'bf16', '--max-steps', '2', '--checkpoint-every', '2',
        '--demo-every', '2'))
    assert trainer.global_step == 2 and graphs and checkpointed
    dtypes = {n: p.dtype for n, p in module.model.named_parameters()}
    assert {d for n, d in dtypes.items() if 'lora_' in n} == {torch.float32}
    assert {d for n, d in dtypes.items() if 'lora_' not in n} == {torch.bfloat16}
    assert module.model.autoencoder_scale.dtype == torch.float32
    assert len(list((tmp_path / 'demos').iterdir())) == 2
    state = safe_load(tmp_path / 'checkpoints' / 'last.ckpt', mmap=False)['state_dict']
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in state.values())


def test_sigterm_then_resume_auto_of_a_lora_run_from_a_cache_continues_bit_for_bit(
        assets, run_base, tmp_path):
    """As test_survival's for a full run: SIGTERM at step k, then --resume-from auto for 2
    more steps, gives the adapters, their EMA and optimizer state of a straight run."""
    out = tmp_path / 'out'
    (tmp_path / 'a').mkdir()
    process = start(lora_args(assets, out, run_base, '--checkpoint-every', '2'), tmp_path / 'a')
    wait_for(lambda: (out / 'checkpoints' / 'step=00000002.ckpt').is_file())
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 143, stderr_of(tmp_path / 'a')
    _, _, k = weights(out / 'checkpoints' / 'last.ckpt')
    assert k >= 2
    resumed, _ = run_in_process(train_args(
        assets, out, '--resume-from', 'auto', '--lora-rank', '4', '--checkpoint-every', '2',
        '--max-steps', str(k + 2), data=['--train-latents', str(assets.latents)]))
    assert resumed.global_step == k + 2
    run_in_process(lora_args(assets, tmp_path / 'straight', run_base, '--checkpoint-every', '2',
                             '--max-steps', str(k + 2)))
    a, b = (weights(d / 'checkpoints' / 'last.ckpt') for d in (out, tmp_path / 'straight'))
    assert a[2] == b[2] == k + 2
    assert any('.lora_' in key for key in a[0])
    assert_same(a[0], b[0])
    assert_same(a[1], b[1])


@pytest.mark.parametrize('make_extra, message', [
    (lambda d, base: ['--lora-rank', '4'], '--lora-rank trains adapters on a base model: pass '
     'it as --resume-from BASE'),
    (lambda d, base: ['--lora-rank', '4', '--resume-from', str(d / 'gone.pth')],
     '--resume-from: checkpoint ' + '{d}/gone.pth does not exist'),
    (lambda d, base: ['--lora-rank', '4', '--resume-from', 'auto'], 'found no checkpoint in'),
    (lambda d, base: ['--lora-alpha', '4', '--resume-from', str(base)], 'pass --lora-rank too'),
    (lambda d, base: ['--lora-rank', '4', '--resume-from', str(base), '--fprecision',
                      'bf16-true'], 'would make the LoRA adapters 16-bit'),
])
def test_lora_flags_are_checked_before_any_model_loads(assets, run_base, tmp_path, capsys,
                                                       monkeypatch, make_extra, message):
    def refuse(*args, **kwargs):
        raise AssertionError('a model was loaded')
    monkeypatch.setattr(training_run, 'load_frozen_models', refuse)
    argv = train_args(assets, tmp_path / 'out', *make_extra(tmp_path, run_base))
    assert tiny.exit_code(train_latent_diffusion.main, 'train', argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message.format(d=tmp_path) in err[0], err


def test_a_lora_checkpoint_of_another_base_or_rank_is_refused(assets, files, tmp_path, capsys):
    """The base changed on disk since the run: refused, and so is continuing it with
    another --lora-rank."""
    d = tmp_path / 'out' / 'checkpoints'
    d.mkdir(parents=True)
    moved = tmp_path / 'base.pth'
    moved.write_bytes(files.base_path.read_bytes())
    lora_checkpoint(d / 'last.ckpt', files.base, moved)
    argv = train_args(assets, tmp_path / 'out', '--resume-from', str(d / 'last.ckpt'),
                      '--lora-rank', '8')
    assert tiny.exit_code(train_latent_diffusion.main, 'train', argv) == 2
    assert '--lora-rank: ' in capsys.readouterr().err
    tiny.save_bare(tiny.tiny_diffusion(seed=9, base_channels=64,
                                       channel_multipliers=(1, 1, 2, 2)), moved)
    argv = train_args(assets, tmp_path / 'out', '--resume-from', str(d / 'last.ckpt'))
    assert tiny.exit_code(train_latent_diffusion.main, 'train', argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'is an adapter for another base' in err[0], err


SHIFT = 1.0  # the finetune's latents: the learning problem's, 1 higher in every channel


def test_lora_moves_the_samples_to_a_shifted_target_and_strength_0_gives_back_the_base(
        learned_from_latents, tmp_path):
    """tests/learning.py's trained base, finetuned with LoRA (rank 8) on its latents
    shifted by SHIFT: its samples land on the shifted latent of their condition by the
    learning test's margins (RMS < 0.45, three times nearer it than the old one); the
    adapter written and put back at strength 0 gives the base's samples bit for bit."""
    learned = learned_from_latents
    base, data, embeds = learned.ema, learned.data, learned.embeds
    shifted = data + SHIFT
    ema = learning.finetune_lora(base, learning.direct_batches(shifted, embeds), steps=60,
                                 lr=4e-3)
    noise = torch.randn([4, 4, 8, 8], generator=torch.Generator().manual_seed(1234))

    def samples(model, k):
        model_fn = cfg_model_fn(model, embeds[k:k + 1], [1.0])
        return plms_sample(lambda x, t: model_fn(x, t), noise, sampling_timesteps(20), {},
                           progress=False)
    for k in range(2):
        for sample_ in samples(ema, k):
            assert learning.rms(sample_, shifted[k]) < 0.45
            own, old = ((sample_ - target).norm() for target in (shifted[k], data[k]))
            assert own < old / 3, (own, old)
    spec = lora.spec_of(8, 8, None, tmp_path / 'base.pth', base.state_dict())
    spec.state = lora.adapter_state(ema.state_dict())
    lora.write(spec, tmp_path / 'adapter.safetensors')
    off = lora.apply(copy.deepcopy(base), [(lora.read(tmp_path / 'adapter.safetensors'), 0.0)])
    assert torch.equal(samples(off, 0), samples(base, 0))


def test_a_strength_that_is_not_a_number_is_named_as_such(files):
    with pytest.raises(UserError, match="the strength after the colon, 'x', must be a number"):
        lora.read(f'{files.adapter}:x')
    with pytest.raises(UserError, match='does not exist'):
        lora.read(files.dir / 'gone.safetensors:0.5')

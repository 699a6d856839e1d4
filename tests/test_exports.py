"""export_model.py: a checkpoint's EMA weights as one .safetensors file with its settings
in the metadata, which sample.py --checkpoint and training's --resume-from read."""

import hashlib
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import export_model
import sample
import tiny
from ccld.models.checkpoint_files import build_model, read_checkpoint

SCALE = 1.5
STEP = 1234
FP16_MAX_LEVELS, FP16_MEAN_LEVELS = 2, 0.25  # measured: 1 and 0.08
SAMPLE_ARGS = ['a red fox', '-n', '2', '--steps', '2', '--method', 'ddim', '--seed', '7',
               '--device', 'cpu']


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def run_export(argv):
    return tiny.exit_code(export_model.main, 'export_model.py', argv)


def pixels(path):
    return np.asarray(Image.open(path)).astype(int)


@pytest.fixture(scope='module')
def assets(tmp_path_factory):
    """A training checkpoint, its fp32 and fp16 exports, and sample.py's images from all
    three (no --size: the image size comes from what each file records)."""
    d = tmp_path_factory.mktemp('export')
    ema = tiny.tiny_diffusion(seed=0, autoencoder_scale=SCALE)
    trained = tiny.tiny_diffusion(seed=1, autoencoder_scale=SCALE)
    autoencoder, cloob = tiny.tiny_autoencoder(d), tiny.tiny_cloob(d)
    record = {'image_size': 64, 'autoencoder': autoencoder, 'cloob_checkpoint': str(cloob),
              'autoencoder_sha256': sha256(f'{autoencoder}.ckpt'),
              'base_channels': tiny.BASE_CHANNELS,
              'channel_multipliers': list(tiny.CHANNEL_MULTIPLIERS)}
    ckpt = tiny.save_ccld_checkpoint(d / 'last.ckpt', trained, ema, record, global_step=STEP)
    exports = {dtype: d / f'model_{dtype}.safetensors' for dtype in ('fp32', 'fp16')}
    for dtype, path in exports.items():
        assert run_export([str(ckpt), str(path), '--dtype', dtype]) == 0
    samples = {}
    for name, path in [('ckpt', ckpt), *exports.items()]:
        samples[name] = d / f'samples_{name}'
        argv = [*SAMPLE_ARGS, '--checkpoint', str(path), '--autoencoder', autoencoder,
                '--cloob-checkpoint', str(cloob), '--output-dir', str(samples[name])]
        assert tiny.exit_code(sample.main, 'sample.py', argv) == 0
    return SimpleNamespace(dir=d, ema=ema, ckpt=ckpt, exports=exports, samples=samples,
                           autoencoder=autoencoder, cloob=cloob)


def test_the_export_holds_the_ema_weights_and_the_settings(assets):
    expected_weights = assets.ema.state_dict()
    for dtype, path in assets.exports.items():
        with safe_open(str(path), 'pt') as f:
            metadata = f.metadata()
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        assert tensors.keys() == expected_weights.keys()
        for key, value in expected_weights.items():
            # The scale stays fp32: in fp16, 8.0779 would be 8.0781.
            want = value if dtype == 'fp32' or key == 'autoencoder_scale' else value.half()
            assert tensors[key].dtype == want.dtype and torch.equal(tensors[key], want), key
        assert metadata.pop('software').startswith('ccld ')
        assert metadata == {
            'format': 'ccld-diffusion-model', 'format_version': '1', 'dtype': dtype,
            'base_channels': '16', 'channel_multipliers': '4,4,4,4', 'autoencoder_scale': '1.5',
            'image_size': '64', 'step': str(STEP), 'autoencoder': assets.autoencoder,
            'autoencoder_sha256': sha256(f'{assets.autoencoder}.ckpt'),
            'cloob_checkpoint': str(assets.cloob)}
    fp16, fp32 = (assets.exports[d].stat().st_size for d in ('fp16', 'fp32'))
    assert fp16 < 0.51 * fp32


def test_read_checkpoint_takes_widths_and_scale_from_an_export(assets):
    for dtype, path in assets.exports.items():
        ckpt = read_checkpoint(path)
        assert (ckpt.kind, ckpt.description) == ('bare', 'a ccld model export')
        assert ckpt.autoencoder_scale == SCALE
        assert (ckpt.record['base_channels'], ckpt.record['channel_multipliers'],
                ckpt.record['image_size'], ckpt.record['step']) == (16, [4, 4, 4, 4], 64, STEP)
        # fp16 weights come back as fp32, so they load into the fp32 model as they are.
        for key, value in assets.ema.state_dict().items():
            want = value if dtype == 'fp32' or key == 'autoencoder_scale' else \
                value.half().float()
            assert ckpt.model_ema[key].dtype == torch.float32, key
            assert torch.equal(ckpt.model_ema[key], want), key


def test_sample_py_gives_the_checkpoints_images_from_the_export(assets):
    names = ['out_00000.png', 'out_00001.png', 'out_grid.png']
    for name in names:
        from_ckpt = pixels(assets.samples['ckpt'] / name)
        assert from_ckpt.shape[:2] in [(64, 64), (64, 128)]  # the recorded image size
        assert np.array_equal(pixels(assets.samples['fp32'] / name), from_ckpt)
        # fp16 rounds each weight by up to 2**-11 of itself. Here that moves under 10% of
        # the pixels, by one 8-bit level (a wrong scale or weight would move most of them).
        diff = np.abs(pixels(assets.samples['fp16'] / name) - from_ckpt)
        assert diff.max() <= FP16_MAX_LEVELS and diff.mean() <= FP16_MEAN_LEVELS, \
            (diff.max(), diff.mean())
    with Image.open(assets.samples['fp16'] / names[0]) as image:
        assert (image.text['checkpoint'], image.text['autoencoder_scale']) == \
            ('model_fp16.safetensors', '1.5')


def test_resume_from_an_export_is_a_finetune_start(assets):
    from ccld.train.run import read_resume
    resume = read_resume(str(assets.exports['fp16']))
    assert resume.kind == 'bare' and resume.autoencoder_scale == SCALE
    model = build_model(resume.model)
    expected = {k: v if k == 'autoencoder_scale' else v.half().float()
                for k, v in assets.ema.state_dict().items()}
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_a_released_state_dict_exports_with_what_it_has(assets, tmp_path):
    bare = tiny.save_bare(assets.ema, tmp_path / 'released.pth')
    assert run_export([str(bare), str(tmp_path / 'released.safetensors')]) == 0
    with safe_open(str(tmp_path / 'released.safetensors'), 'pt') as f:
        metadata = f.metadata()
    base, mults = int(metadata['base_channels']), metadata['channel_multipliers'].split(',')
    assert [base * int(m) for m in mults] == [64] * 4  # the level widths of the weights
    assert (metadata['dtype'], metadata['autoencoder_scale']) == ('fp16', '1.5')
    assert not {'step', 'image_size', 'autoencoder', 'cloob_checkpoint'} & metadata.keys()


def test_the_printed_command_samples_as_printed_from_another_folder(assets, tmp_path,
                                                                    monkeypatch, capsys):
    """A checkpoint that records its frozen models as older runs did (the paths typed where
    training ran): its export records where they are, and the "Sample with:" line printed
    samples with them as printed, from any folder."""
    record = {'image_size': 64, 'autoencoder': Path(assets.autoencoder).name,
              'cloob_checkpoint': assets.cloob.name}
    (tmp_path / 'run').mkdir()
    ckpt = tiny.save_ccld_checkpoint(tmp_path / 'run' / 'last.ckpt', assets.ema, assets.ema,
                                     record)
    monkeypatch.chdir(assets.dir)  # where training ran
    out = Path(os.path.relpath(tmp_path / 'model.safetensors'))
    capsys.readouterr()
    assert run_export([str(ckpt), str(out)]) == 0
    printed = capsys.readouterr().err
    with safe_open(str(tmp_path / 'model.safetensors'), 'pt') as f:
        metadata = f.metadata()
    assert (metadata['autoencoder'], metadata['cloob_checkpoint']) == (assets.autoencoder,
                                                                       str(assets.cloob))
    (tmp_path / 'elsewhere').mkdir()
    assert tiny.run_printed_sample_command(printed, tmp_path / 'elsewhere', '-n', '1',
                                           '--steps', '2', '--device', 'cpu') == 0
    assert Image.open(tmp_path / 'elsewhere' / 'out_00000.png').size == (64, 64)


def write_not_a_model(directory, kind, assets):
    """Files that hold no diffusion model, as users might mistake for one."""
    path = {
        'autoencoder checkpoint': lambda: Path(f'{assets.autoencoder}.ckpt'),
        'CLOOB pickle': lambda: assets.cloob,
        'text file': lambda: directory / 'notes.ckpt',
        'text file named .safetensors': lambda: directory / 'notes.safetensors',
        'other safetensors': lambda: directory / 'other.safetensors',
    }[kind]()
    if kind.startswith('text file'):
        path.write_text('not a model\n')
    elif kind == 'other safetensors':
        from safetensors.torch import save_file
        save_file({'weight': torch.zeros(3)}, path)
    return path


@pytest.mark.parametrize('kind, message', [
    ('autoencoder checkpoint', 'holds no diffusion model weights'),
    ('CLOOB pickle', 'is a plain pickle (a CLOOB .pkl?), not a PyTorch checkpoint'),
    ('text file', 'cannot read it as a PyTorch checkpoint'),
    ('text file named .safetensors', 'cannot read it as safetensors'),
    ('other safetensors', 'holds no diffusion model weights'),
])
def test_files_without_a_diffusion_model_are_refused(assets, tmp_path, capsys, kind, message):
    path = write_not_a_model(tmp_path, kind, assets)
    out = tmp_path / 'out' / 'model.safetensors'
    assert run_export([str(path), str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('export_model.py: error: ') and message in err[0]
    assert not out.exists()


def test_the_export_must_be_named_safetensors(assets, tmp_path, capsys):
    assert run_export([str(assets.ckpt), str(tmp_path / 'model.pth')]) == 2
    assert 'name the export *.safetensors' in capsys.readouterr().err
    assert not list(tmp_path.iterdir())

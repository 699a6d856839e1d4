"""Telling the three kinds of diffusion checkpoint apart, and refusing what is not one."""

import pickle
import re

import pytest
import torch
from safetensors.torch import save_file

from ccld.models.checkpoint_files import build_model, read_checkpoint
from ccld.errors import UserError
from tiny import save_bare, save_ccld_checkpoint, save_original_checkpoint, tiny_diffusion


@pytest.fixture(scope='module')
def models():
    return (tiny_diffusion(seed=0, autoencoder_scale=2.5),
            tiny_diffusion(seed=1, autoencoder_scale=2.5))


def test_bare_state_dict(models, tmp_path):
    ckpt = read_checkpoint(save_bare(models[0], tmp_path / 'released.pth'))
    assert ckpt.kind == 'bare' and ckpt.autoencoder_scale == 2.5
    assert ckpt.model_ema is ckpt.model


def test_bare_state_dict_in_the_legacy_format(models, tmp_path):
    """Files torch.save wrote before its zip format cannot be memory-mapped; they load."""
    torch.save(models[0].state_dict(), tmp_path / 'old.pth', _use_new_zipfile_serialization=False)
    ckpt = read_checkpoint(tmp_path / 'old.pth')
    assert ckpt.kind == 'bare' and ckpt.autoencoder_scale == 2.5
    assert torch.equal(ckpt.model['net.0.main.0.weight'],
                       models[0].state_dict()['net.0.main.0.weight'])


def test_bare_safetensors(models, tmp_path):
    save_file(models[0].state_dict(), tmp_path / 'released.safetensors')
    ckpt = read_checkpoint(tmp_path / 'released.safetensors')
    assert ckpt.kind == 'bare' and ckpt.autoencoder_scale == 2.5


def test_original_checkpoint_uses_scale_factor_and_ema(models, tmp_path):
    ckpt = read_checkpoint(save_original_checkpoint(tmp_path / 'o.ckpt', *models, 7.0))
    assert ckpt.kind == 'original' and ckpt.autoencoder_scale == 7.0
    torch.testing.assert_close(ckpt.model_ema['net.0.main.0.weight'],
                               models[1].state_dict()['net.0.main.0.weight'])


def test_ccld_checkpoint_reads_its_record(models, tmp_path):
    path = save_ccld_checkpoint(tmp_path / 'c.ckpt', *models, {'image_size': 64})
    ckpt = read_checkpoint(path)
    assert ckpt.kind == 'ccld' and ckpt.record['image_size'] == 64
    assert ckpt.autoencoder_scale == 2.5


def test_a_checkpoint_without_a_scale_says_so(models, tmp_path):
    state = models[0].state_dict()
    del state['autoencoder_scale']
    torch.save({'state_dict': {f'model.{k}': v for k, v in state.items()}}, tmp_path / 'x.ckpt')
    assert read_checkpoint(tmp_path / 'x.ckpt').autoencoder_scale is None


@pytest.mark.parametrize('content', [{'weights': torch.zeros(3)}, [1, 2, 3]])
def test_other_files_are_refused(tmp_path, content):
    torch.save(content, tmp_path / 'other.pt')
    with pytest.raises(UserError, match='other.pt'):
        read_checkpoint(tmp_path / 'other.pt')


@pytest.mark.parametrize('content, message', [
    (pickle.dumps({'params': [1, 2]}), 'is a plain pickle (a CLOOB .pkl?), not a PyTorch'),
    (b'some notes\n', "neither torch.save's zip format nor a pickle"),
    (b'', "neither torch.save's zip format nor a pickle"),
])
def test_files_torch_save_did_not_write_are_refused_saying_what_they_are(tmp_path, content,
                                                                         message):
    (tmp_path / 'model.pth').write_bytes(content)
    with pytest.raises(UserError, match=re.escape(message)):
        read_checkpoint(tmp_path / 'model.pth')


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(UserError, match='does not exist'):
        read_checkpoint(tmp_path / 'nope.ckpt')


def test_widths_that_are_not_multiples_of_64_are_refused(models):
    state = dict(models[0].state_dict())
    state['net.0.main.0.weight'] = torch.zeros(40, 20, 3, 3)
    with pytest.raises(UserError, match='multiples of 64'):
        build_model(state)


def test_a_half_checkpoint_is_refused(models):
    state = {k: v for k, v in models[0].state_dict().items() if 'qkv_proj' not in k}
    with pytest.raises(UserError, match='missing .* weights .*qkv_proj'):
        build_model(state)

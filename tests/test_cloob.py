import json
import pickle
import warnings

import pytest
import torch

from ccld.models.cloob import load_cloob
from ccld.errors import UserError
from cloob_training import model_pt
from cloob_training.pretrained import resolve_checkpoint
from conftest import FIXTURES, fill_value


@pytest.fixture(scope='module')
def golden():
    return torch.load(FIXTURES / 'cloob_golden.pt', weights_only=False)


def jax_shapes(config):
    """{(Haiku path, leaf): shape} of a CLOOB pickle, written out from SPEC 3 on its own so the
    loader's mapping is checked against the spec rather than against itself."""
    E, im, tx = config['d_embed'], config['image_encoder'], config['text_encoder']
    D, P = im['d_model'], im['patch_size']
    shapes = {('vi_t_image_encoder', 'class_embed'): [D],
              ('vi_t_image_encoder/embed', 'w'): [P, P, im['input_channels'], D],
              ('vi_t_image_encoder/pos_embed', 'w'): [(im['image_size'] // P)**2 + 1, D],
              ('text_encoder/embed', 'embeddings'): [tx['vocab_size'], tx['d_model']],
              ('text_encoder/pos_embed', 'w'): [tx['text_size'], tx['d_model']]}
    for base, enc in [('vi_t_image_encoder', im), ('text_encoder', tx)]:
        D = enc['d_model']
        linears = {'proj': [D, E]}
        for i in range(enc['n_layers']):
            for name in ['query', 'key', 'value', 'linear']:
                linears[f'layer_{i}/self_attention/multi_head_attention/{name}'] = [D, D]
            linears[f'layer_{i}/feed_forward/linear_0'] = [D, 4 * D]
            linears[f'layer_{i}/feed_forward/linear_1'] = [4 * D, D]
            for block in ['self_attention', 'feed_forward']:
                shapes[f'{base}/layer_{i}/{block}/layer_norm', 'scale'] = [D]
                shapes[f'{base}/layer_{i}/{block}/layer_norm', 'offset'] = [D]
        for path, (d_in, d_out) in linears.items():
            shapes[f'{base}/{path}', 'w'] = [d_in, d_out]
            shapes[f'{base}/{path}', 'b'] = [d_out]
    return shapes


def write_filled_checkpoint(config, path, drop=None):
    """Writes a Haiku-format pickle filled by the SPEC 0 rule, plus its sibling json."""
    trees = ({}, {})
    for (module, leaf), shape in jax_shapes(config).items():
        if (module, leaf) != drop:
            tree = trees[0 if module.startswith('vi_t') else 1]
            tree.setdefault(module, {})[leaf] = fill_value(f'{module}/{leaf}', shape).numpy()
    with open(path, 'wb') as f:
        pickle.dump({'params': trees}, f)
    path.with_suffix('.json').write_text(json.dumps(config))
    return path


def load(arg):
    config, path = resolve_checkpoint(str(arg))
    model = model_pt.get_pt_model(config).eval()
    model.load_state_dict(model_pt.get_pt_params(config, path))
    return model


def test_golden_embeddings(golden, tmp_path):
    """Fixture images are in [0, 1] and go through model.normalize before the encoder."""
    model = load(write_filled_checkpoint(golden['config'], tmp_path / 'golden.pkl'))
    tokens = model.tokenize(golden['texts'])
    assert torch.equal(tokens, golden['tokens'])
    with torch.no_grad():
        image_embeds = model.image_encoder(model.normalize(golden['images']))
        text_embeds = model.text_encoder(tokens)
    torch.testing.assert_close(image_embeds, golden['image_embeds'], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(text_embeds, golden['text_embeds'], rtol=1e-5, atol=1e-6)


# SPEC 3: the published CLOOB normalisation, written out here, not read from the model.
CLOOB_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]
CLOOB_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]


def test_embedder_gives_the_golden_embeddings(golden, tmp_path):
    """What training conditions on and sample.py guides with: images in [0, 1] are
    normalised before the encoder; prompts are tokenised."""
    cloob = load_cloob(str(write_filled_checkpoint(golden['config'], tmp_path / 'golden.pkl')))
    with torch.no_grad():
        torch.testing.assert_close(cloob.embed_images(golden['images']), golden['image_embeds'],
                                   rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(cloob.embed_texts(golden['texts']), golden['text_embeds'],
                                   rtol=1e-5, atol=1e-6)


def test_embedder_resizes_bicubic_then_normalizes(golden, tmp_path):
    cloob = load_cloob(str(write_filled_checkpoint(golden['config'], tmp_path / 'golden.pkl')))
    images = torch.rand(2, 3, 48, 48)
    resized = torch.nn.functional.interpolate(images, (32, 32), mode='bicubic',
                                              align_corners=False)
    with torch.no_grad():
        expected = cloob.model.image_encoder((resized - CLOOB_MEAN) / CLOOB_STD)
        torch.testing.assert_close(cloob.embed_images(images), expected, rtol=1e-5, atol=1e-6)


def test_attention_masks_query_rows_only():
    """SPEC 3: rows of invalid positions get -1e30 everywhere (uniform softmax), keys are
    not masked. Compared with that rule written out literally."""
    torch.manual_seed(0)
    attn = model_pt.SelfAttention(16, 2)
    x = torch.randn(2, 7, 16)
    valid = torch.tensor([[1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    h = attn.norm(x)
    q, k, v = (p(h).view(2, 7, 2, 8).transpose(1, 2) for p in (attn.query, attn.key, attn.value))
    logits = q @ k.transpose(-1, -2) / 8**0.5
    logits = torch.where(valid[:, None, :, None], logits, torch.tensor(-1e30))
    expected = attn.out((logits.softmax(-1) @ v).transpose(1, 2).reshape(2, 7, 16))
    with torch.no_grad():
        torch.testing.assert_close(attn(x, valid), expected)


def test_missing_leaf_is_refused(golden, tmp_path):
    drop = ('text_encoder/layer_1/feed_forward/linear_0', 'b')
    path = write_filled_checkpoint(golden['config'], tmp_path / 'partial.pkl', drop=drop)
    with pytest.raises(UserError, match='text_encoder/layer_1/feed_forward/linear_0/b'):
        load(path)


def test_wrong_shape_is_refused(golden, tmp_path):
    path = write_filled_checkpoint(golden['config'], tmp_path / 'model.pkl')
    config = {**golden['config'], 'd_embed': 16}
    path.with_suffix('.json').write_text(json.dumps(config))
    with pytest.raises(UserError, match='vi_t_image_encoder/proj/w has shape'):
        load(path)


def test_unreadable_pickle_is_refused(golden, tmp_path):
    path = tmp_path / 'broken.pkl'
    path.write_bytes(b'not a pickle')
    with pytest.raises(UserError, match='cannot read CLOOB checkpoint'):
        model_pt.get_pt_params(golden['config'], path)


def test_jax_checkpoint_round_trip(golden, tmp_path):
    torch.manual_seed(1)
    model = model_pt.get_pt_model(golden['config']).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    model_pt.save_jax_checkpoint(model, tmp_path / 'tiny.pkl')
    with open(tmp_path / 'tiny.pkl', 'rb') as f:
        image_params, _ = pickle.load(f)['params']
    assert image_params['vi_t_image_encoder/embed']['w'].shape == (8, 8, 3, 64)
    loaded = load(tmp_path / 'tiny.pkl')
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    images, tokens = torch.rand(2, 3, 32, 32), model.tokenize(['a cat', 'a dog'])
    with torch.no_grad():
        assert torch.equal(loaded.image_encoder(images), model.image_encoder(images))
        assert torch.equal(loaded.text_encoder(tokens), model.text_encoder(tokens))


def test_long_prompt_is_truncated_with_a_warning(golden):
    model = model_pt.get_pt_model(golden['config'])
    with pytest.warns(UserWarning, match='truncated'):
        tokens = model.tokenize(['word ' * 100])
    assert tokens.shape == (1, 77)
    assert tokens[0, 0] == 49406 and tokens[0, -1] == 49407
    assert (tokens[0, 1:-1] != 0).all()
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        model.tokenize(['word ' * 75])

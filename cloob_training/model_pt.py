"""PyTorch port of the JAX (Haiku) CLOOB ViT image encoder and text transformer.

The released checkpoints are Haiku pickles; `get_pt_params` converts them to a state dict
and `save_jax_checkpoint` writes the same format back, so that tiny random models for tests
and demos go through the real file format. State-dict keys follow the original PyTorch port,
so reference checkpoints that embed a CLOOB (`cloob.*`) load unchanged.
"""

import json
import pickle
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torchvision import transforms

from ccld.errors import UserError
from .tokenizer import tokenize


class PositionalEmbedding(nn.Module):
    def __init__(self, seq_len, d_model):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(seq_len, d_model) * d_model**-0.5)

    def forward(self, x):
        return x + self.weight


class SelfAttention(nn.Module):
    def __init__(self, d_model, n_heads):
        super().__init__()
        if d_model % n_heads:
            raise ValueError('d_model must be divisible by n_heads')
        self.n_heads = n_heads
        self.norm = nn.LayerNorm(d_model)
        self.query = nn.Linear(d_model, d_model)
        self.key = nn.Linear(d_model, d_model)
        self.value = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x, valid=None):
        """valid [N, S] masks query rows, not keys, as the released text model does: an
        invalid row's softmax is uniform, so its output is the mean of the values. Doing that
        directly keeps the fast unmasked attention kernel and is safe in half precision."""
        n, s, d = x.shape
        x = self.norm(x)
        q, k, v = (proj(x).view(n, s, self.n_heads, -1).transpose(1, 2)
                   for proj in (self.query, self.key, self.value))
        y = F.scaled_dot_product_attention(q, k, v)
        if valid is not None:
            y = torch.where(valid[:, None, :, None], y, v.mean(2, keepdim=True))
        return self.out(y.transpose(1, 2).reshape(n, s, d))


class FeedForward(nn.Module):
    def __init__(self, d_model, d_ff):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.linear_0 = nn.Linear(d_model, d_ff)
        self.linear_1 = nn.Linear(d_ff, d_model)

    def forward(self, x):
        return self.linear_1(F.gelu(self.linear_0(self.norm(x))))


class TransformerLayer(nn.Module):
    def __init__(self, d_model, n_heads):
        super().__init__()
        self.attn = SelfAttention(d_model, n_heads)
        self.ff = FeedForward(d_model, d_model * 4)

    def forward(self, x, valid=None):
        x = x + self.attn(x, valid)
        return x + self.ff(x)


class ViTImageEncoder(nn.Module):
    """Normalized images [N, C, S, S] -> unit embeddings [N, d_embed]."""

    def __init__(self, d_embed, image_size, input_channels, patch_size, n_layers, d_model,
                 n_heads):
        super().__init__()
        self.embed = nn.Conv2d(input_channels, d_model, patch_size, patch_size, bias=False)
        self.class_embed = nn.Parameter(torch.randn(d_model) * d_model**-0.5)
        self.pos_embed = PositionalEmbedding((image_size // patch_size)**2 + 1, d_model)
        self.layers = nn.ModuleList([TransformerLayer(d_model, n_heads) for _ in range(n_layers)])
        self.proj = nn.Linear(d_model, d_embed)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_embed.expand(x.shape[0], 1, -1), x], dim=1)
        x = self.pos_embed(x)
        for layer in self.layers:
            x = layer(x)
        return F.normalize(self.proj(x[:, 0]), dim=-1)


class TextEncoder(nn.Module):
    """Token ids [N, text_size] -> unit embeddings [N, d_embed], pooled at the SOT token."""

    def __init__(self, d_embed, text_size, vocab_size, n_layers, d_model, n_heads):
        super().__init__()
        self.eot = vocab_size - 1
        self.embed = nn.Embedding(vocab_size, d_model)
        self.pos_embed = PositionalEmbedding(text_size, d_model)
        self.layers = nn.ModuleList([TransformerLayer(d_model, n_heads) for _ in range(n_layers)])
        self.proj = nn.Linear(d_model, d_embed)

    def forward(self, tokens):
        is_eot = tokens == self.eot
        valid = torch.cumsum(is_eot, dim=-1) - is_eot.long() == 0  # up to and incl. first EOT
        x = self.pos_embed(self.embed(tokens))
        for layer in self.layers:
            x = layer(x, valid)
        return F.normalize(self.proj(x[:, 0]), dim=-1)


class CLOOB(nn.Module):
    def __init__(self, config):
        super().__init__()
        image, text = config['image_encoder'], config['text_encoder']
        if image['type'] != 'ViT' or text['type'] != 'transformer' or text['tokenizer'] != 'clip':
            raise UserError('unsupported CLOOB config: only a ViT image encoder and a transformer '
                            'text encoder with the clip tokenizer are supported')
        self.config = config
        self.image_encoder = ViTImageEncoder(
            config['d_embed'], image['image_size'], image['input_channels'],
            image['patch_size'], image['n_layers'], image['d_model'], image['n_heads'])
        self.text_encoder = TextEncoder(
            config['d_embed'], text['text_size'], text['vocab_size'], text['n_layers'],
            text['d_model'], text['n_heads'])
        self.normalize = transforms.Normalize(image['normalize']['mean'], image['normalize']['std'])

    def tokenize(self, texts):
        return tokenize(texts, self.config['text_encoder']['text_size'])


def get_pt_model(config):
    return CLOOB(config)


# Layouts: how a Haiku array is permuted into its PyTorch tensor.
_LINEAR = (1, 0)  # w [in, out] -> weight [out, in]
_CONV = (3, 2, 0, 1)  # w [kh, kw, in, out] -> weight [out, in, kh, kw]


def _param_map(config):
    """(Haiku module path, leaf, state-dict key, layout) for every tensor of the model."""
    out = [('vi_t_image_encoder', 'class_embed', 'image_encoder.class_embed', None),
           ('vi_t_image_encoder/embed', 'w', 'image_encoder.embed.weight', _CONV),
           ('vi_t_image_encoder/pos_embed', 'w', 'image_encoder.pos_embed.weight', None),
           ('text_encoder/embed', 'embeddings', 'text_encoder.embed.weight', None),
           ('text_encoder/pos_embed', 'w', 'text_encoder.pos_embed.weight', None)]
    for jax, pt, n_layers in [('vi_t_image_encoder', 'image_encoder',
                               config['image_encoder']['n_layers']),
                              ('text_encoder', 'text_encoder', config['text_encoder']['n_layers'])]:
        modules = [('proj', 'proj', 'linear')]
        for i in range(n_layers):
            attn, ff = f'layer_{i}/self_attention', f'layer_{i}/feed_forward'
            modules += [(f'{attn}/layer_norm', f'layers.{i}.attn.norm', 'norm'),
                        (f'{attn}/multi_head_attention/query', f'layers.{i}.attn.query', 'linear'),
                        (f'{attn}/multi_head_attention/key', f'layers.{i}.attn.key', 'linear'),
                        (f'{attn}/multi_head_attention/value', f'layers.{i}.attn.value', 'linear'),
                        (f'{attn}/multi_head_attention/linear', f'layers.{i}.attn.out', 'linear'),
                        (f'{ff}/layer_norm', f'layers.{i}.ff.norm', 'norm'),
                        (f'{ff}/linear_0', f'layers.{i}.ff.linear_0', 'linear'),
                        (f'{ff}/linear_1', f'layers.{i}.ff.linear_1', 'linear')]
        for jax_mod, pt_mod, kind in modules:
            path, prefix = f'{jax}/{jax_mod}', f'{pt}.{pt_mod}'
            if kind == 'linear':
                out += [(path, 'w', f'{prefix}.weight', _LINEAR),
                        (path, 'b', f'{prefix}.bias', None)]
            else:
                out += [(path, 'scale', f'{prefix}.weight', None),
                        (path, 'offset', f'{prefix}.bias', None)]
    return out


def _inverse(layout):
    return tuple(int(i) for i in np.argsort(layout))


def _split(path):
    """The released pickles keep image and text params in two separate trees."""
    return 0 if path.startswith('vi_t_image_encoder') else 1


def get_pt_params(config, path):
    """Loads a Haiku CLOOB pickle as a state dict for get_pt_model(config), refusing any
    missing, unexpected or wrong-shaped tensor (a partial load would give silent garbage)."""
    try:
        with open(path, 'rb') as f:
            trees = pickle.load(f)['params']
    except (OSError, pickle.UnpicklingError, EOFError, ImportError, KeyError, TypeError,
            AttributeError) as err:
        raise UserError(f'cannot read CLOOB checkpoint {path} ({type(err).__name__}: {err}); '
                        f'it must be a released CLOOB .pkl or one written by this project')
    with torch.device('meta'):
        shapes = {k: v.shape for k, v in get_pt_model(config).state_dict().items()}
    state = {}
    for jax_path, leaf, key, layout in _param_map(config):
        name, tree = f'{jax_path}/{leaf}', trees[_split(jax_path)]
        if leaf not in tree.get(jax_path, {}):
            raise UserError(f'CLOOB checkpoint {path} lacks {name}; it does not match its config')
        array = np.asarray(tree[jax_path][leaf], dtype=np.float32)
        tensor = torch.from_numpy(array).permute(layout) if layout else torch.from_numpy(array)
        if tensor.shape != shapes[key]:
            want = [shapes[key][i] for i in _inverse(layout)] if layout else list(shapes[key])
            raise UserError(f'CLOOB checkpoint {path}: {name} has shape {list(array.shape)}, '
                            f'its config needs {want}')
        state[key] = tensor.contiguous()
    found = {f'{p}/{leaf}' for tree in trees for p, leaves in tree.items() for leaf in leaves}
    extra = sorted(found - {f'{p}/{leaf}' for p, leaf, _, _ in _param_map(config)})
    if extra:
        raise UserError(f'CLOOB checkpoint {path} has {len(extra)} tensors its config lacks, '
                        f'e.g. {extra[0]}; it does not match its config')
    return state


def save_jax_checkpoint(model, path):
    """Writes `model` as a Haiku-format pickle (numpy float32 only, loads without jax) and its
    config as the sibling .json that resolve_checkpoint looks for."""
    path = Path(path)
    state = model.state_dict()
    trees = ({}, {})
    for jax_path, leaf, key, layout in _param_map(model.config):
        tensor = state[key].detach().float().cpu()
        if layout:
            tensor = tensor.permute(_inverse(layout))
        trees[_split(jax_path)].setdefault(jax_path, {})[leaf] = tensor.numpy().copy()
    with open(path, 'wb') as f:
        pickle.dump({'params': trees}, f)
    with open(path.with_suffix('.json'), 'w') as f:
        json.dump(model.config, f, indent=4)

"""The v-objective U-Net of CLOOB-conditioned latent diffusion.

Module names and nesting reproduce the original's state-dict keys exactly, so the
released yfcc_cfg and danbooru_cfg checkpoints load with `strict=True`. The index of
every layer inside its `nn.Sequential` is part of the key, which is why the U is
spelled out level by level instead of being built in a loop.
"""

import math
from functools import reduce

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

CLIP_EMBED_DIM = 512
LATENT_CHANNELS = 4  # a KL f=8 autoencoder's z
COND_DIM = 1024


class Conditioned(nn.Module):
    """Marker for layers whose forward takes the conditioning vector as well."""


class Block(nn.Module):
    """A U-Net block whose activations can be recomputed during the backward pass
    instead of kept from the forward (gradient checkpointing: less memory, ~1/3 more
    compute). Off unless DiffusionModel.set_gradient_checkpointing turns it on."""

    checkpointing = False

    def __call__(self, *args):
        if self.checkpointing and torch.is_grad_enabled():
            return checkpoint(super().__call__, *args, use_reentrant=False)
        return super().__call__(*args)


class CondSequential(nn.Sequential, Conditioned):
    """An nn.Sequential that hands the conditioning vector to the layers that take it."""

    def forward(self, x, cond):
        for layer in self:
            x = layer(x, cond) if isinstance(layer, Conditioned) else layer(x)
        return x


class FourierFeatures(nn.Module):
    """Random Fourier features of the timestep; the matrix is fixed, never trained."""

    def __init__(self, in_features, out_features, std=1.0):
        super().__init__()
        self.register_buffer('weight', torch.randn([out_features // 2, in_features]) * std)

    def forward(self, x):
        f = 2 * math.pi * x @ self.weight.T
        return torch.cat([f.cos(), f.sin()], dim=-1)


class ResLinearBlock(nn.Module):
    def __init__(self, f_in, f_mid, f_out, is_last=False):
        super().__init__()
        self.main = nn.Sequential(
            nn.Linear(f_in, f_mid),
            nn.ReLU(inplace=True),
            nn.Linear(f_mid, f_out),
            nn.Identity() if is_last else nn.ReLU(inplace=True),
        )
        self.skip = nn.Linear(f_in, f_out, bias=False) if f_in != f_out else nn.Identity()

    def forward(self, x):
        return self.main(x) + self.skip(x)


class Modulation(Conditioned):
    """Per-channel scale and shift predicted from the conditioning vector."""

    def __init__(self, channels):
        super().__init__()
        self.layer = nn.Linear(COND_DIM, channels * 2, bias=False)

    def forward(self, x, cond):
        scales, shifts = self.layer(cond).chunk(2, dim=-1)
        return torch.addcmul(shifts[..., None, None], x, scales[..., None, None] + 1)


class ResModConvBlock(Block, Conditioned):
    def __init__(self, c_in, c_mid, c_out, is_last=False):
        super().__init__()
        tail = [nn.Identity(), nn.Identity(), nn.Identity()] if is_last else [
            nn.GroupNorm(1, c_out, affine=False), Modulation(c_out), nn.ReLU(inplace=True)]
        self.main = CondSequential(
            nn.Conv2d(c_in, c_mid, 3, padding=1),
            nn.GroupNorm(1, c_mid, affine=False),
            Modulation(c_mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_mid, c_out, 3, padding=1),
            *tail,
        )
        self.skip = nn.Conv2d(c_in, c_out, 1, bias=False) if c_in != c_out else nn.Identity()

    def forward(self, x, cond):
        return self.main(x, cond) + self.skip(x)


class SelfAttention2d(Block):
    def __init__(self, c_in, n_head):
        super().__init__()
        assert c_in % n_head == 0
        self.n_head = n_head
        self.norm = nn.GroupNorm(1, c_in)
        self.qkv_proj = nn.Conv2d(c_in, c_in * 3, 1)
        self.out_proj = nn.Conv2d(c_in, c_in, 1)

    def forward(self, x):
        n, c, h, w = x.shape
        qkv = self.qkv_proj(self.norm(x))
        # Channels are [q | k | v]; within each, head i owns the i-th contiguous slice.
        qkv = qkv.view(n, self.n_head * 3, c // self.n_head, h * w).transpose(2, 3)
        q, k, v = qkv.chunk(3, dim=1)
        y = F.scaled_dot_product_attention(q, k, v)
        y = y.transpose(2, 3).reshape(n, c, h, w)
        return x + self.out_proj(y)


class SkipBlock(Conditioned):
    """Runs `main` and concatenates its output with the input (a U-Net skip)."""

    def __init__(self, *main):
        super().__init__()
        self.main = CondSequential(*main)

    def forward(self, x, cond):
        return torch.cat([self.main(x, cond), x], dim=1)


def _conv(c_in, c_mid, c_out, is_last=False):
    return ResModConvBlock(c_in, c_mid, c_out, is_last)


def _attn(c):
    return SelfAttention2d(c, c // 64)


def _conv_attn(c, n):
    """n repetitions of (conv c -> c, attention c)."""
    return [layer for _ in range(n) for layer in (_conv(c, c, c), _attn(c))]


def _down():
    return nn.AvgPool2d(2)


def _up():
    return nn.Upsample(scale_factor=2, mode='bilinear', align_corners=False)


class DiffusionModel(nn.Module):
    """Predicts v from a noised latent, its timestep and a 512-d CLOOB embedding.

    A zero embedding is the unconditional input used by classifier-free guidance.
    """

    def __init__(self, base_channels, channel_multipliers, autoencoder_scale=1.0):
        super().__init__()
        c = base_channels
        cs = [c * m for m in channel_multipliers]
        if len(cs) != 4:
            raise ValueError('DiffusionModel needs exactly four channel multipliers')
        self.widths = (base_channels, list(channel_multipliers))

        self.register_buffer('autoencoder_scale', torch.tensor(float(autoencoder_scale)))
        self.mapping_timestep_embed = FourierFeatures(1, 128)
        self.mapping = nn.Sequential(
            ResLinearBlock(CLIP_EMBED_DIM + 128, COND_DIM, COND_DIM),
            ResLinearBlock(COND_DIM, COND_DIM, COND_DIM, is_last=True),
        )
        self.timestep_embed = FourierFeatures(1, 16)

        self.net = CondSequential(
            # Level 0, full resolution (latent 4 channels + 16 timestep planes in).
            _conv(LATENT_CHANNELS + 16, cs[0], cs[0]),
            _conv(cs[0], cs[0], cs[0]),
            _conv(cs[0], cs[0], cs[0]),
            _conv(cs[0], cs[0], cs[0]),
            SkipBlock(
                # Level 1, 1/2 resolution.
                _down(),
                _conv(cs[0], cs[1], cs[1]), _attn(cs[1]),
                *_conv_attn(cs[1], 3),
                SkipBlock(
                    # Level 2, 1/4 resolution.
                    _down(),
                    _conv(cs[1], cs[2], cs[2]), _attn(cs[2]),
                    *_conv_attn(cs[2], 3),
                    SkipBlock(
                        # Level 3, 1/8 resolution: the bottom of the U.
                        _down(),
                        _conv(cs[2], cs[3], cs[3]), _attn(cs[3]),
                        *_conv_attn(cs[3], 6),
                        _conv(cs[3], cs[3], cs[2]), _attn(cs[2]),
                        _up(),
                    ),
                    # Level 2 again, after the skip concatenation.
                    _conv(cs[2] * 2, cs[2], cs[2]), _attn(cs[2]),
                    *_conv_attn(cs[2], 2),
                    _conv(cs[2], cs[2], cs[1]), _attn(cs[1]),
                    _up(),
                ),
                # Level 1 again.
                _conv(cs[1] * 2, cs[1], cs[1]), _attn(cs[1]),
                *_conv_attn(cs[1], 2),
                _conv(cs[1], cs[1], cs[0]), _attn(cs[0]),
                _up(),
            ),
            # Level 0 again, down to the 4 output channels.
            _conv(cs[0] * 2, cs[0], cs[0]),
            _conv(cs[0], cs[0], cs[0]),
            _conv(cs[0], cs[0], cs[0]),
            _conv(cs[0], cs[0], LATENT_CHANNELS, is_last=True),
        )

        with torch.no_grad():
            for param in [*self.mapping.parameters(), *self.net.parameters()]:
                param.mul_(0.5 ** 0.5)

    def set_gradient_checkpointing(self, enabled=True):
        for module in self.modules():
            if isinstance(module, Block):
                module.checkpointing = enabled
        return self

    def forward(self, x, t, clip_embed):
        return self.denoise(x, t, self.conditioning(t, clip_embed))

    def conditioning(self, t, clip_embed):
        """The 1024-d vector every Modulation layer reads, from the embedding and t."""
        clip_embed = F.normalize(clip_embed, dim=-1) * clip_embed.shape[-1] ** 0.5
        mapping_timestep_embed = self.mapping_timestep_embed(t[:, None])
        return self.mapping(torch.cat([clip_embed, mapping_timestep_embed], dim=1))

    def denoise(self, x, t, cond):
        """v from x, t and the conditioning vector."""
        timestep_planes = self.timestep_embed(t[:, None])[..., None, None]
        timestep_planes = timestep_planes.expand(-1, -1, x.shape[2], x.shape[3])
        return self.net(torch.cat([x, timestep_planes], dim=1), cond)


def count_params(model):
    """Parameters plus the two fixed Fourier matrices: the count quoted for releases."""
    fourier = model.mapping_timestep_embed.weight.numel() + model.timestep_embed.weight.numel()
    return sum(p.numel() for p in model.parameters()) + fourier


# Where each level's first conv lives; its weight is [cs[level], c_in, 3, 3].
_LEVEL_KEYS = ['net.0.main.0.weight',
               'net.4.main.1.main.0.weight',
               'net.4.main.9.main.1.main.0.weight',
               'net.4.main.9.main.9.main.1.main.0.weight']


def infer_widths(state_dict, multipliers_hint=(4, 4, 8, 8)):
    """Recovers (base_channels, channel_multipliers) from a state dict's shapes.

    Only the per-level widths matter to the model; they are expressed with the hinted
    multipliers when they fit (the released models use 4,4,8,8), else by their gcd.
    Raises KeyError when the state dict is not a DiffusionModel's.
    """
    cs = [state_dict[key].shape[0] for key in _LEVEL_KEYS]
    hint = list(multipliers_hint)
    if cs[0] % hint[0] == 0:
        base = cs[0] // hint[0]
        if [base * m for m in hint] == cs:
            return base, hint
    base = reduce(math.gcd, cs)
    return base, [w // base for w in cs]

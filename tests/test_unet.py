import math

import pytest
import torch

from ccld.models.unet import DiffusionModel, count_params, infer_widths
from conftest import fill_state_dict


@pytest.fixture(scope='module')
def golden():
    from conftest import FIXTURES
    return torch.load(FIXTURES / 'unet_golden.pt', weights_only=False)


def golden_model(golden):
    cfg = golden['config']
    model = DiffusionModel(cfg['base_channels'], cfg['channel_multipliers'])
    return fill_state_dict(model, {'autoencoder_scale': cfg['autoencoder_scale']}).eval()


def test_state_dict_keys_and_shapes_match_the_original(golden):
    model = golden_model(golden)
    ours = [[k, list(v.shape)] for k, v in model.state_dict().items()]
    assert sorted(ours) == sorted(golden['state_dict_keys'])


def test_forward_matches_golden(golden):
    model = golden_model(golden)
    with torch.no_grad():
        v = model(golden['x'], golden['t'], golden['clip_embed'])
    torch.testing.assert_close(v, golden['v'], rtol=1e-4, atol=1e-4)


def test_released_format_round_trips_strictly(golden, tmp_path):
    """A bare state dict, as released, loads strictly into a fresh model."""
    model = golden_model(golden)
    torch.save(model.state_dict(), tmp_path / 'model.pth')
    state = torch.load(tmp_path / 'model.pth', weights_only=True)
    base, mults = infer_widths(state)
    fresh = DiffusionModel(base, mults)
    fresh.load_state_dict(state, strict=True)
    assert fresh.autoencoder_scale.item() == golden['config']['autoencoder_scale']
    with torch.no_grad():
        torch.testing.assert_close(fresh(golden['x'], golden['t'], golden['clip_embed']),
                                   golden['v'], rtol=1e-4, atol=1e-4)


def test_a_missing_key_is_refused(golden):
    state = golden_model(golden).state_dict()
    del state['net.4.main.2.qkv_proj.weight']
    with pytest.raises(RuntimeError, match='qkv_proj'):
        DiffusionModel(64, [1, 1, 2, 2]).load_state_dict(state, strict=True)


@pytest.mark.parametrize('base, mults, expected', [
    (192, [4, 4, 8, 8], 1_174_321_228),  # yfcc_cfg
    (128, [4, 4, 8, 8], 557_350_988),    # danbooru_cfg
])
def test_release_param_counts(base, mults, expected):
    with torch.device('meta'):
        model = DiffusionModel(base, mults)
    assert count_params(model) == expected


@pytest.mark.parametrize('base, mults', [(192, [4, 4, 8, 8]), (128, [4, 4, 8, 8]),
                                         (64, [1, 2, 3, 4])])
def test_infer_widths_recovers_the_architecture(base, mults):
    with torch.device('meta'):
        state = DiffusionModel(base, mults).state_dict()
    inferred_base, inferred_mults = infer_widths(state)
    assert [inferred_base * m for m in inferred_mults] == [base * m for m in mults]


def test_zero_embedding_is_the_unconditional_input():
    """SPEC 1: normalize keeps a zero embedding at zero (no NaN), so the mapping network
    sees exact zeros in its place: the same output as the forward pass written out with
    zeros. Any nonzero embedding, however small, is scaled to norm sqrt(512) and changes
    the output."""
    torch.manual_seed(0)
    model = DiffusionModel(64, [1, 1, 1, 1]).eval()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([0.5, 0.2])
    seen = []
    hook = model.mapping.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    with torch.no_grad():
        v = model(x, t, torch.zeros(2, 512))
        hook.remove()
        assert torch.isfinite(v).all()
        assert seen[0].shape == (2, 512 + 128)
        assert torch.equal(seen[0][:, :512], torch.zeros(2, 512))

        def fourier(embed, t):
            f = 2 * math.pi * t[:, None] @ embed.weight.T
            return torch.cat([f.cos(), f.sin()], dim=1)
        mapping_in = torch.cat([torch.zeros(2, 512), fourier(model.mapping_timestep_embed, t)], 1)
        cond = model.mapping(mapping_in)
        planes = fourier(model.timestep_embed, t)[:, :, None, None].expand(2, 16, 8, 8)
        torch.testing.assert_close(v, model.net(torch.cat([x, planes], 1), cond))

        embed = torch.randn(2, 512)
        v_small = model(x, t, 1e-6 * embed)
        torch.testing.assert_close(v_small, model(x, t, embed))
        assert (v_small - v).abs().amax() > 1e-2, (v_small - v).abs().amax()


def test_weights_are_initialised_scaled_by_sqrt_half():
    """PyTorch draws conv weights from U(-b, b), b = 1/sqrt(fan_in); ours are scaled."""
    torch.manual_seed(0)
    weight = DiffusionModel(64, [1, 1, 1, 1]).net[0].main[0].weight  # 64 x 20 x 3 x 3
    bound = 0.5 ** 0.5 / (20 * 3 * 3) ** 0.5
    assert weight.abs().max() <= bound * (1 + 1e-6)
    assert weight.abs().max() > bound * 0.99

"""The KL autoencoder matches CompVis numerically and loads only checkpoints that fit."""

import argparse
import math
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ccld.models.autoencoder import (build_autoencoder, load_autoencoder, read_config,
                                     save_autoencoder)
from ccld.errors import UserError
from ldm.models.autoencoder import AutoencoderKL

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "autoencoder_golden.pt"
KL_F8 = ROOT / "latent-diffusion" / "configs" / "autoencoder" / "autoencoder_kl_32x32x4.yaml"
TINY = ROOT / "configs" / "tiny_autoencoder.yaml"


def fill(name, shape):
    """SPEC 0: a tensor determined by its state-dict key alone."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    if len(shape) >= 2:
        return torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))
    return 0.1 * torch.randn(shape, generator=g)


@pytest.fixture(scope="module")
def golden():
    return torch.load(FIXTURE, weights_only=True)


@pytest.fixture(scope="module")
def golden_state(golden):
    model = AutoencoderKL(**golden["config"]["model"]["params"])
    return {k: fill(k, v.shape) for k, v in model.state_dict().items()}


def loss_keys():
    """What CompVis checkpoints carry besides the autoencoder."""
    return {"loss.logvar": torch.zeros(()),
            "loss.discriminator.main.0.weight": torch.ones(64, 3, 4, 4)}


def write_compvis(tmp_path, golden, state, name="ae"):
    base = tmp_path / name
    save_autoencoder(AutoencoderKL(**golden["config"]["model"]["params"]), golden["config"], base)
    torch.save({"state_dict": {**state, **loss_keys()}, "global_step": 0},
               base.with_suffix(".ckpt"))
    return base


def test_state_dict_layout_matches_compvis(golden, golden_state):
    assert [[k, list(v.shape)] for k, v in golden_state.items()] == golden["state_dict_keys"]


def test_golden_through_compvis_checkpoint(tmp_path, golden, golden_state):
    model = load_autoencoder(write_compvis(tmp_path, golden, golden_state))
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    # The fixture's images are already in [-1, 1] and are fed as given.
    images = golden["images"]
    assert images.min() >= -1 and images.max() <= 1 and images.min() < -0.9
    with torch.no_grad():
        posterior = model.encode(images)
        decoded = model.decode(posterior.mean)
    torch.testing.assert_close(posterior.mean, golden["mean"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(posterior.logvar, golden["logvar"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(decoded, golden["decoded_mean"], rtol=1e-4, atol=1e-5)


def test_posterior_sampling_is_reproducible(golden, golden_state):
    model = AutoencoderKL(**golden["config"]["model"]["params"])
    model.load_state_dict(golden_state)
    with torch.no_grad():
        posterior = model.encode(golden["images"])
        a = posterior.sample(torch.Generator().manual_seed(0))
        b = posterior.sample(torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b)
    assert a.shape == golden["mean"].shape and not torch.equal(a, posterior.mode())
    torch.testing.assert_close(posterior.std, torch.exp(golden["logvar"] / 2))


@pytest.mark.parametrize("break_it, named", [
    (lambda s: s.pop("decoder.conv_out.bias"), "decoder.conv_out.bias"),
    (lambda s: s.update({"quant_conv.weight": torch.zeros(6, 8, 1, 1)}), "quant_conv.weight"),
    (lambda s: s.update({"encoder.extra.weight": torch.zeros(1)}), "encoder.extra.weight"),
])
def test_checkpoint_that_does_not_fit_is_refused(tmp_path, golden, golden_state, break_it, named):
    state = dict(golden_state)
    break_it(state)
    base = write_compvis(tmp_path, golden, state)
    with pytest.raises(UserError, match=named.replace(".", r"\.")) as err:
        load_autoencoder(base)
    assert "\n" not in str(err.value)


def test_bare_state_dict_and_safetensors_load(tmp_path, golden, golden_state):
    base = write_compvis(tmp_path, golden, golden_state)
    bare = tmp_path / "bare.pt"
    torch.save(golden_state, bare)
    save_file(golden_state, tmp_path / "ae.safetensors")
    base.with_suffix(".ckpt").unlink()  # NAME.safetensors is used when NAME.ckpt is absent
    for model in (load_autoencoder(config=base.with_suffix(".yaml"), checkpoint=bare),
                  load_autoencoder(base)):
        torch.testing.assert_close(model.state_dict(), golden_state)


def test_lightning_checkpoint_with_pickled_objects_loads(tmp_path, golden, golden_state):
    base = write_compvis(tmp_path, golden, golden_state)
    # Old Lightning pickled objects such as an argparse.Namespace of hparams.
    torch.save({"state_dict": golden_state, "hparams": argparse.Namespace(lr=4.5e-6)},
               base.with_suffix(".ckpt"))
    torch.testing.assert_close(load_autoencoder(base).state_dict(), golden_state)


def test_loss_is_never_built(tmp_path, golden, golden_state, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("the autoencoder must not download LPIPS/VGG weights")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    model = load_autoencoder(write_compvis(tmp_path, golden, golden_state))
    assert not hasattr(model, "loss")
    assert model.lossconfig["target"] == "ldm.modules.losses.LPIPSWithDiscriminator"
    prefixes = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
    assert all(k.startswith(prefixes) for k in model.state_dict())


def test_missing_or_wrong_files_are_user_errors(tmp_path, golden, golden_state):
    with pytest.raises(UserError, match="nope.yaml"):
        load_autoencoder(tmp_path / "nope")
    base = write_compvis(tmp_path, golden, golden_state)
    base.with_suffix(".ckpt").unlink()
    with pytest.raises(UserError, match=r"ae\.ckpt"):
        load_autoencoder(base)
    no_ddconfig = tmp_path / "no_dd.yaml"
    no_ddconfig.write_text("model:\n  params:\n    embed_dim: 4\n")
    with pytest.raises(UserError, match="ddconfig"):
        read_config(no_ddconfig)
    vq = tmp_path / "vq.yaml"
    vq.write_text(KL_F8.read_text().replace("AutoencoderKL", "VQModel"))
    with pytest.raises(UserError, match="VQModel"):
        read_config(vq)
    with pytest.raises(UserError):
        load_autoencoder()


def compvis_kl_param_count(ch, ch_mult, num_res_blocks, attn_resolutions, resolution,
                           z_channels, embed_dim, in_channels=3, out_ch=3):
    """Parameter count of the CompVis KL autoencoder worked out from its layer list."""
    def conv(ci, co, k):
        return ci * co * k * k + co

    def norm(c):
        return 2 * c

    def resblock(ci, co):
        shortcut = conv(ci, co, 1) if ci != co else 0
        return norm(ci) + conv(ci, co, 3) + norm(co) + conv(co, co, 3) + shortcut

    def attn(c):
        return norm(c) + 4 * conv(c, c, 1)

    def mid(c):
        return 2 * resblock(c, c) + attn(c)

    n, c, res = conv(in_channels, ch, 3), ch, resolution
    for level, mult in enumerate(ch_mult):
        for _ in range(num_res_blocks):
            n, c = n + resblock(c, ch * mult), ch * mult
            n += attn(c) if res in attn_resolutions else 0
        if level != len(ch_mult) - 1:
            n, res = n + conv(c, c, 3), res // 2
    n += mid(c) + norm(c) + conv(c, 2 * z_channels, 3)
    n += conv(z_channels, c, 3) + mid(c)
    for level in reversed(range(len(ch_mult))):
        for _ in range(num_res_blocks + 1):
            n, c = n + resblock(c, ch * ch_mult[level]), ch * ch_mult[level]
            n += attn(c) if res in attn_resolutions else 0
        if level != 0:
            n, res = n + conv(c, c, 3), res * 2
    n += norm(c) + conv(c, out_ch, 3)
    return n + conv(2 * z_channels, 2 * embed_dim, 1) + conv(embed_dim, z_channels, 1)


def test_shipped_kl_f8_config_builds_compvis_architecture():
    config = read_config(KL_F8)
    params = config["model"]["params"]
    with torch.device("meta"):
        model = build_autoencoder(config)
        posterior = model.encode(torch.empty(2, 3, 256, 256))
        decoded = model.decode(posterior.mean)
    dd = params["ddconfig"]
    expected = compvis_kl_param_count(dd["ch"], dd["ch_mult"], dd["num_res_blocks"],
                                      dd["attn_resolutions"], dd["resolution"],
                                      dd["z_channels"], params["embed_dim"])
    # 83,653,863 is also the published size of the kl-f8 (Stable Diffusion v1) VAE.
    assert expected == 83_653_863
    assert sum(p.numel() for p in model.parameters()) == expected
    assert posterior.mean.shape == (2, 4, 32, 32)
    assert decoded.shape == (2, 3, 256, 256)


@pytest.mark.parametrize("name, latent", [
    ("autoencoder_kl_64x64x3", (3, 64, 64)),
    ("autoencoder_kl_16x16x16", (16, 16, 16)),
    ("autoencoder_kl_8x8x64", (64, 8, 8)),
])
def test_other_shipped_kl_configs_match_their_names(name, latent):
    config = read_config(KL_F8.with_name(f"{name}.yaml"))
    dd = config["model"]["params"]["ddconfig"]
    with torch.device("meta"):
        model = build_autoencoder(config)
        mean = model.encode(torch.empty(1, 3, 256, 256)).mean
    assert mean.shape[1:] == latent
    assert sum(p.numel() for p in model.parameters()) == compvis_kl_param_count(
        dd["ch"], dd["ch_mult"], dd["num_res_blocks"], dd["attn_resolutions"],
        dd["resolution"], dd["z_channels"], config["model"]["params"]["embed_dim"])


def test_tiny_config_round_trips_through_the_real_format(tmp_path):
    config = read_config(TINY)
    torch.manual_seed(0)
    save_autoencoder(build_autoencoder(config), config, tmp_path / "tiny")
    model = load_autoencoder(tmp_path / "tiny")
    with torch.no_grad():
        posterior = model.encode(torch.rand(1, 3, 64, 64) * 2 - 1)
        decoded = model.decode(posterior.sample())
    assert posterior.mean.shape == (1, 4, 8, 8)
    assert decoded.shape == (1, 3, 64, 64)


def test_the_encoder_digest_follows_the_encoder_alone():
    from ccld.models.autoencoder import encoder_digest
    config = read_config(TINY)
    torch.manual_seed(0)
    state = build_autoencoder(config).state_dict()
    digest = encoder_digest(state)
    decoder_changed = {k: v + 1 if k.startswith(("decoder.", "post_quant_conv.")) else v
                       for k, v in state.items()}
    assert encoder_digest(decoder_changed) == digest
    for key in ("encoder.conv_in.bias", "quant_conv.weight"):
        tensor = state[key].clone()
        tensor.view(-1)[0] += 1
        assert encoder_digest(dict(state, **{key: tensor})) != digest, key
    # The same values stored at a precision that holds them exactly: the same digest.
    halved = {k: v.half() for k, v in state.items()}
    assert encoder_digest(halved) == encoder_digest({k: v.float() for k, v in halved.items()})


def test_a_configs_claim_of_an_earlier_encoder_counts_only_for_that_encoder(tmp_path):
    from omegaconf import OmegaConf

    from ccld.models.autoencoder import describe, same_encoder
    config = read_config(TINY)
    torch.manual_seed(0)
    save_autoencoder(build_autoencoder(config), config, tmp_path / "base")
    base = describe(tmp_path / "base")
    old_record = {"name": "base", "sha256": base["sha256"]}  # before encoder digests
    for name, encoder in (("honest", base["encoder_sha256"]), ("wrong", "0" * 64)):
        claim = dict(config, ccld={"encoder_sha256": encoder, "same_encoder_as": [base["sha256"]]})
        torch.manual_seed(0)
        model = build_autoencoder(config)
        with torch.no_grad():
            model.decoder.conv_out.bias.add_(1)  # a decoder-only change
        save_autoencoder(model, OmegaConf.to_container(OmegaConf.create(claim)), tmp_path / name)
    honest, wrong = describe(tmp_path / "honest"), describe(tmp_path / "wrong")
    assert honest["sha256"] != base["sha256"]
    assert honest["encoder_sha256"] == wrong["encoder_sha256"] == base["encoder_sha256"]
    assert same_encoder(old_record, honest) and not same_encoder(old_record, wrong)
    assert same_encoder(dict(old_record, encoder_sha256=base["encoder_sha256"]), wrong)
    assert not same_encoder({"sha256": "1" * 64, "encoder_sha256": "2" * 64}, honest)

"""sample.py and ccld.generate on tiny random models written through the real formats."""

import copy
import hashlib
import json
import re
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import sample
import tiny
from ccld import cli
from ccld.sample import generate, prompts, run as sample_run
from ccld.models.autoencoder import load_autoencoder
from ccld.models.cloob import load_cloob
from ccld.errors import UserError
from ccld.diffusion.schedule import sampling_timesteps, t_to_alpha_sigma

ROOT = Path(__file__).resolve().parent.parent
SCALE = 1.5  # the autoencoder scale stored in the test checkpoints


@pytest.fixture(scope='module')
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp('sample')
    ema = tiny.tiny_diffusion(seed=0, autoencoder_scale=SCALE)
    trained = tiny.tiny_diffusion(seed=1, autoencoder_scale=SCALE)
    wrong = ema.state_dict()
    wrong['net.1.main.0.weight'] = wrong['net.1.main.0.weight'][:, :32]
    torch.save(wrong, d / 'wrong_shape.pth')
    (d / 'notes.txt').write_text('not an image')
    return SimpleNamespace(
        dir=d, ema=ema,
        autoencoder=tiny.tiny_autoencoder(d),
        cloob=tiny.tiny_cloob(d),
        bare=tiny.save_bare(ema, d / 'bare.pth'),
        ccld=tiny.save_ccld_checkpoint(d / 'run.ckpt', trained, ema),
        original=tiny.save_original_checkpoint(d / 'original.ckpt', trained, ema, 2.5),
        images=tiny.make_images(d / 'images', n=2, size=80),
    )


@pytest.fixture(scope='module')
def models(assets):
    return SimpleNamespace(autoencoder=load_autoencoder(assets.autoencoder),
                           cloob=load_cloob(str(assets.cloob)))


def base_args(assets, *extra):
    return ['--checkpoint', str(assets.bare), '--autoencoder', assets.autoencoder,
            '--cloob-checkpoint', str(assets.cloob), '--size', '64', '--steps', '2', '-n', '1',
            *extra]


def run_sample(argv):
    return tiny.exit_code(sample.main, 'sample.py', argv)


def pixels(path):
    return np.asarray(Image.open(path))


def decode_by_hand(autoencoder, z, scale):
    """SPEC 4: decoder(post_quant_conv(z * scale)), from [-1, 1] to 8-bit pixels [n, H, W, 3]."""
    with torch.no_grad():
        images = autoencoder.decoder(autoencoder.post_quant_conv(z * scale))
    images = ((images + 1) / 2).clamp(0, 1).mul(255).round().byte()
    return images.permute(0, 2, 3, 1).numpy()


def assert_pixels_close(a, b):
    """8-bit images equal up to one level of rounding."""
    assert a.shape == b.shape
    diff = np.abs(a.astype(int) - b.astype(int))
    worst = int(diff.max())
    assert worst <= 1, f'{(diff > 1).mean():.1%} of the pixels differ, by up to {worst}'


class SampleSpy:
    """Wraps generate.sample_latents: remembers the noise each batch starts from and the
    latents it ends with."""

    def __init__(self, monkeypatch):
        self.starts, self.ends, self.settings = [], [], []
        self.sample_latents = generate.sample_latents
        monkeypatch.setattr(generate, 'sample_latents', self)

    def __call__(self, model_fn, x, ts, method, eta, progress, callback=None):
        out = self.sample_latents(model_fn, x, ts, method, eta, progress, callback)
        self.starts.append(x.clone())
        self.ends.append(out.clone())
        self.settings.append((ts.tolist(), method, eta))
        return out

    def take(self):
        starts, ends = torch.cat(self.starts), torch.cat(self.ends)
        self.starts, self.ends = [], []
        return starts, ends


def seeded_noise(seed, n, side=8):
    """The original's noise: torch.manual_seed(seed), then one draw for all n latents."""
    torch.manual_seed(seed)
    return torch.randn([n, 4, side, side])


# SPEC 3: CLOOB's published normalisation, written out here.
CLOOB_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]
CLOOB_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]


class Recorder:
    """A v model that predicts 0 and remembers every (x, t) it is called with."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t):
        self.calls.append((x.clone(), t.clone()))
        return torch.zeros_like(x)


@pytest.mark.parametrize('prompt, expected', [
    ('a red fox', ('a red fox', 3.0)),
    ('a red fox:1.5', ('a red fox', 1.5)),
    ('fox:-2', ('fox', -2.0)),
    ('ratio 2:1 crop:0.5', ('ratio 2:1 crop', 0.5)),
    ('a caption: with a colon', ('a caption: with a colon', 3.0)),
    ('https://example.com/fox.png', ('https://example.com/fox.png', 3.0)),
    ('https://example.com:8080/fox.png:2', ('https://example.com:8080/fox.png', 2.0)),
    ('https://example.com:8080/fox.png', ('https://example.com:8080/fox.png', 3.0)),
    ('meet at 10:30 am', ('meet at 10:30 am', 3.0)),
])
def test_parse_prompt(prompt, expected):
    assert prompts.parse_prompt(prompt, 3.0) == expected


@pytest.mark.parametrize('prompt, message', [
    ('cat:inf', "the weight inf is not a finite number"),
    ('cat:-inf', "the weight -inf is not a finite number"),
    ('cat:nan', "the weight nan is not a finite number"),
    ('cat:1,5', "the weight '1,5' is not a number"),
    ('cat:1.5.2', "the weight '1.5.2' is not a number"),
    (':2', 'has no text'),
    ('  ', 'has no text'),
])
def test_parse_prompt_refuses_what_it_would_have_to_guess(prompt, message):
    with pytest.raises(UserError, match=re.escape(message)):
        prompts.parse_prompt(prompt, 3.0)


@pytest.mark.parametrize('text, expected', [
    ('A Lighthouse at Dusk!', 'a-lighthouse-at-dusk'),
    ('café au lait, très chaud', 'cafe-au-lait-tres-chaud'),
    ('a very long prompt about a lighthouse standing alone at dusk',
     'a-very-long-prompt-about-a-lighthouse'),  # whole words, at most 40 characters
    ('x' * 50, 'x' * 40),
    ('灯台', 'prompt'),
])
def test_slug(text, expected):
    assert prompts.slug(text) == expected


def test_embed_prompts_keeps_order_and_weights(models):
    """Texts, then image prompts; an image prompt is resized (shorter side, Lanczos) and
    center-cropped to CLOOB's size as training images are, then CLOOB-normalised."""
    pixels = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)  # 50 x 40: resized to 40 x 32, then 4 columns cropped
    embeds, weights = generate.embed_prompts(models.cloob, [('a fox', 2.0), ('a hen', -1.0)],
                                             [(image, 0.5)])
    assert embeds.shape == (3, 512) and weights == [2.0, -1.0, 0.5]
    clip = models.cloob.model
    assert clip.config['image_encoder']['image_size'] == 32
    crop = np.asarray(image.resize((40, 32), Image.LANCZOS).crop((4, 0, 36, 32)))
    crop = torch.from_numpy(crop / np.float32(255)).permute(2, 0, 1)
    with torch.no_grad():
        texts = clip.text_encoder(clip.tokenize(['a fox', 'a hen']))
        images = clip.image_encoder(((crop - CLOOB_MEAN) / CLOOB_STD)[None])
    torch.testing.assert_close(embeds[:2], texts)
    torch.testing.assert_close(embeds[2:], images)


def test_guided_model_fn_mixes_weighted_predictions(assets):
    model = assets.ema
    embeds = torch.nn.functional.normalize(torch.randn(2, 512), dim=-1)
    x, t = torch.randn(2, 4, 8, 8), torch.full([2], 0.5)
    with torch.no_grad():
        guided = generate.guided_model_fn(model, embeds, [2.0, 0.5])(x, t)
        v = [model(x, t, e.expand(2, 512)) for e in [torch.zeros(512), *embeds]]
        torch.testing.assert_close(guided, -1.5 * v[0] + 2.0 * v[1] + 0.5 * v[2])
        torch.testing.assert_close(generate.guided_model_fn(model, None, [])(x, t), v[0])


@pytest.mark.parametrize('method', generate.METHODS)
def test_every_method_samples_reproducibly(assets, models, method):
    """The seed alone fixes the images (the stochastic samplers draw from the seeded
    stream too), another seed gives others, and the samples of a batch differ."""
    embeds = models.cloob.embed_texts(['a fox'])
    model_fn = generate.guided_model_fn(assets.ema, embeds, [3.0])
    run = lambda seed: torch.cat(list(generate.generate(  # noqa: E731
        model_fn, models.autoencoder, SCALE, 2, 64, method=method, steps=2, eta=0.5,
        seed=seed, progress=False)))
    images = run(3)
    assert images.shape == (2, 3, 64, 64)
    torch.testing.assert_close(run(3), images, rtol=0, atol=0)
    other_seed = (run(4) - images).abs().amax().item()
    assert other_seed > 0.01, f'seeds 3 and 4 give images that differ by {other_seed}'
    in_batch = (images[0] - images[1]).abs().amax().item()
    assert in_batch > 0.01, f'the two samples of a batch differ by {in_batch}'


def test_noise_is_the_originals_whatever_the_batch_size(models):
    recorder = Recorder()
    list(generate.generate(recorder, models.autoencoder, SCALE, 3, 64, method='ddim', steps=4,
                           seed=5, batch_size=2, progress=False))
    torch.manual_seed(5)
    noise = torch.randn([3, 4, 8, 8])
    assert len(recorder.calls) == 2 * 4  # two batches of four steps
    first_calls = torch.cat([recorder.calls[0][0], recorder.calls[4][0]])
    torch.testing.assert_close(first_calls, noise, rtol=0, atol=0)


def test_init_starts_from_the_noised_image(models):
    """x = alpha x0 + sigma noise at the first timestep <= strength, where x0 is the init
    image's latent: encoder(init * 2 - 1) / scale (SPEC 2). The autoencoder's posterior
    is made sharp (log-variance -30), so its sample is its mean."""
    autoencoder = copy.deepcopy(models.autoencoder)
    with torch.no_grad():
        autoencoder.quant_conv.weight[4:] = 0
        autoencoder.quant_conv.bias[4:] = -30
    init, strength, steps, seed = torch.rand(3, 64, 64), 0.5, 10, 7
    recorder = Recorder()
    list(generate.generate(recorder, autoencoder, SCALE, 2, 64, method='ddim',
                           steps=steps, seed=seed, init=init, strength=strength,
                           progress=False))
    ts = sampling_timesteps(steps)
    ts = ts[ts <= strength]
    noise = seeded_noise(seed, 2)
    with torch.no_grad():
        x0 = autoencoder.quant_conv(autoencoder.encoder(init[None] * 2 - 1))[:, :4] / SCALE
    alpha, sigma = t_to_alpha_sigma(ts[0])
    torch.testing.assert_close(recorder.calls[0][0], x0 * alpha + noise * sigma)
    assert [t[0].item() for _, t in recorder.calls] == ts.tolist()


@pytest.mark.parametrize('settings, message', [
    ({'strength': 0.01, 'init': torch.rand(3, 64, 64), 'steps': 2}, 'below every timestep'),
    ({'strength': 1.5}, 'outside (0, 1]'),
    ({'method': 'ddim', 'eta': 2.0}, 'outside [0, 1]'),
    ({'method': 'euler'}, 'unknown sampling method'),
    ({'schedule': 'cosine'}, 'unknown schedule'),
])
def test_generate_refuses_bad_settings(models, settings, message):
    with pytest.raises(UserError, match=message.replace('(', r'\(').replace('[', r'\[')):
        list(generate.generate(Recorder(), models.autoencoder, SCALE, 1, 64, progress=False,
                               **settings))


def test_the_schedule_sets_the_timesteps(models):
    recorder = Recorder()
    list(generate.generate(recorder, models.autoencoder, SCALE, 1, 64, method='ddim', steps=4,
                           schedule='karras', progress=False))
    expected = sampling_timesteps(4, schedule='karras')
    assert [t[0].item() for _, t in recorder.calls] == expected.tolist()


def test_latent_shape_needs_a_multiple_of_64(models):
    assert generate.latent_shape(models.autoencoder, 128) == (4, 16, 16)
    assert generate.latent_shape(models.autoencoder, (384, 256)) == (4, 32, 48)  # [C, H, W]
    with pytest.raises(UserError, match='not a multiple of 64.*use e.g. 128'):
        generate.latent_shape(models.autoencoder, 120)
    with pytest.raises(UserError, match='size 380x256 is not a multiple of 64.*use e.g. 384x256'):
        generate.latent_shape(models.autoencoder, (380, 256))


@pytest.mark.parametrize('kind, scale', [('bare', SCALE), ('ccld', SCALE), ('original', 2.5)])
def test_load_model_uses_ema_weights_and_stored_scale(assets, kind, scale):
    model, ckpt = generate.load_model(getattr(assets, kind))
    assert ckpt.kind == kind and ckpt.autoencoder_scale == scale
    assert model.net[0].main[0].out_channels == 64
    for key, value in assets.ema.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_width_flags_override_but_must_fit(assets):
    model, _ = generate.load_model(assets.bare, base_channels=32)  # multipliers follow: 2,2,2,2
    assert model.net[0].main[0].out_channels == 64
    with pytest.raises(UserError, match='do not give'):
        generate.load_model(assets.bare, base_channels=32, channel_multipliers=[4, 4, 8, 8])


def test_cli_writes_images_grid_and_metadata_and_reads_the_scale(assets, models, tmp_path,
                                                                monkeypatch):
    spy = SampleSpy(monkeypatch)
    out = tmp_path / 'out'
    argv = base_args(assets, 'a fox:2', 'a hen', '--images', f'{assets.images[0]}:0.5', '-n', '3',
                     '--batch-size', '2', '--grid-cols', '3', '--output-dir', str(out),
                     '--prefix', 'fox', '--method', 'ddim', '--seed', '4')
    assert run_sample(argv) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ['fox_00000.png', 'fox_00001.png', 'fox_00002.png', 'fox_grid.png']
    assert Image.open(out / 'fox_grid.png').size == (192, 64)  # 3 columns (near-square: 2)
    text = Image.open(out / 'fox_00002.png').text
    assert json.loads(text['prompts']) == [['a fox', 2.0], ['a hen', 3.0]]
    assert json.loads(text['image_prompts']) == [[str(assets.images[0]), 0.5]]
    assert (text['seed'], text['method'], text['steps'], text['schedule'], text['index']) == \
        ('4', 'ddim', '2', 'spliced', '2')
    assert float(text['cond_scale']) == 3.0 and float(text['autoencoder_scale']) == SCALE
    assert 'index' not in Image.open(out / 'fox_grid.png').text
    grid = pixels(out / 'fox_grid.png')
    assert np.array_equal(grid[:, 128:], pixels(out / 'fox_00002.png'))
    # Sampling starts from the --seed noise; the PNGs are the latents decoded at the scale
    # the checkpoint stores.
    noise, ends = spy.take()
    torch.testing.assert_close(noise, seeded_noise(4, 3), rtol=0, atol=0)
    expected = decode_by_hand(models.autoencoder, ends, SCALE)
    for i in range(3):
        assert_pixels_close(pixels(out / f'fox_{i:05}.png'), expected[i])

    # The same run with --autoencoder-scale decodes at that scale, and says so.
    assert run_sample([*argv, '--output-dir', str(tmp_path / 'scaled'),
                       '--autoencoder-scale', '3']) == 0
    scaled = tmp_path / 'scaled' / 'fox_00000.png'
    assert float(Image.open(scaled).text['autoencoder_scale']) == 3.0
    _, ends = spy.take()
    assert_pixels_close(pixels(scaled), decode_by_hand(models.autoencoder, ends, 3.0)[0])
    assert not np.array_equal(pixels(scaled), pixels(out / 'fox_00000.png'))

    # Another --seed, other noise and other images.
    assert run_sample([*argv, '--output-dir', str(tmp_path / 'seed5'), '--seed', '5',
                       '-n', '1']) == 0
    noise, _ = spy.take()
    torch.testing.assert_close(noise, seeded_noise(5, 1), rtol=0, atol=0)
    other = pixels(tmp_path / 'seed5' / 'fox_00000.png').astype(int)
    assert np.abs(other - pixels(out / 'fox_00000.png')).max() > 10


def test_cli_sampler_flags_set_what_the_sampler_runs(assets, tmp_path, monkeypatch):
    """--method, --eta, --steps and --schedule reach the sampler; --init and --strength
    start it from the init image's noised latent, at the timesteps <= --strength."""
    spy = SampleSpy(monkeypatch)
    assert run_sample(base_args(assets, 'a fox', '--method', 'ddim', '--eta', '0.5', '--steps',
                                '3', '--schedule', 'karras', '--output-dir',
                                str(tmp_path / 'karras'))) == 0
    assert spy.settings == [(sampling_timesteps(3, schedule='karras').tolist(), 'ddim', 0.5)]
    for i, image in enumerate(assets.images):
        assert run_sample(base_args(assets, 'a fox', '--init', str(image), '--strength', '0.6',
                                    '--steps', '5', '--output-dir', str(tmp_path / f'{i}'))) == 0
    ts = sampling_timesteps(5)
    assert spy.settings[1:] == [(ts[ts <= 0.6].tolist(), 'plms', 0.0)] * 2
    _, from_first, from_second = spy.starts
    noise = seeded_noise(0, 1)
    assert not torch.allclose(from_first, noise) and not torch.allclose(from_first, from_second)


def test_prompts_without_a_weight_are_guided_at_cond_scale_and_image_prompts_guide(
        assets, tmp_path, monkeypatch):
    """'a hen' with --cond-scale 5 gives the images of 'a hen:5', not those of 'a hen'
    (at the default 3); two --images prompts give two different samples. The runs are
    on --device cpu, the default device here made one that cannot run."""
    monkeypatch.setattr(cli, 'default_device', lambda: torch.device('meta'))

    def sampled(name, *prompts):
        assert run_sample(base_args(assets, *prompts, '--method', 'ddim', '--device', 'cpu',
                                    '--no-grid', '--output-dir', str(tmp_path / name))) == 0
        return pixels(tmp_path / name / 'out_00000.png')
    five = sampled('five', 'a hen', '--cond-scale', '5')
    assert np.array_equal(five, sampled('weighted', 'a hen:5'))
    assert not np.array_equal(five, sampled('three', 'a hen'))
    first, second = (sampled(f'image{i}', '--images', str(p)) for i, p in enumerate(assets.images))
    assert not np.array_equal(first, second)


def test_cli_samples_at_the_image_size_the_checkpoint_records(assets, tmp_path):
    """A ccld checkpoint records the training image size; without --size it is the output's."""
    ckpt = tiny.save_ccld_checkpoint(tmp_path / 'run128.ckpt', assets.ema, assets.ema,
                                     {'image_size': 128})
    argv = base_args(assets, '--checkpoint', str(ckpt), '--method', 'ddim', '--steps', '1',
                     '--output-dir', str(tmp_path / 'out'))
    i = argv.index('--size')
    del argv[i:i + 2]
    assert run_sample(argv) == 0
    with Image.open(tmp_path / 'out' / 'out_00000.png') as image:
        assert image.size == (128, 128) and image.text['size'] == '128'


def test_cli_init_image(assets, tmp_path):
    argv = base_args(assets, 'a fox', '--init', str(assets.images[1]), '--strength', '0.6',
                     '--steps', '5', '--output-dir', str(tmp_path))
    assert run_sample(argv) == 0
    text = Image.open(tmp_path / 'out_00000.png').text
    assert (text['init'], text['strength']) == (str(assets.images[1]), '0.6')


# Sizes that are not square.

@pytest.mark.parametrize('width, height', [(384, 256), (256, 384)])
def test_cli_samples_at_any_size_and_the_pngs_say_which(assets, models, tmp_path, monkeypatch,
                                                       width, height):
    """--size WxH: the noise is the seed's one draw of [n, 4, H/8, W/8] latents, the PNGs
    are those latents decoded, W x H, and record width, height and the size as given."""
    spy = SampleSpy(monkeypatch)
    out = tmp_path / 'out'
    argv = base_args(assets, 'a fox', '--size', f'{width}x{height}', '-n', '2', '--steps', '1',
                     '--method', 'ddim', '--seed', '3', '--output-dir', str(out))
    assert run_sample(argv) == 0
    noise, ends = spy.take()
    torch.manual_seed(3)
    torch.testing.assert_close(noise, torch.randn([2, 4, height // 8, width // 8]), rtol=0,
                               atol=0)
    expected = decode_by_hand(models.autoencoder, ends, SCALE)
    for i in range(2):
        with Image.open(out / f'out_{i:05}.png') as image:
            assert image.size == (width, height)
            assert (image.text['width'], image.text['height'], image.text['size']) == \
                (str(width), str(height), f'{width}x{height}')
        assert_pixels_close(pixels(out / f'out_{i:05}.png'), expected[i])
    with Image.open(out / 'out_grid.png') as grid:  # two side by side
        assert grid.size == (2 * width, height) and grid.text['width'] == str(width)


def test_a_square_wxh_is_the_one_number_to_the_pixel(assets, tmp_path):
    """--size 64x64 and --size 64 (the tiny models' size; the square images themselves are
    pinned by test_cli_writes_images_grid_and_metadata_and_reads_the_scale): the same
    images, and the same record, the size still one number for the readers of old PNGs."""
    for size in ('64', '64x64'):
        argv = base_args(assets, 'a fox', '--size', size, '-n', '2', '--method', 'ddim',
                         '--output-dir', str(tmp_path / size))
        assert run_sample(argv) == 0
    for name in ('out_00000.png', 'out_00001.png', 'out_grid.png'):
        assert np.array_equal(pixels(tmp_path / '64' / name), pixels(tmp_path / '64x64' / name))
        with Image.open(tmp_path / '64' / name) as a, Image.open(tmp_path / '64x64' / name) as b:
            assert a.text == b.text
            assert (a.text['size'], a.text['width'], a.text['height']) == ('64', '64', '64')


def test_an_init_image_of_another_aspect_is_resized_to_cover_and_centre_cropped(
        assets, tmp_path, monkeypatch):
    """A 64 x 128 portrait for a 128 x 64 landscape: scaled by 2 to 128 x 256 (Lanczos),
    the middle 64 rows kept; computed here with Pillow alone."""
    from ccld.models import latents
    rng = np.random.default_rng(0)
    portrait = Image.fromarray(rng.integers(0, 256, (128, 64, 3), dtype=np.uint8))
    portrait.paste((255, 0, 0), (0, 0, 64, 40))  # red top, lost to the crop
    portrait.save(tmp_path / 'portrait.png')
    encoded, encode = [], latents.encode

    def spy(autoencoder, images, scale):
        encoded.append(images.clone())
        return encode(autoencoder, images, scale)
    monkeypatch.setattr(latents, 'encode', spy)
    argv = base_args(assets, 'a fox', '--init', str(tmp_path / 'portrait.png'), '--size',
                     '128x64', '--strength', '0.6', '--steps', '5', '--output-dir',
                     str(tmp_path / 'out'))
    assert run_sample(argv) == 0
    expected = portrait.resize((128, 256), Image.LANCZOS).crop((0, 96, 128, 160))
    [init] = encoded
    assert init.shape == (1, 3, 64, 128)
    got = init[0].mul(255).round().byte().permute(1, 2, 0).numpy()
    assert np.array_equal(got, np.asarray(expected))
    assert Image.open(tmp_path / 'out' / 'out_00000.png').size == (128, 64)


@pytest.mark.parametrize('extra, message', [
    (['--checkpoint', 'missing.pth'], 'checkpoint missing.pth does not exist'),
    (['--checkpoint', '{dir}/wrong_shape.pth'], "shapes match no DiffusionModel width"),
    (['--base-channels', '32', '--channel-multipliers', '4,4,8,8'], 'do not give'),
    (['--base-channels', '48'], 'base channels 48 and multipliers 1,1,1,1 do not give'),
    (['--images', 'missing.png'], 'cannot read image prompt missing.png'),
    (['--images', '{dir}/notes.txt:2'], 'cannot read image prompt {dir}/notes.txt'),
    (['--init', 'missing.png'], 'cannot read init image missing.png'),
    (['--strength', '0.5'], '--strength needs --init'),
    (['--init', '{image}', '--strength', '2'], 'strength 2.0 is outside'),
    (['--method', 'ddim', '--eta', '1.5'], 'eta 1.5 is outside'),
    (['--size', '100'], 'argument --size: 100: each side must be a multiple of 64 for the '
     'autoencoder and the U-Net; nearest valid sizes: 128, 64'),
    (['--size', '300x200'], 'argument --size: 300x200: each side must be a multiple of 64 '
     'for the autoencoder and the U-Net; nearest valid sizes: 320x192, 256x192, 320x256, '
     '256x256'),
    (['--size', '384x40'], 'nearest valid sizes: 384x64'),
    (['--size', '384x'], "argument --size: expected WIDTHxHEIGHT like 384x256, or one number "
     "for a square, got '384x'"),
    (['--size', '0'], "expected WIDTHxHEIGHT like 384x256"),
    (['--autoencoder', 'missing_ae'], 'missing_ae.yaml not found'),
    (['--cloob-checkpoint', 'missing.pkl'], 'CLOOB checkpoint missing.pkl not found'),
    (['-n', '0'], 'argument -n: must be at least 1, got 0'),
    (['--steps', '0'], 'argument --steps: must be at least 1, got 0'),
    (['--batch-size', 'two'], "argument --batch-size: expected a whole number, got 'two'"),
    (['--device', 'tpu'], "argument --device: expected cpu, cuda, cuda:N or mps"),
    (['--schedule', 'cosine'], "argument --schedule: invalid choice: 'cosine'"),
    (['--seed', str(2 ** 64)], 'argument --seed: must be between'),
])
def test_cli_user_errors(assets, capsys, extra, message, tmp_path):
    fill = lambda s: s.format(dir=assets.dir, image=assets.images[0])  # noqa: E731
    argv = base_args(assets, 'a fox', '--output-dir', str(tmp_path), *map(fill, extra))
    assert run_sample(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('sample.py: error: ') and fill(message) in err[0]
    assert not list(tmp_path.iterdir())


def test_a_folder_given_for_a_file_is_named_a_folder(assets, tmp_path, capsys):
    """A run's folder where its checkpoint goes is pointed to the newest checkpoint in it."""
    run = tmp_path / 'run'
    (run / 'checkpoints').mkdir(parents=True)
    (run / 'checkpoints' / 'last.ckpt').write_bytes(assets.ccld.read_bytes())
    for extra, message in (
            (['--checkpoint', str(run)], f'checkpoint {run} is a directory, not a file; pass '
             f'{run / "checkpoints" / "last.ckpt"}, the newest checkpoint of the run there.'),
            (['--checkpoint', str(assets.dir)], f'checkpoint {assets.dir} is a directory, not '
             'a file.'),
            (['--lora', str(tmp_path)], f'--lora: {tmp_path} is a directory, not a file.'),
            (['--cloob-checkpoint', str(tmp_path)], f'CLOOB checkpoint {tmp_path} is a '
             'directory;')):
        assert run_sample(base_args(assets, 'a fox', '--output-dir', str(tmp_path / 'out'),
                                    *extra)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith('sample.py: error: ') and message in err[0], err


def test_no_prompt_at_all_samples_the_model_unguided_and_says_so(assets, tmp_path, capsys):
    """As the original did, but not silently: one warning line before any model loads."""
    argv = base_args(assets, '--output-dir', str(tmp_path), '--no-grid')
    with pytest.warns(UserWarning, match=r'^no prompt given: sampling the model unguided '
                      r'\(unconditional images\); pass a text prompt or --images to guide it'):
        assert run_sample(argv) == 0
    with Image.open(tmp_path / 'out_00000.png') as image:
        assert (image.text['prompts'], image.text['image_prompts']) == ('[]', '[]')


def test_a_truncated_autoencoder_is_one_short_line_naming_it(assets, tmp_path, capsys):
    weights = Path(f'{assets.autoencoder}.ckpt').read_bytes()
    (tmp_path / 'cut.ckpt').write_bytes(weights[:len(weights) // 2])
    (tmp_path / 'cut.yaml').write_text(Path(f'{assets.autoencoder}.yaml').read_text())
    argv = base_args(assets, 'a fox', '--autoencoder', str(tmp_path / 'cut'), '--output-dir',
                     str(tmp_path / 'out'))
    assert run_sample(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and len(err[0]) < 300, err
    assert err[0].startswith(f'sample.py: error: cannot read autoencoder checkpoint '
                             f'{tmp_path / "cut.ckpt"} (') and 'truncated, corrupt' in err[0]


def run_process(args, cwd):
    return subprocess.run([sys.executable, str(ROOT / 'sample.py'), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_cli_from_any_directory_same_images_from_bare_and_training_checkpoint(assets, tmp_path):
    """Separate processes: the seed alone fixes the images, and a training checkpoint
    samples with its EMA weights and stored scale (those the bare state dict holds)."""
    long_prompt = ' '.join(['fox'] * 100)
    args = base_args(assets, 'a fox', f'{long_prompt}:1', '--images', str(assets.images[0]),
                     '-n', '2', '--method', 'plms')
    bare = run_process([*args, '--output-dir', 'bare'], tmp_path)
    assert bare.returncode == 0, bare.stderr
    assert 'sample.py: warning: prompt truncated' in bare.stderr
    ccld = run_process([*args, '--checkpoint', str(assets.ccld), '--output-dir', 'ccld'], tmp_path)
    assert ccld.returncode == 0, ccld.stderr
    for name in ('out_00000.png', 'out_00001.png', 'out_grid.png'):
        assert np.array_equal(pixels(tmp_path / 'ccld' / name), pixels(tmp_path / 'bare' / name))


def test_cli_error_is_one_line_without_traceback(assets, tmp_path):
    run = run_process(base_args(assets, 'a fox', '--checkpoint', 'missing.pth'), tmp_path)
    assert run.returncode == 2
    assert run.stderr.strip() == 'sample.py: error: checkpoint missing.pth does not exist.'


PROMPTS_FILE = """# lighthouses, and more
A Lighthouse at Dusk!

storm clouds:1.5
café au lait, très chaud
"""
# (line, text, weight, slug) of each prompt in PROMPTS_FILE
PROMPT_LINES = [(2, 'A Lighthouse at Dusk!', 3.0, 'a-lighthouse-at-dusk'),
                (4, 'storm clouds', 1.5, 'storm-clouds'),
                (5, 'café au lait, très chaud', 3.0, 'cafe-au-lait-tres-chaud')]


class CallCounter:
    """Wraps a function and counts its calls."""

    def __init__(self, monkeypatch, target, name):
        self.function, self.calls = getattr(target, name), 0
        monkeypatch.setattr(target, name, self)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.function(*args, **kwargs)


def refuse_models(monkeypatch):
    """Makes loading a diffusion model fail the test: errors must come before it."""
    def load_model(*args, **kwargs):
        raise AssertionError('a model was loaded before the error')
    monkeypatch.setattr(generate, 'load_model', load_model)


def test_prompts_file_samples_each_line_with_one_load_of_the_models(assets, tmp_path,
                                                                    monkeypatch, capsys):
    loads = [CallCounter(monkeypatch, generate, 'load_model'),
             CallCounter(monkeypatch, sample_run, 'load_autoencoder'),
             CallCounter(monkeypatch, sample_run, 'load_cloob')]
    spy = SampleSpy(monkeypatch)
    prompts_file = tmp_path / 'prompts.txt'
    prompts_file.write_text(PROMPTS_FILE)
    argv = base_args(assets, '--prompts-file', str(prompts_file), '-n', '2', '--method', 'ddim',
                     '--seed', '3', '--output-dir', str(tmp_path / 'out'))
    assert run_sample(argv) == 0
    assert [load.calls for load in loads] == [1, 1, 1]
    expected = sorted(f'{line:05}_{slug}_{end}.png' for line, _, _, slug in PROMPT_LINES
                      for end in ('00000', '00001', 'grid'))
    assert sorted(p.name for p in (tmp_path / 'out').iterdir()) == expected
    for line, text, weight, slug in PROMPT_LINES:
        with Image.open(tmp_path / 'out' / f'{line:05}_{slug}_00001.png') as image:
            meta = image.text
        assert json.loads(meta['prompts']) == [[text, weight]]
        assert (meta['line'], meta['prompts_file'], meta['index'], meta['seed'],
                meta['method'], meta['steps']) == (str(line), 'prompts.txt', '1', '3', 'ddim', '2')
    # Every line starts from the --seed noise, as the command line's prompts would.
    noise, _ = spy.take()
    torch.testing.assert_close(noise, seeded_noise(3, 2).repeat(3, 1, 1, 1), rtol=0, atol=0)
    assert '3/3' in capsys.readouterr().err  # progress: prompts done / total

    # A line gives the images its prompt gives on the command line.
    argv = base_args(assets, 'storm clouds:1.5', '-n', '2', '--method', 'ddim', '--seed', '3',
                     '--output-dir', str(tmp_path / 'one'))
    assert run_sample(argv) == 0
    for i in range(2):
        assert np.array_equal(pixels(tmp_path / 'one' / f'out_{i:05}.png'),
                              pixels(tmp_path / 'out' / f'00004_storm-clouds_{i:05}.png'))


@pytest.mark.parametrize('bad, message', [
    ('a cow:inf', "line 4: prompt 'a cow:inf': the weight inf is not a finite number"),
    ('a cow:nan', "line 4: prompt 'a cow:nan': the weight nan is not a finite number"),
    ('a cow:1,5', "line 4: prompt 'a cow:1,5': the weight '1,5' is not a number"),
    (':2', "line 4: prompt ':2' has no text"),
])
def test_a_bad_line_fails_before_any_model_loads(assets, tmp_path, monkeypatch, capsys, bad,
                                                 message):
    refuse_models(monkeypatch)
    prompts_file = tmp_path / 'prompts.txt'
    prompts_file.write_text(f'a fox\n# a note\na hen:2\n{bad}\na cat\n')
    argv = base_args(assets, '--prompts-file', str(prompts_file), '--output-dir',
                     str(tmp_path / 'out'))
    assert run_sample(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith(f'sample.py: error: --prompts-file {prompts_file} {message}')
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('content, message', [
    (b'\x00\x01\x02', 'is a binary file'),
    ('café'.encode('latin-1'), 'is not UTF-8 text'),
    (b'# only a comment\n\n', 'holds no prompts'),
])
def test_an_unusable_prompts_file_is_one_line(assets, tmp_path, monkeypatch, capsys, content,
                                              message):
    refuse_models(monkeypatch)
    (tmp_path / 'prompts.txt').write_bytes(content)
    argv = base_args(assets, '--prompts-file', str(tmp_path / 'prompts.txt'))
    assert run_sample(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_prompts_file_and_command_line_prompts_do_not_mix(assets, tmp_path, monkeypatch,
                                                          capsys):
    refuse_models(monkeypatch)
    (tmp_path / 'prompts.txt').write_text('a fox\n')
    assert run_sample(base_args(assets, 'a hen', '--prompts-file',
                                str(tmp_path / 'prompts.txt'))) == 2
    assert 'not both' in capsys.readouterr().err


@pytest.mark.parametrize('mode, flag, expected', [
    ('prompts', '--grid-only', ['out_grid.png']),
    ('prompts', '--no-grid', ['out_00000.png', 'out_00001.png']),
    ('file', '--grid-only', ['00001_a-fox_grid.png', '00002_a-hen_grid.png']),
    ('file', '--no-grid', ['00001_a-fox_00000.png', '00001_a-fox_00001.png',
                           '00002_a-hen_00000.png', '00002_a-hen_00001.png']),
])
def test_grid_only_and_no_grid(assets, tmp_path, mode, flag, expected):
    (tmp_path / 'prompts.txt').write_text('a fox\na hen\n')
    source = ['a fox'] if mode == 'prompts' else ['--prompts-file', str(tmp_path / 'prompts.txt')]
    argv = base_args(assets, *source, '-n', '2', '--method', 'ddim', flag, '--output-dir',
                     str(tmp_path / 'out'))
    assert run_sample(argv) == 0
    assert sorted(p.name for p in (tmp_path / 'out').iterdir()) == expected
    if flag == '--grid-only':
        with Image.open(tmp_path / 'out' / expected[0]) as grid:
            assert grid.size == (128, 64) and grid.text['seed'] == '0'


def test_grid_only_and_no_grid_exclude_each_other(assets, capsys):
    assert run_sample(base_args(assets, 'a fox', '--grid-only', '--no-grid')) == 2
    assert 'not allowed with argument' in capsys.readouterr().err


@pytest.mark.parametrize('where, message', [
    (lambda d: d / 'a_file.png', 'is a file; pass a directory'),
    (lambda d: d / 'a_file.png' / 'samples', 'cannot write in'),
])
def test_an_output_dir_that_cannot_be_written_fails_before_any_model_loads(
        assets, tmp_path, monkeypatch, capsys, where, message):
    refuse_models(monkeypatch)
    (tmp_path / 'a_file.png').write_text('')
    argv = base_args(assets, 'a fox', '--output-dir', str(where(tmp_path)))
    assert run_sample(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('sample.py: error: --output-dir: ')
    assert message in err[0]


def test_batches_of_16_unless_told_with_the_same_noise(assets, tmp_path, monkeypatch):
    spy = SampleSpy(monkeypatch)
    argv = base_args(assets, 'a fox', '-n', '20', '--method', 'ddim', '--steps', '1',
                     '--grid-only', '--output-dir', str(tmp_path))
    with pytest.warns(UserWarning, match='sampling -n 20 in batches of 16; pass --batch-size'):
        assert run_sample(argv) == 0
    assert [len(x) for x in spy.starts] == [16, 4]
    noise, _ = spy.take()
    torch.testing.assert_close(noise, seeded_noise(0, 20), rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # no warning when the batch size is given
        assert run_sample([*argv, '--batch-size', '20']) == 0
    assert [len(x) for x in spy.starts] == [20]


def file_sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.mark.parametrize('record, warned', [
    ({'autoencoder': 'danbooru_kl_f8'}, 'autoencoder danbooru_kl_f8, but --autoencoder gives'),
    ({'cloob_checkpoint': 'cloob_laion_400m_vit_b_16_32_epochs'},
     'cloob checkpoint cloob_laion_400m_vit_b_16_32_epochs, but --cloob-checkpoint gives'),
    ({'autoencoder': '{ae}', 'autoencoder_sha256': '0' * 64},  # same name, other weights
     'autoencoder {ae} (sha256 000000000000), but --autoencoder gives {ae}'),
    ({'autoencoder': '/elsewhere/tiny_ae', 'autoencoder_sha256': '{ae_sha}',  # moved
      'cloob_checkpoint': '/elsewhere/tiny_cloob.pkl'}, None),
])
def test_a_checkpoint_trained_with_other_frozen_models_warns(assets, record, warned):
    fill = lambda s: s.format(ae=assets.autoencoder,  # noqa: E731
                              ae_sha=file_sha256(f'{assets.autoencoder}.ckpt'))
    record = {k: fill(v) for k, v in record.items()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        generate.check_frozen_models(record, assets.autoencoder, str(assets.cloob), 'run.ckpt')
    messages = [str(w.message) for w in caught]
    if warned is None:
        assert messages == []
    else:
        assert len(messages) == 1 and messages[0].startswith('run.ckpt was trained with ')
        assert fill(warned) in messages[0]


def test_the_frozen_model_check_runs_before_sampling(assets, tmp_path):
    ckpt = tiny.save_ccld_checkpoint(tmp_path / 'run.ckpt', assets.ema, assets.ema,
                                     {'autoencoder': 'danbooru_kl_f8'})
    argv = base_args(assets, 'a fox', '--checkpoint', str(ckpt), '--output-dir', str(tmp_path))
    with pytest.warns(UserWarning, match='trained with autoencoder danbooru_kl_f8'):
        assert run_sample(argv) == 0


def test_the_frozen_models_default_to_those_the_checkpoint_records(assets, tmp_path,
                                                                   monkeypatch, capsys):
    """Without --autoencoder and --cloob-checkpoint, a checkpoint samples with the frozen
    models it records, from any folder: by absolute path, or (older records) by the path
    typed where training ran, found beside the checkpoint. A flag overrides what is
    recorded; a recorded file that is gone is one line naming it and the flag."""
    models = tmp_path / 'old' / 'models'
    models.mkdir(parents=True)
    for path in (f'{assets.autoencoder}.yaml', f'{assets.autoencoder}.ckpt', assets.cloob,
                 assets.cloob.with_suffix('.json')):
        (models / Path(path).name).symlink_to(path)
    other_ae = tiny.tiny_autoencoder(tmp_path, seed=1)
    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    flags = ['a fox', '--size', '64', '--steps', '2', '-n', '1', '--no-grid', '--output-dir']

    def sample_of(name, record, *extra):
        ckpt = tiny.save_ccld_checkpoint(tmp_path / 'old' / f'{name}.ckpt', assets.ema,
                                         assets.ema, record)
        code = run_sample([*flags, name, '--checkpoint', str(ckpt), *extra])
        return pixels(elsewhere / name / 'out_00000.png') if code == 0 else code
    given = sample_of('given', {}, '--autoencoder', assets.autoencoder, '--cloob-checkpoint',
                      str(assets.cloob))
    recorded = {'autoencoder': assets.autoencoder, 'cloob_checkpoint': str(assets.cloob)}
    assert np.array_equal(sample_of('absolute', recorded), given)
    typed = {'autoencoder': 'models/tiny_ae', 'cloob_checkpoint': 'models/tiny_cloob.pkl'}
    assert np.array_equal(sample_of('relative', typed), given)
    overridden = sample_of('overridden', recorded, '--autoencoder', other_ae)
    assert not isinstance(overridden, int) and not np.array_equal(overridden, given)
    capsys.readouterr()
    gone = str(tmp_path / 'gone' / 'kl_f8')
    assert sample_of('gone', {'autoencoder': gone}) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f'gone.ckpt was trained with the autoencoder {gone}, which is ' \
        'not there' in err[0] and 'pass --autoencoder NAME' in err[0], err


class StubCLOOB(torch.nn.Module):
    """A CLOOB stand-in: the text embeddings are chosen, and an image's embedding is a
    known function of the image."""

    image_size = 32

    def __init__(self, texts, embed_image):
        super().__init__()
        self.texts, self.embed_image = texts, embed_image
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # where embed_prompts looks for a device

    def embed_texts(self, texts):
        return torch.stack([self.texts[text] for text in texts])

    def embed_images(self, images):
        return torch.stack([self.embed_image(image) for image in images])


def basis(i):
    return torch.eye(512)[i]


def test_score_is_higher_for_each_image_with_its_own_prompt(assets, tmp_path, monkeypatch,
                                                            capsys):
    """Three prompts with orthogonal text embeddings, two images each. The stub CLOOB
    embeds an image as the text embedding of the line whose image (from a first run
    without --score) it is nearest to; so an image matches its own prompt (score 1) and
    no other (0), and --score must say so of every image."""
    lines = ['a fox', 'a hen', 'a cow']
    texts = {text: basis(i) for i, text in enumerate(lines)}
    stub = StubCLOOB(texts, embed_image=lambda image: torch.zeros(512))
    monkeypatch.setattr(sample_run, 'load_cloob', lambda *args, **kwargs: stub)
    (tmp_path / 'prompts.txt').write_text('\n'.join(lines))
    argv = base_args(assets, '--prompts-file', str(tmp_path / 'prompts.txt'), '-n', '2',
                     '--method', 'ddim', '--no-grid')
    assert run_sample([*argv, '--output-dir', str(tmp_path / 'first')]) == 0
    names = [(i, f'{i + 1:05}_{text.replace(" ", "-")}_{k:05}.png')
             for i, text in enumerate(lines) for k in range(2)]
    references = [(torch.tensor(pixels(tmp_path / 'first' / name)).float() / 255, i)
                  for i, name in names]

    def nearest_line(image):
        image = image.permute(1, 2, 0).cpu()
        return min(references, key=lambda ref: (ref[0] - image).abs().mean().item())[1]
    stub.embed_image = lambda image: basis(nearest_line(image))
    capsys.readouterr()
    assert run_sample([*argv, '--output-dir', str(tmp_path / 'scored'), '--score']) == 0
    printed = dict(line.split('\tcloob_score ') for line in capsys.readouterr().out.splitlines())
    assert printed.keys() == {name for _, name in names}
    for i, name in names:
        with Image.open(tmp_path / 'scored' / name) as image:
            score = float(image.text['cloob_score'])
            seen = (torch.tensor(np.asarray(image)).float() / 255).permute(2, 0, 1)
        assert float(printed[name]) == pytest.approx(score, abs=1e-4)
        embed = basis(nearest_line(seen))
        shuffled = [torch.dot(embed, texts[other]).item() for other in lines if other != lines[i]]
        assert score == pytest.approx(torch.dot(embed, texts[lines[i]]).item()) == 1.0
        assert max(shuffled) == 0.0 < score


def test_score_of_several_prompts_is_against_their_weighted_mean(assets, tmp_path,
                                                                 monkeypatch, capsys):
    """Every image embeds as 'a fox''s embedding; the prompts 'a fox:2' and 'a hen:1'
    (orthogonal) mean 2 fox + hen, at cosine 2/sqrt(5) from it. An image-only prompt
    has no text to score against."""
    stub = StubCLOOB({'a fox': basis(0), 'a hen': basis(1)}, embed_image=lambda image: basis(0))
    monkeypatch.setattr(sample_run, 'load_cloob', lambda *args, **kwargs: stub)
    argv = base_args(assets, 'a fox:2', 'a hen:1', '--score', '--method', 'ddim', '--no-grid',
                     '--output-dir', str(tmp_path / 'two'))
    assert run_sample(argv) == 0
    with Image.open(tmp_path / 'two' / 'out_00000.png') as image:
        assert float(image.text['cloob_score']) == pytest.approx(2 / 5 ** 0.5, abs=1e-6)
    assert capsys.readouterr().out == f'out_00000.png\tcloob_score {2 / 5 ** 0.5:.4f}\n'

    argv = base_args(assets, '--images', str(assets.images[0]), '--score', '--method', 'ddim',
                     '--no-grid', '--output-dir', str(tmp_path / 'image'))
    with pytest.warns(UserWarning, match='--score: there is no text prompt to score'):
        assert run_sample(argv) == 0
    with Image.open(tmp_path / 'image' / 'out_00000.png') as image:
        assert 'cloob_score' not in image.text

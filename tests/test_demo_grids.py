"""Demo grids while training are drawn with the EMA model (SPEC 2 and 5)."""

from types import SimpleNamespace

import pytest
import torch
from PIL import Image

import tiny
import train_latent_diffusion
from ccld.diffusion import sampling, schedule
from ccld.models.autoencoder import load_autoencoder
from ccld.models.cloob import load_cloob
from ccld.train.demo_grids import DemoCallback
from ccld.diffusion.schedule import sampling_timesteps


@pytest.fixture(scope='module')
def frozen(tmp_path_factory):
    d = tmp_path_factory.mktemp('demo')
    return SimpleNamespace(autoencoder=load_autoencoder(tiny.tiny_autoencoder(d)),
                           cloob=load_cloob(str(tiny.tiny_cloob(d))))


def test_demo_grid_is_drawn_with_the_ema_weights(frozen, tmp_path):
    """The trained weights are noisier than their average; the grid must show the
    average, the model that is exported. Here the trained model refuses to run."""
    trained = tiny.tiny_diffusion(seed=1, autoencoder_scale=1.5)
    ema = tiny.tiny_diffusion(seed=0, autoencoder_scale=1.5)

    def trained_forward(*args, **kwargs):
        raise AssertionError('the demo grid was drawn with the trained weights (module.model)')
    trained.forward = trained_forward
    ema_batches, ema_forward = [], ema.forward

    def ema_spy(x, *args, **kwargs):
        ema_batches.append(x.shape[0])
        return ema_forward(x, *args, **kwargs)
    ema.forward = ema_spy

    module = SimpleNamespace(model=trained, model_ema=ema, ae_model=frozen.autoencoder,
                             spare_image_tower=None, offloaded_ema=None,
                             cloob=frozen.cloob, device=torch.device('cpu'))
    callback = DemoCallback(['a red circle', 'a blue square'], every=1, out_dir=tmp_path,
                            steps=2, latent_size=8)
    callback.render_and_log(SimpleNamespace(loggers=[]), module, step=3)
    assert ema_batches
    with Image.open(tmp_path / 'demo_00000003.png') as grid:
        assert grid.size == (2 * 64, 64)


def test_demo_grid_uses_the_demo_sampler_and_schedule(frozen, tmp_path):
    """--demo-method plms2 --demo-schedule karras --demo-steps 3: PLMS2's one-PIE start
    makes 4 model calls, at the Karras timesteps (PLMS would make 3 * 4)."""
    ema = tiny.tiny_diffusion(seed=0, autoencoder_scale=1.5)
    times, ema_forward = [], ema.forward

    def ema_spy(x, t, *args, **kwargs):
        times.append(t[0].item())
        return ema_forward(x, t, *args, **kwargs)
    ema.forward = ema_spy
    module = SimpleNamespace(model_ema=ema, ae_model=frozen.autoencoder, cloob=frozen.cloob,
                             spare_image_tower=None, offloaded_ema=None,
                             device=torch.device('cpu'))
    callback = DemoCallback(['a red circle'], every=1, out_dir=tmp_path, steps=3, latent_size=8,
                            method='plms2', schedule='karras')
    callback.render_and_log(SimpleNamespace(loggers=[]), module, step=0)
    karras = sampling_timesteps(3, schedule='karras').tolist()
    assert times == pytest.approx([karras[0], karras[1], karras[1], karras[2]])


def test_demo_flags_offer_every_sampler_and_schedule():
    """train_latent_diffusion.py names them without importing torch; they must be the
    library's, and default to the original's PLMS on the spliced schedule."""
    actions = {a.dest: a for a in train_latent_diffusion.parser()._actions}
    assert tuple(actions['demo_method'].choices) == sampling.METHODS
    assert tuple(actions['demo_schedule'].choices) == tuple(schedule.SCHEDULES)
    assert (actions['demo_method'].default, actions['demo_schedule'].default,
            actions['demo_steps'].default) == ('plms', 'spliced', 50)

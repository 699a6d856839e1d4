"""Loading builds no initialised copy of a model: the file's tensors become the model's own
(shared storage, no random draw for weights about to be overwritten), and what comes out
is what the old way (an initialised model, load_state_dict) gave, bit for bit."""

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save

import tiny
import train_latent_diffusion
from ccld.models import checkpoint_files, exports, lora
from ccld.models.autoencoder import build_autoencoder, load_autoencoder, read_config
from ccld.models.checkpoint_files import read_checkpoint
from ccld.models.cloob import load_cloob
from ccld.models.unet import DiffusionModel
from ccld.sample.generate import load_model
from ccld.train.ema import averaged_copy
from cloob_training import model_pt, pretrained
from ldm.models.autoencoder import read_state_dict

SCALE = 1.5


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp('loading')
    model = tiny.tiny_diffusion(seed=0, autoencoder_scale=SCALE)
    paths = tiny.make_images(d / 'images', n=2, size=64)
    (d / 'prompts.txt').write_text('a red circle\n')
    return SimpleNamespace(dir=d, model=model, bare=tiny.save_bare(model, d / 'bare.pth'),
                           autoencoder=tiny.tiny_autoencoder(d), cloob=str(tiny.tiny_cloob(d)),
                           train=tiny.write_path_list(paths, d / 'train.txt'),
                           prompts=d / 'prompts.txt')


def the_old_way(state_dict):
    """A model as loading made it before: initialised, then the weights copied in."""
    model = DiffusionModel(tiny.BASE_CHANNELS, tiny.CHANNEL_MULTIPLIERS)
    model.load_state_dict({k: v.float() for k, v in state_dict.items()})
    return model.eval()


def outputs(model):
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn([2, 4, 8, 8], generator=g), torch.rand([2], generator=g)
    cond = torch.randn([2, 512], generator=g)
    with torch.no_grad():
        return model(x, t, cond)


def assert_draws_nothing(load):
    """load()'s value, checked to leave the global random state as it was: nothing was
    initialised (a model initialised on the CPU draws its weights from it)."""
    before = torch.get_rng_state()
    loaded = load()
    assert torch.equal(torch.get_rng_state(), before), 'loading drew random numbers: an init'
    return loaded


def shares_storage(model, state_dict):
    """Whether every tensor of `model` is the state dict's own (no copy was made)."""
    ours = model.state_dict()
    return all(ours[k].data_ptr() == v.data_ptr() for k, v in state_dict.items())


def test_a_state_dict_becomes_the_model_in_place(files):
    model, ckpt = assert_draws_nothing(lambda: load_model(files.bare))
    assert shares_storage(model, ckpt.model_ema)
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    assert torch.equal(outputs(model), outputs(the_old_way(files.model.state_dict())))


def test_an_fp16_export_loads_into_fp32_once(files, tmp_path):
    path = tmp_path / 'export.safetensors'
    exports.export(read_checkpoint(files.bare), path, 'fp16')
    model, ckpt = assert_draws_nothing(lambda: load_model(path))
    assert {t.dtype for t in model.state_dict().values()} == {torch.float32}
    assert shares_storage(model, ckpt.model_ema)  # converted as read, not copied again
    from safetensors.torch import load_file
    assert torch.equal(outputs(model), outputs(the_old_way(load_file(path))))


def test_16_bit_weights_load_into_the_fp32_model(files, tmp_path):
    """A state dict saved in fp16 (not an export) loads as load_state_dict loaded it: into
    the fp32 model, converted tensor by tensor."""
    path = tmp_path / 'half.pth'
    torch.save({k: v.half() for k, v in files.model.state_dict().items()}, path)
    model, _ = load_model(path)
    assert {t.dtype for t in model.state_dict().values()} == {torch.float32}
    assert torch.equal(outputs(model), outputs(the_old_way(torch.load(path))))


def test_an_export_is_written_as_safetensors_writes_it(files, tmp_path):
    path = tmp_path / 'export.safetensors'
    record = exports.export(read_checkpoint(files.bare), path, 'fp16')
    state = dict(files.model.state_dict(), autoencoder_scale=torch.tensor(SCALE))
    expected = {k: v if k == 'autoencoder_scale' else v.half() for k, v in state.items()}
    ours, theirs = path.read_bytes(), save(expected, exports.to_metadata(record))
    # The same bytes but for the order of the metadata, which safetensors takes from a
    # hash map whose order changes from one process to the next.
    assert len(ours) == len(theirs)
    assert split(ours) == split(theirs)


def split(data):
    """(header without the metadata, as ordered pairs; the metadata; the tensors' bytes)."""
    size = int.from_bytes(data[:8], 'little')
    header = json.loads(data[8:8 + size], object_pairs_hook=list)
    metadata = dict(next(value for key, value in header if key == '__metadata__'))
    return [(k, v) for k, v in header if k != '__metadata__'], metadata, data[8 + size:]


def test_a_lora_base_is_the_files_and_its_ema_shares_it(files):
    ckpt = read_checkpoint(files.bare)
    spec = lora.spec_of(4, 8, None, files.bare, ckpt.model_ema)
    model = lora.adapted_model(ckpt.model_ema, spec)
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all('lora_' not in n for n in frozen)
    file_ptrs = {v.data_ptr() for v in ckpt.model_ema.values()}
    assert all(p.data_ptr() in file_ptrs for p in frozen.values())
    averaged = dict(averaged_copy(model).named_parameters())
    assert all(averaged[n] is p for n, p in frozen.items())
    adapters = [n for n, p in model.named_parameters() if p.requires_grad]
    assert adapters and all(averaged[n] is not dict(model.named_parameters())[n]
                            for n in adapters)


def train_argv(files, out, *extra):
    return ['--train-set', str(files.train), '--vqgan-model', files.autoencoder,
            '--autoencoder-scale', str(SCALE), '--cloob-checkpoint', files.cloob,
            '--demo-prompts', str(files.prompts), '--output-dir', str(out),
            '--accelerator', 'cpu', '--num-workers', '0', '--batch-size', '1',
            '--image-size', '64', '--max-steps', '10', '--seed', '0',
            '--resume-from', str(files.bare), *extra]


def test_a_finetune_trains_the_files_weights_and_averages_a_copy(files, tmp_path):
    seen = tiny.set_up_run(train_latent_diffusion.main, train_argv(files, tmp_path))
    model, ema = seen.module.model, seen.module.model_ema
    for name, tensor in files.model.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor)
        assert torch.equal(ema.state_dict()[name], tensor)
    assert all(p.requires_grad for p in model.parameters())
    ours = {p.data_ptr() for p in model.parameters()}
    assert not any(p.data_ptr() in ours for p in ema.parameters())  # the one copy


@pytest.mark.parametrize('extra', [[], ['--lora-rank', '4']], ids=['finetune', 'lora'])
def test_a_seeded_start_draws_what_the_old_way_drew(files, tmp_path, extra):
    """A finetune or a LoRA run starts from a state dict with the weights and the random
    state (whence its loader's shuffle, its noise and a LoRA run's fresh adapters) that the
    old way (an initialised model, the file copied in) left: a seeded run trains as it did."""
    new = tiny.set_up_run(train_latent_diffusion.main, train_argv(files, tmp_path / 'new', *extra))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(checkpoint_files, 'build_model', tiny.initialised_build)
        old = tiny.set_up_run(train_latent_diffusion.main,
                              train_argv(files, tmp_path / 'old', *extra))
    assert torch.equal(new.random_state, old.random_state)
    for name in ('model', 'model_ema'):
        ours, theirs = (getattr(run.module, name).state_dict() for run in (new, old))
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[key], theirs[key]) for key in theirs), name


def test_a_lora_start_holds_its_base_once(files, tmp_path):
    seen = tiny.set_up_run(train_latent_diffusion.main,
                           train_argv(files, tmp_path, '--lora-rank', '4'))
    model, ema = seen.module.model, seen.module.model_ema
    averaged = dict(ema.named_parameters())
    frozen = [(n, p) for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(averaged[n] is p for n, p in frozen)


def test_the_autoencoder_loads_in_place_and_as_before(files):
    model = assert_draws_nothing(lambda: load_autoencoder(files.autoencoder))
    config = read_config(f'{files.autoencoder}.yaml')
    torch.manual_seed(1)
    old = build_autoencoder(config)
    after_init = torch.get_rng_state()
    old.init_from_ckpt(f'{files.autoencoder}.ckpt')
    images = torch.rand([1, 3, 64, 64], generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        assert torch.equal(model.decode(model.encode(images).mean),
                           old.decode(old.encode(images).mean))
    assert all(p.is_contiguous() for p in model.parameters())
    # A training run initialises it first all the same: its later draws stay as they were.
    torch.manual_seed(1)
    load_autoencoder(files.autoencoder, init_weights=True)
    assert torch.equal(torch.get_rng_state(), after_init)
    state = read_state_dict(f'{files.autoencoder}.ckpt')
    assert all(torch.equal(model.state_dict()[k], state[k]) for k in model.state_dict())


def test_cloob_loads_in_place_and_as_before(files):
    model = assert_draws_nothing(lambda: load_cloob(files.cloob))
    config, path = pretrained.resolve_checkpoint(files.cloob)
    torch.manual_seed(1)
    old = model_pt.get_pt_model(config)
    after_init = torch.get_rng_state()
    old.load_state_dict(model_pt.get_pt_params(config, path))
    with torch.no_grad():
        assert torch.equal(model.embed_texts(['a red fox']),
                           old.text_encoder(old.tokenize(['a red fox'])).float())
    torch.manual_seed(1)
    load_cloob(files.cloob, init_weights=True)
    assert torch.equal(torch.get_rng_state(), after_init)


def continued_argv(files, out, *extra):
    """A small model (base 64 x 1,1,1,1) on four images, batch 1, checkpoints every 2 steps."""
    paths = tiny.make_images(files.dir / 'four', n=4, size=64)
    return ['--train-set', str(tiny.write_path_list(paths, files.dir / 'four.txt')),
            '--vqgan-model', files.autoencoder, '--autoencoder-scale', str(SCALE),
            '--cloob-checkpoint', files.cloob, '--demo-prompts', str(files.prompts),
            '--output-dir', str(out), '--accelerator', 'cpu', '--num-workers', '0',
            '--batch-size', '1', '--image-size', '64', '--base-channels', '64',
            '--channel-multipliers', '1,1,1,1', '--checkpoint-every', '2', '--demo-every', '100',
            '--seed', '0', *extra]


@pytest.fixture(scope='module')
def two_steps(files, tmp_path_factory):
    """step=2 of a fresh run: a ccld training checkpoint with optimizer state."""
    out = tmp_path_factory.mktemp('two_steps')
    assert tiny.exit_code(train_latent_diffusion.main, 'train_latent_diffusion.py',
                          continued_argv(files, out, '--max-steps', '2')) == 0
    return out / 'checkpoints' / 'step=00000002.ckpt'


def test_a_continued_run_takes_its_model_and_ema_from_the_file_in_place(files, two_steps,
                                                                         tmp_path):
    """The model and the EMA are the checkpoint's own tensors, and Lightning is handed that
    same checkpoint: its load_state_dict copies each weight onto itself, which copies
    nothing (an initialised model would have had the file copied in)."""
    seen = tiny.set_up_run(train_latent_diffusion.main, continued_argv(
        files, tmp_path, '--resume-from', str(two_steps), '--max-steps', '4'))
    path, checkpoint = seen.trainer['plugins'][0].resumed
    assert path == str(two_steps)
    state = checkpoint['state_dict']
    for name in ('model', 'model_ema'):
        ours = getattr(seen.module, name).state_dict()
        assert {f'{name}.{key}' for key in ours} <= state.keys()
        for key, tensor in ours.items():
            if key != 'autoencoder_scale':  # (--autoencoder-scale's, as before)
                assert tensor.data_ptr() == state[f'{name}.{key}'].data_ptr(), (name, key)
    assert not any(p.requires_grad for p in seen.module.model_ema.parameters())
    assert all(p.requires_grad for p in seen.module.model.parameters())
    assert seen.trainer['plugins'][0].load_checkpoint(two_steps) is checkpoint


def test_a_continued_run_goes_on_as_the_old_way_did(files, two_steps, tmp_path):
    """Two more steps from step 2 end with the weights, EMA and optimizer state that the
    old way (an initialised model and EMA, the file copied into them) gave, bit for bit:
    the random draws of the initialisation are made all the same (the loader's shuffle
    comes after them)."""
    argv = ['--resume-from', str(two_steps), '--max-steps', '4']
    assert tiny.exit_code(train_latent_diffusion.main, 'train_latent_diffusion.py',
                          continued_argv(files, tmp_path / 'new', *argv)) == 0
    with pytest.MonkeyPatch.context() as patch:
        # The old way: the module builds and initialises its model and copies it for the EMA.
        patch.setattr(checkpoint_files, 'build_model', lambda *args, **kwargs: None)
        assert tiny.exit_code(train_latent_diffusion.main, 'train_latent_diffusion.py',
                              continued_argv(files, tmp_path / 'old', *argv)) == 0
    new, old = (torch.load(tmp_path / d / 'checkpoints' / 'last.ckpt', weights_only=False)
                for d in ('new', 'old'))
    assert new['global_step'] == old['global_step'] == 4
    assert new['state_dict'].keys() == old['state_dict'].keys()
    for key, tensor in old['state_dict'].items():
        assert torch.equal(new['state_dict'][key], tensor), key
    saved = torch.load(two_steps, weights_only=False)['state_dict']
    assert not torch.equal(new['state_dict']['model.net.0.main.0.weight'],
                           saved['model.net.0.main.0.weight'])  # (it trained)
    for a, b in zip(new['optimizer_states'][0]['state'].values(),
                    old['optimizer_states'][0]['state'].values()):
        assert all(torch.equal(a[name], b[name]) for name in ('step', 'exp_avg', 'exp_avg_sq'))

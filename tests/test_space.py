"""export_model.py --space (ccld/sample/space.py): the Space folder written here runs as
`python3 DIR/app.py` on a free 127.0.0.1 port and answers a gradio_client generation with
sample.py's pixels; pushed, it goes to a Space repository through huggingface_hub's upload
API, replaced here (test_hub.FakeHub). No network."""

import importlib.util
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

import export_model
import sample
import tiny
from ccld.app import serve
from ccld.app.flags import parser as app_parser
from ccld.sample import space
from test_hub import FakeHub
from test_lora import lora_checkpoint

gradio_client = pytest.importorskip('gradio_client')
ROOT = Path(__file__).resolve().parent.parent
FROZEN = {'tiny_ae.yaml', 'tiny_ae.ckpt', 'tiny_cloob.pkl', 'tiny_cloob.json'}
SPACE_FILES = {'README.md', 'app.py', 'requirements.txt', *FROZEN}
REQUIREMENT = 'ccld @ git+https://example.org/ccld.git@' + 'a' * 40
FORM = dict(prompt='a red fox', n=1, seed=7, steps=2, method='ddim', size=64,
            schedule='spliced', cond_scale=3.0, lora='none', lora_strength=1.0,
            image_prompt=None, image_weight=3.0, init_image=None, strength=0.9)


def export(argv):
    return tiny.exit_code(export_model.main, 'export_model.py', [str(a) for a in argv])


def one_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def pixels(path):
    return np.asarray(Image.open(path).convert('RGB'))


@pytest.fixture(scope='module')
def made(tmp_path_factory):
    """A ccld checkpoint that records its local autoencoder and CLOOB (in frozen/), and its
    export written with --space DIR."""
    d = tmp_path_factory.mktemp('space')
    frozen = d / 'frozen'
    frozen.mkdir()
    autoencoder, cloob = tiny.tiny_autoencoder(frozen), tiny.tiny_cloob(frozen)
    ema = tiny.tiny_diffusion(seed=0, autoencoder_scale=1.5)
    ckpt = tiny.save_ccld_checkpoint(d / 'run.ckpt', ema, ema, {
        'autoencoder': str(Path(autoencoder).resolve()),
        'cloob_checkpoint': str(Path(cloob).resolve()), 'image_size': 64})
    out, folder = d / 'model.safetensors', d / 'space'
    assert export([ckpt, out, '--space', folder, '--dtype', 'fp32']) == 0
    return SimpleNamespace(dir=d, frozen=frozen, ema=ema, ckpt=ckpt, out=out, folder=folder)


def load_app(folder):
    """The Space's app.py, imported as a module (it starts nothing when imported)."""
    spec = importlib.util.spec_from_file_location(f'space_app_{id(folder)}', folder / 'app.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_the_space_folder_runs_here_and_answers_with_sample_pys_pixels(made, tmp_path):
    import gradio
    from huggingface_hub import SpaceCard
    folder = made.folder
    assert {p.name for p in folder.iterdir()} == SPACE_FILES | {'model.safetensors'}
    assert (folder / 'model.safetensors').read_bytes() == made.out.read_bytes()
    for name in FROZEN:
        assert (folder / name).read_bytes() == (made.frozen / name).read_bytes()
    card = SpaceCard.load(folder / 'README.md')
    data = card.data.to_dict()
    assert (data['sdk'], data['sdk_version'], data['app_file']) == \
        ('gradio', gradio.__version__, 'app.py')
    assert 'models' not in data  # the model is in the folder, not on the hub
    lines = [line for line in (folder / 'requirements.txt').read_text().splitlines()
             if not line.startswith('#')]
    assert len(lines) == 1 and re.fullmatch(
        r'ccld(==\S+| @ git\+https://\S+@[0-9a-f]{40})', lines[0]), lines

    # Served from elsewhere, with the frozen models it was exported from gone: the
    # folder has all it needs.
    port, log = free_port(), tmp_path / 'space.log'
    env = {k: v for k, v in os.environ.items() if k != 'SPACE_ID'}
    env['PYTHONPATH'] = str(ROOT)  # this checkout's ccld, as requirements.txt would install it
    made.frozen.rename(made.dir / 'gone')
    try:
        with open(log, 'w') as f:
            process = subprocess.Popen([sys.executable, str(folder / 'app.py'), '--port',
                                        str(port), '--device', 'cpu'], cwd=tmp_path, env=env,
                                       stdout=f, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 180
            while 'serving' not in log.read_text():
                assert process.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.5)
            assert f'on http://127.0.0.1:{port}' in log.read_text()
            client = gradio_client.Client(f'http://127.0.0.1:{port}', verbose=False)
            images, status = client.predict(**FORM, model='model.safetensors',
                                            api_name='/generate')
        finally:
            process.terminate()
            process.wait(30)
    finally:
        (made.dir / 'gone').rename(made.frozen)
    assert status == 'seed 7'
    assert tiny.exit_code(sample.main, 'sample.py', [
        'a red fox', '--checkpoint', str(made.out), '--autoencoder', str(folder / 'tiny_ae'),
        '--cloob-checkpoint', str(folder / 'tiny_cloob.pkl'), '-n', '1', '--seed', '7',
        '--steps', '2', '--method', 'ddim', '--size', '64', '--device', 'cpu', '--no-grid',
        '--output-dir', str(tmp_path / 'cli')]) == 0
    [page], [cli] = images, sorted((tmp_path / 'cli').glob('out_*.png'))
    assert np.array_equal(pixels(page['image']), pixels(cli))


def test_on_a_space_the_app_listens_on_all_interfaces_at_7860_without_its_own_password(made):
    app = load_app(made.folder)
    for environ, host, port in (({'SPACE_ID': 'alice/tiny'}, '0.0.0.0', 7860),
                                ({}, '127.0.0.1', None)):
        args = app_parser().parse_args(app.flags(['--device', 'cpu'], environ))
        assert (serve.check_access(args), args.port) == ((host, None), port)
        assert (args.checkpoint, args.autoencoder, args.cloob_checkpoint) == (
            [str(made.folder / 'model.safetensors')], str(made.folder / 'tiny_ae'),
            str(made.folder / 'tiny_cloob.pkl'))


@pytest.fixture
def online(tmp_path, monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(tmp_path / 'hub_cache'))
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', False)


def test_push_to_hub_uploads_the_model_then_the_space_folder_as_a_space_and_nothing_else(
        made, online, tmp_path, monkeypatch):
    fake = FakeHub(monkeypatch)
    work = tmp_path / 'work'
    work.mkdir()
    (work / 'secret.txt').write_text('not for the hub')
    monkeypatch.chdir(work)
    out, folder = work / 'shared.safetensors', work / 'space'
    assert export([made.ckpt, out, '--push-to-hub', 'alice/tiny-share', '--space', folder,
                   '--space-requirement', REQUIREMENT, '--no-card-grid']) == 0
    assert [call for call in fake.calls if call[0] != 'whoami'] == [
        ('create_repo', 'alice/tiny-share', {'repo_type': 'model', 'private': False,
                                             'exist_ok': True, 'space_sdk': None}),
        ('create_commit', 'alice/tiny-share', 'model'),
        ('create_repo', 'alice/tiny-share', {'repo_type': 'space', 'private': False,
                                             'exist_ok': True, 'space_sdk': 'gradio'}),
        ('create_commit', 'alice/tiny-share', 'space')]
    (_, _, model_files), (_, _, space_files) = fake.commits
    assert set(model_files) == {'shared.safetensors', 'README.md'}
    # The Space commit is the folder, file for file: the model by its hub name only.
    assert space_files == {p.name: (str(p), p.read_bytes()) for p in folder.iterdir()}
    assert set(space_files) == SPACE_FILES

    from huggingface_hub import SpaceCard
    card = SpaceCard.load(folder / 'README.md')
    assert (card.data.sdk, card.data.app_file, card.data.models) == \
        ('gradio', 'app.py', ['alice/tiny-share'])
    assert (folder / 'requirements.txt').read_text() == REQUIREMENT + '\n'
    args = app_parser().parse_args(load_app(folder).flags([], {}))
    assert args.checkpoint == ['hf://alice/tiny-share']
    assert args.autoencoder == str(folder / 'tiny_ae')


@pytest.mark.parametrize('case, message', [
    ('not empty', '--space: {folder} exists and is not an empty folder; name a new one.'),
    ('requirement alone', '--space-requirement is what the --space folder installs: pass '
     '--space DIR too.'),
    ('not ccld', "--space-requirement: 'numpy==1.0' installs numpy; name ccld"),
    ('card in the same folder', '--space and --card-only each write a README.md: give them '
     'two folders.'),
    ('no origin to push', '--space: the Space must install this ccld, and its checkout has no '
     'origin on a server to install it from: pass --space-requirement SPEC'),
    ('adapter', '--space serves a whole model, and the export of a LoRA checkpoint is its '
     'adapter alone: pass --merge.'),
    ('no record', '--space: the Space needs the autoencoder and CLOOB {released} was trained '
     'with, and it records none: export a ccld checkpoint.'),
])
def test_refusals_are_one_line_exit_2_before_anything_is_written(
        made, online, tmp_path, monkeypatch, capsys, recwarn, case, message):
    fake = FakeHub(monkeypatch)
    monkeypatch.setattr(space, 'origin_commit', lambda root=None: None)
    folder, out = tmp_path / 'space', tmp_path / 'out.safetensors'
    checkpoint, extra = made.ckpt, ['--space', folder]
    released = tiny.save_bare(made.ema, tmp_path / 'released.pth')
    if case == 'not empty':
        folder.mkdir()
        (folder / 'mine.txt').write_text('keep me')
    elif case == 'requirement alone':
        extra = ['--space-requirement', REQUIREMENT]
    elif case == 'not ccld':
        extra += ['--space-requirement', 'numpy==1.0']
    elif case == 'card in the same folder':
        extra += ['--card-only', folder, '--no-card-grid']
    elif case == 'no origin to push':
        extra += ['--push-to-hub', 'alice/tiny-share', '--no-card-grid']
    elif case == 'adapter':
        checkpoint, _ = lora_checkpoint(tmp_path / 'lora.ckpt', made.ema, made.out)
    elif case == 'no record':
        checkpoint = released
    assert export([checkpoint, out, *extra]) == 2
    assert one_line(capsys).startswith('export_model.py: error: ' + message.format(
        folder=folder, released=released))
    assert not out.exists()
    if case == 'not empty':
        assert [p.name for p in folder.iterdir()] == ['mine.txt']
    else:
        assert not folder.exists()
    assert fake.commits == []
    assert not recwarn.list  # the error alone


def test_hub_and_pretrained_frozen_models_are_named_not_copied(made, tmp_path, monkeypatch):
    """A recorded hub autoencoder (fetched once, to check it can be had) and a pretrained
    CLOOB name go to the Space's app.py as they are; nothing of them is copied."""
    from huggingface_hub import constants
    from test_hub import put_in_cache
    cache = tmp_path / 'hub_cache'
    put_in_cache(cache, 'alice/ae', {'tiny_ae.yaml': made.frozen / 'tiny_ae.yaml',
                                     'tiny_ae.ckpt': made.frozen / 'tiny_ae.ckpt'})
    for name, value in (('HF_HUB_OFFLINE', True), ('HF_HUB_CACHE', str(cache))):
        monkeypatch.setenv(name, str(int(value)) if value is True else value)
        monkeypatch.setattr(constants, name, value)
    record = {'autoencoder': 'hf://alice/ae/tiny_ae',
              'cloob_checkpoint': 'cloob_laion_400m_vit_b_16_32_epochs'}
    flags = space.frozen_models(record, 'model.safetensors', tmp_path)
    assert flags == [('--autoencoder', 'hf://alice/ae/tiny_ae', []),
                     ('--cloob-checkpoint', 'cloob_laion_400m_vit_b_16_32_epochs', [])]
    module = tmp_path / 'app.py'
    module.write_text(space.app_source(flags, 'hf://alice/tiny'))
    assert load_app(tmp_path).flags([], {}) == [
        '--autoencoder', 'hf://alice/ae/tiny_ae',
        '--cloob-checkpoint', 'cloob_laion_400m_vit_b_16_32_epochs']


def git(cwd, *args):
    subprocess.run(['git', '-C', str(cwd), *args], check=True, capture_output=True)


def test_requirements_pin_the_checkout_at_its_commit_on_its_origin_as_pip_fetches_it(
        tmp_path):
    checkout = tmp_path / 'ccld'
    checkout.mkdir()
    git(checkout, 'init', '-q')
    (checkout / 'a.txt').write_text('a')
    git(checkout, 'add', 'a.txt')
    git(checkout, '-c', 'user.name=t', '-c', 'user.email=t@t', 'commit', '-qm', 'a')
    commit = subprocess.run(['git', '-C', str(checkout), 'rev-parse', 'HEAD'],
                            capture_output=True, text=True, check=True).stdout.strip()
    assert space.pinned_requirement(checkout) is None  # no origin
    git(checkout, 'remote', 'add', 'origin', 'git@github.com:someone/ccld.git')
    with pytest.warns(UserWarning, match='on no branch of origin'):
        assert space.pinned_requirement(checkout) == \
            f'ccld @ git+https://github.com/someone/ccld.git@{commit}'
    (checkout / 'a.txt').write_text('changed')
    with pytest.warns(UserWarning) as said:
        space.pinned_requirement(checkout)
    assert ['without the changes not committed' in str(w.message) for w in said] == [True, False]
    assert space.pinned_requirement(tmp_path) is None  # no checkout
    for url, public in (('https://user:token@github.com/someone/ccld',
                         'https://github.com/someone/ccld'),
                        ('ssh://git@example.org:2222/someone/ccld.git',
                         'https://example.org/someone/ccld.git'),
                        ('/srv/git/ccld.git', None), ('file:///srv/git/ccld.git', None)):
        assert space.public_url(url) == public, url

"""Models on the Hugging Face hub (models/hub.py, sample/model_card.py): hf://OWNER/NAME
names read from a hub cache built here in huggingface_hub's own layout, offline; and
export_model.py --push-to-hub against huggingface_hub's upload API, replaced here. No
network."""

import hashlib
import json
import os
import pathlib
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import distill
import export_model
import sample
import tiny
import train_latent_diffusion
from ccld import cli
from ccld.errors import UserError
from ccld.models import hub, lora
from ccld.sample import evaluation
from ccld.train import distill_run, run as training_run
from test_lora import lora_checkpoint

ROOT = Path(__file__).resolve().parent.parent
COMMIT = 'c0ffee' * 6 + 'c0ff'
BASE_COMMIT = 'ba5e' * 10
SAMPLE_ARGS = ['a red fox', '-n', '1', '--steps', '2', '--method', 'ddim', '--seed', '7',
               '--device', 'cpu']


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def put_in_cache(cache, repo_id, files, commit=COMMIT, ref='main'):
    """A revision of a model repository as huggingface_hub caches it: the file contents in
    blobs/, snapshots/COMMIT/FILE linking to them, refs/REF naming the commit."""
    folder = Path(cache) / f'models--{repo_id.replace("/", "--")}'
    (folder / 'refs').mkdir(parents=True, exist_ok=True)
    (folder / 'refs' / ref).write_text(commit)
    for name, content in files.items():
        data = Path(content).read_bytes() if isinstance(content, Path) else content
        blob = folder / 'blobs' / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = folder / 'snapshots' / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return folder / 'snapshots' / commit


def run_tool(module, prog, argv):
    return tiny.exit_code(module.main, prog, [str(a) for a in argv])


def one_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def pixels(path):
    return np.asarray(Image.open(path))


@pytest.fixture(scope='module')
def shared(tmp_path_factory):
    """Tiny frozen models; a ccld checkpoint that records a finetune of a hub model on a hub
    dataset, its fp32 export and an adapter for it; and a hub cache holding the export,
    the autoencoder, the adapter and the finetune's base (whose card says its license)."""
    d = tmp_path_factory.mktemp('hub')
    autoencoder, cloob = tiny.tiny_autoencoder(d), str(tiny.tiny_cloob(d))
    ema = tiny.tiny_diffusion(seed=0, autoencoder_scale=1.5)
    base_file = f'hf://base-owner/base@{BASE_COMMIT}/model.safetensors'
    record = {'image_size': 64, 'autoencoder': autoencoder, 'cloob_checkpoint': cloob,
              'autoencoder_sha256': sha256(f'{autoencoder}.ckpt'),
              'base_channels': tiny.BASE_CHANNELS,
              'channel_multipliers': list(tiny.CHANNEL_MULTIPLIERS), 'train_set':
              'hf://someone/wikiart', 'train_images': 80, 'finetuned_from': base_file,
              'finetuned_from_sha256': 'f' * 64}
    ckpt = tiny.save_ccld_checkpoint(d / 'last.ckpt', ema, ema, record, global_step=321)
    export = d / 'model.safetensors'
    assert run_tool(export_model, 'export_model.py', [ckpt, export, '--dtype', 'fp32']) == 0
    cache = d / 'hub_cache'
    snapshot = put_in_cache(cache, 'alice/tiny', {'model.safetensors': export})
    put_in_cache(cache, 'alice/ae', {'tiny_ae.yaml': Path(f'{autoencoder}.yaml'),
                                     'tiny_ae.ckpt': Path(f'{autoencoder}.ckpt')})
    put_in_cache(cache, 'base-owner/base', {'README.md': b'---\nlicense: mit\n---\n# base\n'},
                 commit=BASE_COMMIT)
    # A LoRA run on the export as read from the hub (so it names its base so), and its adapter.
    lora_ckpt, _ = lora_checkpoint(d / 'lora.ckpt', ema, snapshot / 'model.safetensors', record)
    adapter = d / 'style.safetensors'
    assert run_tool(export_model, 'export_model.py', [lora_ckpt, adapter, '--dtype', 'fp32']) == 0
    put_in_cache(cache, 'alice/style', {'style.safetensors': adapter})
    return SimpleNamespace(dir=d, autoencoder=autoencoder, cloob=cloob, ema=ema, ckpt=ckpt,
                           export=export, cache=cache, snapshot=snapshot, record=record,
                           lora_ckpt=lora_ckpt, adapter=adapter)


@pytest.fixture
def offline(shared, monkeypatch):
    """HF_HUB_OFFLINE=1 and the hub cache of `shared`, for this process (huggingface_hub
    reads the variables when imported, so its constants are set too)."""
    from huggingface_hub import constants
    for name, value in (('HF_HUB_OFFLINE', True), ('HF_HUB_CACHE', str(shared.cache))):
        monkeypatch.setenv(name, str(int(value)) if value is True else value)
        monkeypatch.setattr(constants, name, value)
    return shared


def sample_to(out, *argv):
    assert run_tool(sample, 'sample.py', [*SAMPLE_ARGS, '--output-dir', out, *argv]) == 0
    return pixels(Path(out) / 'out_00000.png')


def test_sample_py_from_hub_names_gives_the_pixels_of_the_local_files(offline, tmp_path):
    """--checkpoint hf://OWNER/NAME (its one model file), --autoencoder hf://OWNER/NAME (its
    one .yaml with weights) and --lora hf://OWNER/NAME:STRENGTH read from the cache offline
    give the images of the local files; the PNGs name the hub files, pinned."""
    local = sample_to(tmp_path / 'local', '--checkpoint', offline.export, '--autoencoder',
                      offline.autoencoder, '--cloob-checkpoint', offline.cloob)
    from_hub = sample_to(tmp_path / 'hub', '--checkpoint', 'hf://alice/tiny', '--autoencoder',
                         'hf://alice/ae', '--cloob-checkpoint', offline.cloob)
    assert np.array_equal(from_hub, local)
    with Image.open(tmp_path / 'hub' / 'out_00000.png') as image:
        assert image.text['checkpoint'] == f'hf://alice/tiny@{COMMIT}/model.safetensors'
    styled = sample_to(tmp_path / 'styled', '--checkpoint', offline.export, '--lora',
                       f'{offline.adapter}:0.5', '--autoencoder', offline.autoencoder,
                       '--cloob-checkpoint', offline.cloob)
    styled_hub = sample_to(tmp_path / 'styled_hub', '--checkpoint', f'hf://alice/tiny@{COMMIT}',
                           '--lora', 'hf://alice/style:0.5', '--autoencoder',
                           f'hf://alice/ae/tiny_ae', '--cloob-checkpoint', offline.cloob)
    assert np.array_equal(styled_hub, styled) and not np.array_equal(styled, local)


def test_a_recorded_hub_autoencoder_is_the_default_resolved_as_the_flag_would_be(
        offline, tmp_path, capsys):
    """A checkpoint whose record names its autoencoder by a pinned hub name (as training
    from --vqgan-model hf://... records it) samples with no --autoencoder, offline from the
    cache, as the local files give; its export keeps the hub name. A recorded hub name the
    cache lacks is one line naming the checkpoint; a hub CLOOB is refused as the flag is."""
    from ccld.models import frozen_files
    from ccld.models.checkpoint_files import read_safetensors
    pinned = f'hf://alice/ae@{COMMIT}/tiny_ae'
    resolved = hub.resolve_autoencoder('hf://alice/ae', '--vqgan-model')
    assert frozen_files.recorded(frozen_files.AUTOENCODER, resolved) == pinned
    ckpt = tiny.save_ccld_checkpoint(tmp_path / 'hub_ae.ckpt', offline.ema, offline.ema, {
        **offline.record, 'autoencoder': pinned}, global_step=5)
    export = tmp_path / 'hub_ae.safetensors'
    assert run_tool(export_model, 'export_model.py', [ckpt, export, '--dtype', 'fp32']) == 0
    assert read_safetensors(export)[1]['autoencoder'] == pinned
    local = sample_to(tmp_path / 'local', '--checkpoint', offline.export, '--autoencoder',
                      offline.autoencoder, '--cloob-checkpoint', offline.cloob)
    for model in (ckpt, export):
        assert np.array_equal(sample_to(tmp_path / model.suffix[1:], '--checkpoint', model),
                              local)
    capsys.readouterr()
    for key, name, message in (
            ('autoencoder', f'hf://alice/ae@{"0" * 40}/tiny_ae', f'{ckpt} records the '
             f'autoencoder: hf://alice/ae@{"0" * 40}/tiny_ae: revision {"0" * 40} of alice/ae '
             'is not in the hub cache'),
            ('cloob_checkpoint', 'hf://alice/cloob', f'{ckpt} records the CLOOB: '
             'hf://alice/cloob: CLOOB checkpoints are pickles')):
        tiny.save_ccld_checkpoint(ckpt, offline.ema, offline.ema,
                                  {**offline.record, 'autoencoder': pinned, key: name})
        assert run_tool(sample, 'sample.py', [*SAMPLE_ARGS, '--output-dir', tmp_path / key,
                                              '--checkpoint', ckpt]) == 2
        line = one_line(capsys)
        assert line.startswith(f'sample.py: error: {message}'), line
        assert not (tmp_path / key).exists()


@pytest.mark.parametrize('flag, name, message', [
    ('--checkpoint', 'hf://alice/nothing', 'alice/nothing is not in the hub cache'),
    ('--checkpoint', 'hf://alice/tiny/other.safetensors',
     'other.safetensors of alice/tiny at main is not in the hub cache (it holds '
     'model.safetensors)'),
    ('--checkpoint', 'hf://alice/tiny@v2', 'revision v2 of alice/tiny is not in the hub cache'),
    ('--checkpoint', 'hf://datasets/alice/tiny', 'names a dataset repository; --checkpoint '
     'takes a model repository'),
    ('--lora', 'hf://alice/nothing:0.5', 'alice/nothing is not in the hub cache'),
    ('--autoencoder', 'hf://alice/tiny', 'holds none autoencoders'),
    ('--cloob-checkpoint', 'hf://alice/cloob', 'CLOOB checkpoints are pickles'),
])
def test_what_cannot_be_had_from_the_hub_is_one_line_exit_2(offline, tmp_path, capsys, flag,
                                                            name, message):
    argv = {'--checkpoint': offline.export, '--autoencoder': offline.autoencoder,
            '--cloob-checkpoint': offline.cloob, flag: name}
    code = run_tool(sample, 'sample.py', [*SAMPLE_ARGS, '--output-dir', tmp_path,
                                          *[a for pair in argv.items() for a in pair]])
    line = one_line(capsys)
    assert code == 2 and line.startswith(f'sample.py: error: {flag}: ') and message in line, line
    if 'cache' in message:
        assert 'HF_HUB_OFFLINE is set' in line
    assert not list(tmp_path.glob('*.png'))


def test_offline_from_the_environment_in_a_fresh_process(shared):
    """HF_HUB_OFFLINE=1 and HF_HUB_CACHE as a user sets them (huggingface_hub reads them
    as it is imported): what is cached resolves, what is not is one line, exit 2."""
    env = dict(os.environ, HF_HUB_OFFLINE='1', HF_HUB_CACHE=str(shared.cache))
    code = ('import sys; from ccld import cli; from ccld.models import hub; '
            'cli.run(lambda: print(hub.resolve(sys.argv[1], "--checkpoint")), "sample.py")')
    run = subprocess.run([sys.executable, '-c', code, 'hf://alice/tiny'], cwd=ROOT,
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.stdout.strip() == str(shared.snapshot / 'model.safetensors'), run.stderr
    run = subprocess.run([sys.executable, '-c', code, 'hf://alice/tiny@v2'], cwd=ROOT,
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 2 and run.stderr.strip() == (
        'sample.py: error: --checkpoint: hf://alice/tiny@v2: revision v2 of alice/tiny is not '
        'in the hub cache, and HF_HUB_OFFLINE is set: fetch it once online, or pass a local '
        'file.'), run.stderr


def test_without_file_a_repository_of_several_models_needs_its_card_or_a_name(offline):
    two = {'a.safetensors': b'a', 'b.ckpt': b'b'}
    put_in_cache(offline.cache, 'alice/two', two)
    with pytest.raises(UserError, match=r'holds 2 model files \(a.safetensors, b.ckpt\); name '
                       r'one: hf://alice/two/FILE'):
        hub.resolve('hf://alice/two', '--checkpoint')
    card = b'---\nlicense: mit\nccld:\n  model_file: b.ckpt\n---\n'
    put_in_cache(offline.cache, 'alice/two', {**two, 'README.md': card}, commit='1' * 40)
    assert hub.resolve('hf://alice/two', '--checkpoint').endswith(f'{"1" * 40}/b.ckpt')
    assert hub.resolve(f'hf://alice/two@{COMMIT}/a.safetensors', 'x').endswith('a.safetensors')


def test_an_autoencoder_ckpt_from_the_hub_must_hold_weights_alone(offline):
    state = torch.load(f'{offline.autoencoder}.ckpt', weights_only=True)
    path = offline.dir / 'unsafe.ckpt'
    torch.save({**state, 'where': pathlib.PurePosixPath('/tmp')}, path)
    put_in_cache(offline.cache, 'alice/unsafe', {'kl.yaml': Path(f'{offline.autoencoder}.yaml'),
                                                 'kl.ckpt': path})
    with pytest.raises(UserError, match='holds objects other than weights'):
        hub.resolve_autoencoder('hf://alice/unsafe', '--vqgan-model')


def test_records_name_a_file_from_the_hub_by_its_pinned_hub_name(offline):
    """A LoRA run names its hub base so, and reads it back from the hub cache; a finetune
    records the file it started from and its sha256, a distillation its teacher; evaluate
    names a hub checkpoint by its hub name."""
    local = hub.resolve('hf://alice/tiny', '--resume-from')
    pinned = f'hf://alice/tiny@{COMMIT}/model.safetensors'
    assert hub.name_of(local) == pinned and hub.name_of(offline.export) == str(offline.export)
    adapter = lora.read(offline.adapter)
    assert adapter.base == pinned
    assert lora.read_base(adapter, 'style.safetensors').kind == 'bare'
    resume = SimpleNamespace(kind='bare', record={})
    assert training_run.origin(SimpleNamespace(resume=resume, lora=None, resume_from=local)) == {
        'finetuned_from': pinned, 'finetuned_from_sha256': sha256(offline.export)}
    args = SimpleNamespace(vqgan_model=hub.resolve_autoencoder('hf://alice/ae', 'x'),
                           cloob_checkpoint='c', image_size=64, teacher=local,
                           teacher_sha256='t', guidance_range=[1, 8], loss_weighting='snr+1',
                           train_latents='latents', cache={'images': 5}, frozen=None, text_prob=0)
    record = distill_run.record_of(args, SimpleNamespace(name='guidance', steps=None), 1.0)
    assert (record['teacher'], record['autoencoder']) == (pinned, f'hf://alice/ae@{COMMIT}/tiny_ae')
    plms = SimpleNamespace(metadata=lambda: {'method': 'plms', 'steps': 50})
    specs = [cli.CheckpointSpec(local), cli.CheckpointSpec(str(offline.export))]
    assert evaluation.names(specs, [plms, plms]) == ['hf://alice/tiny/model.safetensors',
                                                     'model.safetensors']


def test_training_and_distillation_resolve_their_model_flags_before_any_model_loads(
        offline, tmp_path, capsys):
    paths = tiny.write_path_list(tiny.make_images(tmp_path / 'images', 2), tmp_path / 'l.txt')
    prompts = tmp_path / 'prompts.txt'
    prompts.write_text('a fox\n')
    common = ['--vqgan-model', 'hf://alice/ae', '--cloob-checkpoint', offline.cloob,
              '--demo-prompts', prompts, '--output-dir', tmp_path / 'out', '--image-size', '64']
    assert run_tool(train_latent_diffusion, 'train_latent_diffusion.py', [
        *common, '--train-set', paths, '--autoencoder-scale', '1.5', '--resume-from',
        'hf://alice/gone']) == 2
    assert one_line(capsys).endswith("--resume-from: hf://alice/gone: alice/gone is not in the "
                                     "hub cache (" + str(offline.cache) + "), and HF_HUB_OFFLINE "
                                     "is set: fetch it once online, or pass a local file.")
    assert run_tool(distill, 'distill.py', [*common, '--train-latents', tmp_path,
                                            '--teacher', 'hf://alice/tiny@v3']) == 2
    assert 'distill.py: error: --teacher: hf://alice/tiny@v3: revision v3' in one_line(capsys)


class FakeHub:
    """huggingface_hub's HfApi calls an upload makes, recorded (with the files' contents
    as they are when committed; `commits`: (repository, type, files) of each) instead of
    sent."""

    def __init__(self, monkeypatch, public_repo=False, logged_in=True):
        from huggingface_hub import HfApi
        from huggingface_hub.errors import LocalTokenNotFoundError
        self.calls, self.files, self.commits = [], {}, []

        def whoami(api, *args, **kwargs):
            if not logged_in:
                raise LocalTokenNotFoundError('Token is required (`token=True`), but no token '
                                              'found.')
            self.calls.append(('whoami',))
            return {'name': 'alice'}

        def create_repo(api, repo_id, **kwargs):
            self.calls.append(('create_repo', repo_id, kwargs))

        def repo_info(api, repo_id, **kwargs):
            return SimpleNamespace(private=not public_repo)

        def create_commit(api, repo_id, operations, **kwargs):
            self.calls.append(('create_commit', repo_id, kwargs['repo_type']))
            files = {op.path_in_repo: (op.path_or_fileobj, Path(op.path_or_fileobj).read_bytes())
                     for op in operations}
            self.commits.append((repo_id, kwargs['repo_type'], files))
            self.files.update(files)
            return SimpleNamespace(commit_url=f'https://huggingface.co/{repo_id}/commit/1')
        for name, method in (('whoami', whoami), ('create_repo', create_repo),
                             ('repo_info', repo_info), ('create_commit', create_commit)):
            monkeypatch.setattr(HfApi, name, method)


@pytest.fixture
def online(shared, monkeypatch):
    """The hub cache of `shared`, online (the base's card is there, so nothing is fetched)."""
    from huggingface_hub import constants
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(shared.cache))
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', False)
    return shared


def test_push_to_hub_uploads_the_export_its_card_and_sample_grid_and_nothing_else(
        online, tmp_path, monkeypatch, capsys):
    fake = FakeHub(monkeypatch)
    work = tmp_path / 'work'
    work.mkdir()
    (work / 'secret.txt').write_text('not for the hub')
    monkeypatch.chdir(work)
    prompts = tmp_path / 'card_prompts.txt'
    prompts.write_text('a red fox\n# a comment\na blue boat:5\n')
    out = work / 'shared.safetensors'
    assert run_tool(export_model, 'export_model.py', [
        online.ckpt, out, '--push-to-hub', 'alice/tiny-share', '--private', '--card-prompts',
        prompts, '--dtype', 'fp32']) == 0
    assert fake.calls[0] == ('whoami',)  # logged in, before anything was made
    assert fake.calls[1:] == [('create_repo', 'alice/tiny-share',
                               {'repo_type': 'model', 'private': True, 'exist_ok': True,
                                'space_sdk': None}),
                              ('create_commit', 'alice/tiny-share', 'model')]
    assert set(fake.files) == {'shared.safetensors', 'README.md', 'samples.png'}
    assert fake.files['shared.safetensors'] == (str(out), out.read_bytes())
    assert not any(Path(path).parent == work for name, (path, _) in fake.files.items()
                   if name != 'shared.safetensors')
    assert f'Sample with: {cli.sample_command("hf://alice/tiny-share")}\n' in \
        capsys.readouterr().err

    from huggingface_hub import ModelCard
    card = ModelCard(fake.files['README.md'][1].decode())
    assert card.data.to_dict() == {
        'license': 'mit', 'library_name': 'ccld', 'pipeline_tag': 'text-to-image',
        'tags': ['ccld', 'text-to-image', 'latent-diffusion', 'cloob'],
        'base_model': 'base-owner/base', 'base_model_relation': 'finetune',
        'datasets': ['someone/wikiart'], 'ccld': {'model_file': 'shared.safetensors'}}
    for said in ('finetuned from hf://base-owner/base@', '| U-Net level widths | 64,64,64,64',
                 '| image size | 64 px |', '| autoencoder scale | 1.5 |', '`tiny_ae`',
                 '`hf://someone/wikiart`, 80 images', '321 optimizer steps',
                 '--checkpoint hf://alice/tiny-share', '1. a red fox', '2. a blue boat:5',
                 '![samples](samples.png)'):
        assert said in card.text, said

    # The grid is sample.py's images of the card's prompts, -n 1 --seed 0, tiled.
    made = tmp_path / 'by_sample_py'
    assert run_tool(sample, 'sample.py', [
        '--prompts-file', prompts, '--checkpoint', out, '--autoencoder', online.autoencoder,
        '--cloob-checkpoint', online.cloob, '-n', '1', '--seed', '0', '--no-grid',
        '--device', 'cpu', '--output-dir', made]) == 0
    tiles = [pixels(p) for p in sorted(made.glob('*.png'))]
    grid_file = tmp_path / 'grid.png'
    grid_file.write_bytes(fake.files['samples.png'][1])
    assert np.array_equal(pixels(grid_file), np.concatenate(tiles, axis=1))


def test_card_only_writes_the_card_of_an_adapter_or_a_student_and_uploads_nothing(
        offline, tmp_path, monkeypatch):
    """Offline too. The adapter's grid is sampled on its base (from the hub, by its pinned
    name)."""
    online = offline
    fake = FakeHub(monkeypatch, logged_in=False)
    card_dir, prompts = tmp_path / 'card', tmp_path / 'prompts.txt'
    prompts.write_text('a green hill\n')
    adapter = tmp_path / 'style.safetensors'
    assert run_tool(export_model, 'export_model.py', [
        online.lora_ckpt, adapter, '--card-only', card_dir, '--push-to-hub', 'alice/style',
        '--license', 'apache-2.0', '--card-prompts', prompts]) == 0
    assert sorted(p.name for p in card_dir.iterdir()) == ['README.md', 'samples.png']
    from huggingface_hub import ModelCard
    card = ModelCard.load(card_dir / 'README.md')
    assert (card.data.license, card.data.base_model, card.data.base_model_relation,
            card.data.tags[-1]) == ('apache-2.0', 'alice/tiny', 'adapter', 'lora')
    assert 'A LoRA adapter (rank 4) for the model hf://alice/tiny@' in card.text
    assert f'--checkpoint hf://alice/tiny@{COMMIT}/model.safetensors --lora hf://alice/style' \
        in card.text
    made = tmp_path / 'by_sample_py'
    assert run_tool(sample, 'sample.py', [
        'a green hill', '--checkpoint', online.export, '--lora', adapter, '--autoencoder',
        online.autoencoder, '--cloob-checkpoint', online.cloob, '-n', '1', '--seed', '0',
        '--device', 'cpu', '--output-dir', made]) == 0
    assert np.array_equal(pixels(card_dir / 'samples.png'), pixels(made / 'out_00000.png'))

    from ccld.models.student import StudentModel
    student = StudentModel(tiny.BASE_CHANNELS, tiny.CHANNEL_MULTIPLIERS, 1.5)
    teacher = f'hf://alice/tiny@{COMMIT}/model.safetensors'
    ckpt = tiny.save_ccld_checkpoint(tmp_path / 'student.ckpt', student, student, {
        **online.record, 'teacher': teacher, 'teacher_sha256': 'e' * 64, 'student_steps': 4,
        'guidance_range': [1.0, 8.0]})
    assert run_tool(export_model, 'export_model.py', [
        ckpt, tmp_path / 'student.safetensors', '--card-only', card_dir, '--no-card-grid']) == 0
    card = ModelCard.load(card_dir / 'README.md')
    assert (card.data.base_model, card.data.tags[-1], card.data.license) == \
        ('alice/tiny', 'distillation', 'other')
    assert 'A student distilled from hf://alice/tiny@' in card.text
    assert '--checkpoint student.safetensors' in card.text  # no repository: the file
    assert not (card_dir / 'samples.png').exists()  # (the adapter's card's, replaced)
    assert fake.calls == []


@pytest.mark.parametrize('extra, fake_hub, message', [
    (['--push-to-hub', 'alice/tiny-share'], dict(logged_in=False),
     "--push-to-hub: not logged in to the hub (Token is required (`token=True`), but no token "
     "found.); log in with `hf auth login` (a token that can write to alice)."),
    (['--push-to-hub', 'alice/tiny-share', '--private'], dict(public_repo=True),
     '--private: the model repository alice/tiny-share exists and is public; make it private '
     'on the hub first (its Settings), or drop --private.'),
    (['--push-to-hub', 'not a name'], {}, '--push-to-hub: not a name is not a repository name '
     'OWNER/NAME'),
    (['--private'], {}, '--private is about sharing the export: pass --push-to-hub OWNER/NAME or '
     '--card-only DIR too.'),
])
def test_push_refusals_are_one_line_exit_2(online, tmp_path, monkeypatch, capsys, extra,
                                           fake_hub, message):
    fake = FakeHub(monkeypatch, **fake_hub)
    out = tmp_path / 'shared.safetensors'
    assert run_tool(export_model, 'export_model.py', [online.ckpt, out, '--no-card-grid',
                                                      *extra]) == 2
    assert one_line(capsys).startswith(f'export_model.py: error: {message}')
    assert not any(call[0] == 'create_commit' for call in fake.calls)


def test_a_grid_whose_models_are_not_here_is_refused_before_the_export(online, tmp_path,
                                                                       capsys):
    released = tiny.save_bare(online.ema, tmp_path / 'released.pth')
    out = tmp_path / 'released.safetensors'
    assert run_tool(export_model, 'export_model.py', [released, out, '--card-only',
                                                      tmp_path / 'card']) == 2
    assert "the card's sample grid needs the autoencoder and CLOOB" in one_line(capsys)
    assert not out.exists()


def test_the_web_page_takes_hub_names_as_sample_py_does(offline, tmp_path):
    """app.py --checkpoint hf://... --lora hf://... --autoencoder hf://...: the page's engine
    reads them from the cache offline and its job gives the local files' pixels."""
    import app
    from ccld.app.engine import Engine
    engine = Engine(app.parser().parse_args([
        '--checkpoint', 'hf://alice/tiny', '--lora', 'hf://alice/style', '--autoencoder',
        'hf://alice/ae', '--cloob-checkpoint', offline.cloob, '--device', 'cpu']))
    (model,) = engine.models.values()
    (adapter,) = model.adapters
    result = engine.run(dict(prompt='a red fox', model=model.name, n=1, seed=7, steps=2,
                             method='ddim', lora=adapter, lora_strength=0.5))
    styled = sample_to(tmp_path / 'styled', '--checkpoint', offline.export, '--lora',
                       f'{offline.adapter}:0.5', '--autoencoder', offline.autoencoder,
                       '--cloob-checkpoint', offline.cloob)
    assert len(result.paths) == 1 and np.array_equal(pixels(result.paths[0]), styled)

"""evaluate.py and its library (ccld.sample.evaluation, distances, features, reference_set,
gallery, report) on tiny random models written through the real formats."""

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import sample
import tiny
from ccld.data.images import image_transform, load_image
from ccld import cli
from ccld.errors import UserError
from ccld.models.cloob import load_cloob
from ccld.models.student import student_of
from ccld.sample import distances, evaluation, features, generate, reference_set
from ccld.sample.prompts import slug
from ccld.sample.sampler import Settings
from ccld.train.distill_run import write_student

ROOT = Path(__file__).resolve().parent.parent
SCALE = 1.5
SIZE, N, STEPS = 64, 2, 2
PROMPTS = 'a red fox\n# a comment\n\na hen:2\n'
PROMPT_LINES = [(1, 'a red fox', 3.0), (4, 'a hen', 2.0)]


def save_student(path, model):
    write_student(path, model, {'student_steps': 1, 'guidance_range': [1.0, 8.0]}, 0)
    return path


@pytest.fixture(scope='module')
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp('evaluate')
    ema, trained = (tiny.tiny_diffusion(seed=s, autoencoder_scale=SCALE) for s in (0, 1))
    other = tiny.tiny_diffusion(seed=2, autoencoder_scale=SCALE)
    references = tiny.make_images(d / 'reference', n=5, size=80)
    (d / 'reference' / 'broken.png').write_bytes(b'\x89PNG not really')
    (d / 'prompts.txt').write_text(PROMPTS)
    return SimpleNamespace(
        dir=d,
        autoencoder=tiny.tiny_autoencoder(d),
        cloob=tiny.tiny_cloob(d),
        bare=tiny.save_bare(ema, d / 'bare.pth'),
        # The same EMA weights in a training checkpoint: the same model in another file.
        ccld=tiny.save_ccld_checkpoint(d / 'run.ckpt', trained, ema),
        other=tiny.save_bare(other, d / 'other.pth'),
        # A progressive student distilled for 1 step (fresh: bare.pth's model, w ignored).
        student=save_student(d / 'student.ckpt', student_of(ema)),
        references=references,
        reference_list=tiny.write_path_list([*references[:3], d / 'reference' / 'broken.png',
                                             *references[3:]], d / 'reference.txt'),
        prompts=d / 'prompts.txt',
    )


def sampling_args(assets, out, *extra):
    """Flags that sample.py and evaluate.py share."""
    return ['--autoencoder', assets.autoencoder, '--cloob-checkpoint', str(assets.cloob),
            '--prompts-file', str(assets.prompts), '-n', str(N), '--steps', str(STEPS),
            '--method', 'ddim', '--size', str(SIZE), '--device', 'cpu', '--output-dir',
            str(out), *extra]


def base_args(assets, out, *extra):
    return sampling_args(assets, out, '--num-workers', '0', *extra)


def subprocess_env():
    """A process started here imports this checkout's code."""
    path = [str(ROOT), str(ROOT / 'latent-diffusion'), os.environ.get('PYTHONPATH', '')]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, path)))


def run_evaluate(argv):
    return tiny.exit_code(evaluate.main, 'evaluate.py', argv)


def compare_args(assets, out, *extra):
    """The three checkpoints against the reference set, in CLOOB features."""
    return base_args(assets, out, '--checkpoint', str(assets.bare), '--checkpoint',
                     str(assets.ccld), '--checkpoint', str(assets.other), '--reference-set',
                     str(assets.reference_list), '--features', 'cloob', *extra)


@pytest.fixture(scope='module')
def evaluated(assets):
    out = assets.dir / 'eval'
    assert run_evaluate(compare_args(assets, out)) == 0
    return SimpleNamespace(out=out, report=json.loads((out / 'report.json').read_text()))


def pixels(path):
    with Image.open(path) as image:
        return np.asarray(image.convert('RGB'))


def images_of(report, out, column):
    """The PNGs of one column, in (prompt, index) order."""
    folder = out / report['checkpoints'][column]['images']
    return [folder / f'{line:05}_{slug(text)}_{i:05}.png'
            for line, text, _ in PROMPT_LINES for i in range(N)]


def as_bytes(paths):
    """PNG files -> 8-bit [n, 3, H, W]."""
    return torch.stack([torch.from_numpy(pixels(p)).permute(2, 0, 1) for p in paths])


def reference_bytes(assets):
    """The readable reference images as generated ones are: the training transform to the
    size, then 8 bits."""
    return torch.stack([(image_transform(SIZE)(load_image(p)) * 255).round().byte()
                        for p in assets.references])


def refuse_models(monkeypatch):
    def load_model(*args, **kwargs):
        raise AssertionError('a diffusion model was loaded')
    monkeypatch.setattr(generate, 'load_model', load_model)


# The maths, against closed forms.

def test_frechet_distance_is_zero_to_itself_and_the_squared_mean_shift_at_equal_covariance():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6))  # correlated, full rank
    stats = distances.statistics(x)
    assert abs(distances.frechet_distance(stats, stats)) < 1e-9
    shift = rng.normal(size=6)  # x + shift has exactly the covariance of x
    assert distances.frechet_distance(stats, distances.statistics(x + shift)) == \
        pytest.approx((shift ** 2).sum(), rel=1e-9)


def expected_kid(shift_squared, d):
    """E[MMD^2] under the kernel (x.y / d + 1)^3 between N(0, I) and N(b, I) in d
    dimensions, |b|^2 = B: from the moments of the dot products, E[k(X, X')] = 1 + 3/d,
    E[k(X, Y)] = 1 + 3 (B + d) / d^2 and E[k(Y, Y')] = E[(v/d + 1)^3] with v = Y.Y',
    E v = B, E v^2 = B^2 + 2B + d, E v^3 = B^3 + 6B^2 + 3Bd + 6B."""
    B = shift_squared
    return (B ** 3 + 6 * B ** 2 + 3 * B * d + 6 * B) / d ** 3 + 3 * B ** 2 / d ** 2 + 3 * B / d


@pytest.mark.parametrize('shift_squared', [0.0, 1.0, 4.0])
def test_kid_is_the_unbiased_squared_mmd(shift_squared):
    d, rng = 16, np.random.default_rng(1)
    shift = np.zeros(d)
    shift[0] = shift_squared ** 0.5
    x, y = rng.normal(size=(1000, d)), rng.normal(size=(1000, d)) + shift
    kid, spread = distances.kernel_distance(x, y, subsets=10, subset_size=500)
    expected = expected_kid(shift_squared, d)
    if shift_squared:
        assert kid == pytest.approx(expected, rel=0.15) and kid > 0
    else:
        assert abs(kid) < 0.01  # unbiased: near 0, either sign
    assert spread > 0
    assert distances.kernel_distance(x[:1], y) is None


def mmd_by_hand(x, y):
    """The unbiased squared MMD of two sets of m features under (x.y / d + 1)^3."""
    m, d = len(x), x.shape[1]
    kxx, kyy, kxy = ((p @ q.T / d + 1) ** 3 for p, q in ((x, x), (y, y), (x, y)))
    same = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return same - 2 * kxy.mean()


def test_kid_of_more_images_than_the_reference_takes_subsets_of_the_reference_size():
    """6 generated images (one image 6 times), 5 reference: every subset of 5 is the whole
    reference and 5 copies of the image, so the KID is their MMD, computed by hand, with
    no spread (subsets of 4 would leave out a reference image in turn)."""
    rng = np.random.default_rng(2)
    generated, reference = np.repeat(rng.normal(size=(1, 8)), 6, 0), rng.normal(size=(5, 8))
    kid, spread = distances.kernel_distance(generated, reference)
    assert kid == pytest.approx(mmd_by_hand(generated[:5], reference), rel=1e-9)
    assert spread < 1e-9


def frechet_by_hand(a, b):
    """A second implementation, for sets a of few features: the nonzero eigenvalues of
    S_a S_b are those of the small PSD matrix A S_b A^T / (n_a - 1), where A is a's
    centred features, so tr((S_a S_b)^1/2) is the sum of their square roots."""
    centred, s_b = a - a.mean(0), np.cov(b, rowvar=False)
    small = centred @ s_b @ centred.T / (len(a) - 1)
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(small), 0, None)).sum()
    trace_a = (centred ** 2).sum() / (len(a) - 1)
    return ((a.mean(0) - b.mean(0)) ** 2).sum() + trace_a + np.trace(s_b) - 2 * cross


# One run of three checkpoints: bare.pth and run.ckpt hold the same model.

def test_the_same_model_gives_the_same_images_in_every_column_and_those_of_sample_py(
        assets, evaluated, tmp_path, capsys):
    report, out = evaluated.report, evaluated.out
    bare, ccld, other = (images_of(report, out, c) for c in range(3))
    for a, b, c in zip(bare, ccld, other):
        assert np.array_equal(pixels(a), pixels(b))
        assert np.abs(pixels(a).astype(int) - pixels(c)).max() > 10
    # sample.py, same flags: the same images, and --score gives each its recorded score.
    argv = ['--checkpoint', str(assets.bare), *sampling_args(assets, tmp_path, '--score',
                                                               '--no-grid')]
    capsys.readouterr()
    assert tiny.exit_code(sample.main, 'sample.py', argv) == 0
    printed = dict(line.split('\tcloob_score ') for line in capsys.readouterr().out.splitlines())
    scores = []
    for ours in bare:
        theirs = tmp_path / ours.name
        assert np.array_equal(pixels(ours), pixels(theirs))
        with Image.open(ours) as a, Image.open(theirs) as b:
            assert a.text['cloob_score'] == b.text['cloob_score']
            scores.append(float(b.text['cloob_score']))
        assert float(printed[ours.name]) == pytest.approx(scores[-1], abs=1e-4)
    per_prompt = np.array(scores).reshape(len(PROMPT_LINES), N).mean(1)
    entry = report['checkpoints'][0]
    assert entry['cloob_score'] == pytest.approx(per_prompt.mean())
    assert entry['cloob_score_std'] == pytest.approx(per_prompt.std())
    assert [p['cloob_scores'][0] for p in report['prompts']] == pytest.approx(per_prompt)


def test_the_report_holds_every_checkpoint_in_order_with_its_numbers(assets, evaluated):
    report, out = evaluated.report, evaluated.out
    entries = report['checkpoints']
    assert [e['name'] for e in entries] == ['bare.pth', 'run.ckpt', 'other.pth']
    for entry, path in zip(entries, (assets.bare, assets.ccld, assets.other)):
        assert entry['sha256'] == hashlib.sha256(Path(path).read_bytes()).hexdigest()
        assert entry['samples'] == len(PROMPT_LINES) * N
        assert {k: entry['settings'][k] for k in ('seed', 'n', 'method', 'steps', 'size')} == \
            {'seed': 0, 'n': N, 'method': 'ddim', 'steps': STEPS, 'size': SIZE}
        assert entry['kid'] is not None and entry['kid_std'] >= 0
    assert [e['kind'] for e in entries] == ['a released model state dict',
                                            'a ccld training checkpoint',
                                            'a released model state dict']
    # The unreadable reference image is skipped and counted.
    assert report['reference_set']['images'] == 5 and report['reference_set']['skipped'] == 1
    assert report['features']['network'] == 'cloob-image-tower'
    assert [(p['line'], p['text'], p['weight']) for p in report['prompts']] == PROMPT_LINES
    # The Frechet distance, from CLOOB embeddings of the PNGs and of the reference images
    # brought to the same size and 8 bits, by a second implementation.
    cloob = load_cloob(str(assets.cloob))

    def embed(images):
        with torch.no_grad():
            return cloob.embed_images(images.float() / 255).double().numpy()
    reference = embed(reference_bytes(assets))
    for column, entry in enumerate(entries):
        generated = embed(as_bytes(images_of(report, out, column)))
        assert entry['frechet_distance'] == pytest.approx(frechet_by_hand(generated, reference),
                                                          rel=1e-6)
    assert entries[0]['frechet_distance'] == entries[1]['frechet_distance'] != \
        entries[2]['frechet_distance']
    table = (out / 'report.md').read_text()
    for entry in entries:
        assert re.search(rf'\| {re.escape(entry["name"])} \| ddim, {STEPS} steps, spliced schedule '
                         rf'\| {entry["frechet_distance"]:.4g} \|', table)


def test_one_grid_per_prompt_a_column_per_checkpoint_and_a_row_per_seed(evaluated):
    report, out = evaluated.report, evaluated.out
    assert sorted(p.name for p in (out / 'grids').iterdir()) == \
        sorted(Path(p['grid']).name for p in report['prompts'])
    for row_of_prompts, prompt in enumerate(report['prompts']):
        with Image.open(out / prompt['grid']) as grid:
            meta, canvas = grid.text, np.asarray(grid.convert('RGB'))
        left, top, size = int(meta['left']), int(meta['top']), int(meta['tile_size'])
        assert size == SIZE and left > 0 and top > 0  # room for the labels
        assert json.loads(meta['columns']) == [e['name'] for e in report['checkpoints']]
        assert json.loads(meta['rows']) == [f'seed 0 #{i}' for i in range(N)]
        assert meta['prompt'] == prompt['text']
        assert canvas.shape == (top + N * SIZE, left + 3 * SIZE, 3)
        for c in range(3):
            for i in range(N):
                tile = canvas[top + i * SIZE:top + (i + 1) * SIZE,
                              left + c * SIZE:left + (c + 1) * SIZE]
                path = images_of(report, out, c)[row_of_prompts * N + i]
                assert np.array_equal(tile, pixels(path))
        assert canvas[:top].min() < 128  # the labels are drawn


def test_a_size_that_is_not_square_reaches_the_images_grids_report_and_reference_set(
        assets, tmp_path):
    """--size 128x64: every image is 128 x 64 and says so, the grids tile them so, the
    report and page state it, and the reference images are brought to it as --init
    images are (resized to cover, centre-cropped: here with Pillow alone)."""
    width, height = 128, 64
    out = tmp_path / 'eval'
    argv = base_args(assets, out, '--checkpoint', str(assets.bare), '--checkpoint',
                     str(assets.other), '--reference-set', str(assets.reference_list),
                     '--features', 'cloob', '--size', f'{width}x{height}')
    assert run_evaluate(argv) == 0
    report = json.loads((out / 'report.json').read_text())
    for column, entry in enumerate(report['checkpoints']):
        assert {k: entry['settings'][k] for k in ('size', 'width', 'height')} == \
            {'size': '128x64', 'width': width, 'height': height}
        for path in images_of(report, out, column):
            with Image.open(path) as image:
                assert image.size == (width, height)
                assert (image.text['width'], image.text['height']) == ('128', '64')
    for row_of_prompts, prompt in enumerate(report['prompts']):
        with Image.open(out / prompt['grid']) as grid:
            meta, canvas = grid.text, np.asarray(grid.convert('RGB'))
        left, top = int(meta['left']), int(meta['top'])
        assert (meta['tile_width'], meta['tile_height']) == ('128', '64')
        assert 'tile_size' not in meta
        assert canvas.shape == (top + N * height, left + 2 * width, 3)
        for c in range(2):
            for i in range(N):
                tile = canvas[top + i * height:top + (i + 1) * height,
                              left + c * width:left + (c + 1) * width]
                path = images_of(report, out, c)[row_of_prompts * N + i]
                assert np.array_equal(tile, pixels(path))
    assert '128x64 px' in (out / 'report.md').read_text()
    factor = -(-256 // height)  # the page shows tiles at least 256 px on their shorter side
    page = (out / 'index.html').read_text()
    assert f'width="{(left + 2 * width) * factor}" height="{(top + N * height) * factor}"' in page
    # The 80 x 80 references: scaled to 128 x 128, the middle 64 rows.
    cloob = load_cloob(str(assets.cloob))
    covered = [np.asarray(Image.open(path).convert('RGB').resize((128, 128), Image.LANCZOS)
                          .crop((0, 32, 128, 96))) for path in assets.references]
    references = torch.from_numpy(np.stack(covered)).permute(0, 3, 1, 2)

    def embed(images):
        with torch.no_grad():
            return cloob.embed_images(images.float() / 255).double().numpy()
    for column, entry in enumerate(report['checkpoints']):
        generated = embed(as_bytes(images_of(report, out, column)))
        assert entry['frechet_distance'] == pytest.approx(
            frechet_by_hand(generated, embed(references)), rel=1e-6)


class Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links, self.text = [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for key in ('src', 'href'):
            if key in attrs:
                self.links.append(attrs[key])

    def handle_data(self, data):
        self.text.append(data)


def test_the_gallery_shows_every_grid_with_its_prompt_from_relative_links(evaluated):
    parser = Links()
    parser.feed((evaluated.out / 'index.html').read_text(encoding='utf-8'))
    assert parser.links
    for link in parser.links:
        assert '://' not in link and not link.startswith('/'), link
        assert (evaluated.out / link).is_file(), link
    grids = {p['grid'] for p in evaluated.report['prompts']}
    assert grids <= set(parser.links)
    text = ' '.join(parser.text)
    for _, prompt, _ in PROMPT_LINES:
        assert prompt in text


def test_a_rerun_keeps_the_images_and_reuses_the_reference_features(assets, evaluated,
                                                                    tmp_path, monkeypatch):
    out = tmp_path / 'eval'
    shutil.copytree(evaluated.out, out)
    made = {p: p.stat().st_mtime_ns for p in out.glob('images/*/*.png')}
    refuse_models(monkeypatch)

    def compute(*args, **kwargs):
        raise AssertionError('the reference features were computed again')
    monkeypatch.setattr(reference_set, 'compute', compute)
    assert run_evaluate(compare_args(assets, out)) == 0
    assert {p: p.stat().st_mtime_ns for p in out.glob('images/*/*.png')} == made
    report = json.loads((out / 'report.json').read_text())
    assert report['reference_set']['from_cache'] and not \
        evaluated.report['reference_set']['from_cache']
    for ours, first in zip(report['checkpoints'], evaluated.report['checkpoints']):
        for key in ('frechet_distance', 'kid', 'cloob_score'):
            assert ours[key] == first[key]


def test_an_interrupted_run_resumes_on_two_processes_keeping_what_was_made(assets, evaluated,
                                                                           tmp_path,
                                                                           monkeypatch):
    """Ctrl-C after the first unit (a checkpoint's images of one prompt); the same command
    on two processes makes the rest, each unit once, and the report of one whole run."""
    out = tmp_path / 'eval'
    write_samples, units = generate.write_samples, []

    def interrupt_after_one(batches, directory, prefix, *args, **kwargs):
        if units:
            raise KeyboardInterrupt
        units.append(prefix)
        return write_samples(batches, directory, prefix, *args, **kwargs)
    monkeypatch.setattr(generate, 'write_samples', interrupt_after_one)
    argv = compare_args(assets, out)
    assert run_evaluate(argv) == 130
    monkeypatch.undo()
    first = {p: p.stat().st_mtime_ns for p in out.glob('images/*/*.png')}
    assert len(first) == N and not (out / 'report.json').exists()

    result = subprocess.run([sys.executable, str(ROOT / 'evaluate.py'), *argv, '--num-gpus', '2'],
                            env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'on 2 process(es)' in result.stderr
    assert {p: p.stat().st_mtime_ns for p in first} == first  # kept, not made again
    images = sorted(p.relative_to(out) for p in out.glob('images/*/*.png'))
    assert images == sorted(p.relative_to(evaluated.out)
                            for p in evaluated.out.glob('images/*/*.png'))
    for image in images:
        assert np.array_equal(pixels(out / image), pixels(evaluated.out / image))
    report = json.loads((out / 'report.json').read_text())
    for ours, whole in zip(report['checkpoints'], evaluated.report['checkpoints']):
        for key in ('frechet_distance', 'kid', 'cloob_score', 'cloob_score_std'):
            assert ours[key] == pytest.approx(whole[key], rel=1e-9)


def test_the_processes_share_the_units_without_overlap(assets, evaluated):
    args = evaluate.parser().parse_args(compare_args(assets, evaluated.out))
    plan = evaluation.make_plan(args)
    all_units = evaluation.units(plan)
    # bare.pth's and run.ckpt's directories differ (other files), so 3 x 2 units.
    assert len(all_units) == 3 * len(PROMPT_LINES)
    shares = [[u for i, u in enumerate(all_units) if i % 2 == rank] for rank in range(2)]
    assert sorted(map(str, shares[0] + shares[1])) == sorted(map(str, all_units))
    twice = evaluation.make_plan(evaluate.parser().parse_args(
        [*compare_args(assets, evaluated.out), '--checkpoint', str(assets.bare)]))
    assert len(evaluation.units(twice)) == len(all_units)  # a file given again: sampled once
    assert [c.name for c in twice.columns][-1] == 'bare.pth (2)'


def test_wandb_gets_the_images_as_a_table_of_prompt_and_seed_rows(assets, evaluated, tmp_path,
                                                                  monkeypatch):
    monkeypatch.setenv('WANDB_MODE', 'offline')
    monkeypatch.setenv('WANDB_SILENT', 'true')
    monkeypatch.setenv('WANDB_DATA_DIR', str(tmp_path / 'wandb_data'))
    out = tmp_path / 'eval'
    shutil.copytree(evaluated.out, out)
    assert run_evaluate(compare_args(assets, out, '--wandb-project', 'ccld-test')) == 0
    tables = {path.name.split('_')[0]: json.loads(path.read_text())
              for path in out.glob('wandb/offline-run-*/files/media/table/*.table.json')}
    names = ['bare.pth', 'run.ckpt', 'other.pth']
    assert tables['images']['columns'] == ['prompt', 'line', 'seed', 'index', *names]
    assert [row[:4] for row in tables['images']['data']] == \
        [[text, line, 0, i] for line, text, _ in PROMPT_LINES for i in range(N)]
    assert all(cell == 'Image' for row in tables['images']['data'] for cell in row[4:])
    assert [row[0] for row in tables['metrics']['data']] == names


# Checkpoints with their own samplers and labels: one file at two step counts beside a
# distilled student, the run's --steps for the checkpoints without their own.

class Table(HTMLParser):
    """The rows of index.html's table, the grids' <img> attributes and the page's CSS."""

    def __init__(self):
        super().__init__()
        self.rows, self.images, self.css, self.link, self.tag = [], [], '', None, None

    def handle_starttag(self, tag, attrs):
        self.tag, attrs = tag, dict(attrs)
        if tag == 'tr':
            self.rows.append([])
        elif tag in ('td', 'th'):
            self.rows[-1].append('')
        elif tag == 'a':
            self.link = attrs.get('href')
        elif tag == 'img':
            self.images.append({**attrs, 'link': self.link})

    def handle_endtag(self, tag):
        if tag == 'a':
            self.link = None
        self.tag = None

    def handle_data(self, data):
        if self.tag == 'style':
            self.css += data
        elif self.tag in ('td', 'th'):
            self.rows[-1][-1] += data


@pytest.fixture(scope='module')
def own_samplers(assets):
    """evaluate.py on a/last.ckpt (bare.pth's model) at its own 2 steps and at the run's
    3, and a distilled 1-step student in b/last.ckpt, labelled; one prompt."""
    d = assets.dir / 'own'
    teacher, student = d / 'a' / 'last.ckpt', d / 'b' / 'last.ckpt'
    for source, link in ((assets.bare, teacher), (assets.student, student)):
        link.parent.mkdir(parents=True)
        os.link(source, link)
    (d / 'one.txt').write_text('a red fox\n')
    argv = base_args(assets, d / 'eval', '--checkpoint', f'{teacher}:steps={STEPS}',
                     '--checkpoint', str(teacher), '--checkpoint', f'{student}:label=student',
                     '--prompts-file',
                     str(d / 'one.txt'), '--steps', str(STEPS + 1))
    with pytest.warns(UserWarning) as warned:
        assert run_evaluate(argv) == 0
    out = d / 'eval'
    page = Table()
    page.feed((out / 'index.html').read_text(encoding='utf-8'))
    return SimpleNamespace(out=out, report=json.loads((out / 'report.json').read_text()),
                           markdown=(out / 'report.md').read_text(), page=page,
                           warnings=[str(w.message) for w in warned])


def test_each_checkpoint_samples_with_its_own_sampler_and_each_column_says_which(
        evaluated, own_samplers):
    report, out = own_samplers.report, own_samplers.out
    samplers = [(e['settings']['method'], e['settings']['steps']) for e in report['checkpoints']]
    assert samplers == [('ddim', STEPS), ('ddim', STEPS + 1), ('ddim', 1)]
    # FILE:steps=2 made the images of a run at --steps 2 (bare.pth in `evaluated`, the same
    # model, prompt and seed); the same file at the run's --steps 3 made others.
    at_own, at_run = ([pixels(p) for p in sorted((out / e['images']).glob('*.png'))]
                      for e in report['checkpoints'][:2])
    expected = [pixels(p) for p in images_of(evaluated.report, evaluated.out, 0)[:N]]
    assert len(at_own) == N and all(np.array_equal(a, b) for a, b in zip(at_own, expected))
    assert all(np.abs(a.astype(int) - b).max() > 10 for a, b in zip(at_own, at_run))
    # The student kept its own step, and said so.
    assert any('is a distilled student: it samples with its own ddim, 1 step, spliced' in w
               for w in own_samplers.warnings)
    # Every table states each column's own sampler; no line claims one for all.
    texts = ['ddim, 2 steps, spliced schedule', 'ddim, 3 steps, spliced schedule',
             'ddim, 1 step, spliced schedule']
    rows = [line for line in own_samplers.markdown.splitlines() if line.startswith('| a/')
            or line.startswith('| student ')]
    assert [row.split(' | ')[1] for row in rows] == texts
    assert [row[1] for row in own_samplers.page.rows[1:]] == texts
    assert 'steps' not in evaluation.reports.summary(report)
    with Image.open(out / report['prompts'][0]['grid']) as grid:
        assert json.loads(grid.text['samplers']) == ['ddim, 2 steps', 'ddim, 3 steps',
                                                     'ddim, 1 step']


def test_column_labels_are_unique_and_the_page_shows_the_grids_enlarged_and_sharp(
        own_samplers):
    report, out, page = own_samplers.report, own_samplers.out, own_samplers.page
    labels = ['a/last.ckpt (ddim, 2 steps)', 'a/last.ckpt (ddim, 3 steps)', 'student']
    assert [e['name'] for e in report['checkpoints']] == labels
    assert [row[0] for row in page.rows[1:]] == labels
    with Image.open(out / report['prompts'][0]['grid']) as grid:
        assert json.loads(grid.text['columns']) == labels
        size = grid.size
    # Each grid is shown with its 64 px tiles at 256 (a whole factor, pixels kept sharp:
    # the CSS of its class), and a click opens it at its own size.
    (image,) = page.images
    assert image['link'] == image['src'] == report['prompts'][0]['grid']
    assert (int(image['width']), int(image['height'])) == (4 * size[0], 4 * size[1])
    rules = {k.strip(): v for k, v in re.findall(r'([^{}]+)\{([^}]*)\}', page.css)}
    assert 'image-rendering:pixelated' in rules[f'img.{image["class"]}'].replace(' ', '')
    assert 'height:auto' in rules['img'].replace(' ', '')


# Inception features.

def test_inception_features_with_weights_written_locally(assets, tmp_path):
    """The Inception path, from --inception-weights to the reference features, against
    torch-fidelity's network applied here to the same 8-bit images. (The Frechet distance
    of 2048-d features is left to the CLOOB runs above: its eigenvalues cost seconds.)"""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    from ccld.data.sources import Source
    weights = tiny.inception_weights(tmp_path / 'weights-inception-2015-12-05-6726825d.pth')
    args = evaluate.parser().parse_args(base_args(
        assets, tmp_path / 'eval', '--checkpoint', str(assets.bare), '--reference-set',
        str(assets.reference_list), '--inception-weights', str(weights)))
    plan = evaluation.make_plan(args)
    assert plan.inception_weights == weights
    network = evaluation.FrozenModels(args, torch.device('cpu')).feature_network(plan)
    assert network.identity == {'network': 'inception-v3-compat', 'feature': '2048',
                                'sha256': hashlib.sha256(weights.read_bytes()).hexdigest()}
    found = reference_set.reference_features(Source(assets.reference_list), network, SIZE,
                                             tmp_path / 'cache', batch_size=4, num_workers=0)
    net = FeatureExtractorInceptionV3('inception-v3-compat', ['2048'],
                                      feature_extractor_weights_path=str(weights))
    with torch.no_grad():
        expected = net(reference_bytes(assets))[0].double().numpy()
    assert found.features.shape == (5, 2048) and found.skipped == 1
    np.testing.assert_allclose(found.features, expected, rtol=1e-5, atol=1e-7)
    assert found.features.std(0).max() > 1e-3  # the random network's features vary


def closed_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_offline_inception_without_weights_is_one_line(assets, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    name = features.INCEPTION_URL.rsplit('/', 1)[-1]
    monkeypatch.setattr(features, 'INCEPTION_URL', f'http://127.0.0.1:{closed_port()}/{name}')
    refuse_models(monkeypatch)
    argv = base_args(assets, tmp_path / 'eval', '--checkpoint', str(assets.bare),
                     '--reference-set', str(assets.reference_list))
    assert run_evaluate(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('evaluate.py: error: --features inception: ')
    assert name in err[0] and '--inception-weights PATH' in err[0]
    assert not list((tmp_path / 'eval').glob('images/*/*'))


# Mistakes: one line, exit 2, before any model loads.

@pytest.mark.parametrize('extra, message', [
    (['--checkpoint', '{dir}/tiny_ae.ckpt'], '{dir}/tiny_ae.ckpt holds no diffusion model weights'),
    (['--checkpoint', '{dir}/tiny_cloob.pkl'], 'is a plain pickle'),
    (['--checkpoint', 'missing.pth'], 'checkpoint missing.pth does not exist'),
    (['--prompts-file', 'missing.txt'], '--prompts-file missing.txt does not exist'),
    (['--prompts-file', '{dir}/bad_prompts.txt'], 'line 2: prompt '),
    (['--reference-set', 'missing.txt'], '--reference-set: path list missing.txt does not exist'),
    (['--reference-set', '{dir}/nowhere.txt'], '--reference-set: none of the first 1 paths'),
    (['--reference-set', '{dir}/reference.txt', '--inception-weights', 'missing.pth'],
     '--inception-weights missing.pth does not exist'),
    (['--reference-set', '{dir}/reference.txt', '--inception-weights', '{dir}/prompts.txt'],
     '--inception-weights {dir}/prompts.txt: cannot read it as weights'),
    (['--reference-set', '{dir}/reference.txt', '--features', 'cloob', '--reference-cache',
      '{dir}/prompts.txt'], '--reference-cache: {dir}/prompts.txt is a file'),
    (['--autoencoder', 'missing_ae'], 'autoencoder config missing_ae.yaml not found'),
    (['--cloob-checkpoint', 'missing.pkl'], 'CLOOB checkpoint missing.pkl not found'),
    (['--size', '100'], 'argument --size: 100: each side must be a multiple of 64'),
    (['--size', '384x100'], 'nearest valid sizes: 384x128, 384x64'),
    (['--method', 'ddim', '--eta', '2'], 'eta 2.0 is outside [0, 1]'),
    (['--features', 'vgg'], "argument --features: invalid choice: 'vgg'"),
    (['--checkpoint', '{dir}/other.pth:step=3'],
     "'{dir}/other.pth:step=3': expected FILE:method=M,steps=N,label=NAME"),
    (['--checkpoint', '{dir}/other.pth:method=euler'], 'method must be one of ddpm, ddim'),
    (['--checkpoint', '{dir}/other.pth:steps=0'], 'steps must be at least 1, got 0'),
    (['--checkpoint', '{dir}/other.pth:label=x', '--checkpoint', '{dir}/run.ckpt:label=x'],
     '--checkpoint: label=x is given twice'),
    (['--checkpoint', '{dir}/student.ckpt:steps=4'],
     'student.ckpt is a student distilled for 1 step of DDIM (eta 0) on the spliced schedule '
     'and samples with nothing else; drop its own method= and steps='),
    (['--base-channels', '32', '--channel-multipliers', '4,4,8,8'], 'do not give'),
    (['--reference-set', '{dir}/reference.txt', '--image-column', 'jpg'],
     'names a column of parquet files or datasets'),
    (['--reference-set', '{dir}/splits', '--dataset-split', 'val'],
     "holds the splits train, test, not 'val'"),
])
def test_user_errors(assets, tmp_path, monkeypatch, capsys, extra, message):
    (assets.dir / 'bad_prompts.txt').write_text('a fox\na cow:1,5\n')
    (assets.dir / 'nowhere.txt').write_text('/nowhere/0.png\n')
    if '--dataset-split' in extra and not (assets.dir / 'splits').exists():
        import datasets
        saved = datasets.Dataset.from_dict({'image': [None]}, features=datasets.Features(
            {'image': datasets.Image()}))
        datasets.DatasetDict({'train': saved, 'test': saved}).save_to_disk(
            str(assets.dir / 'splits'))
        capsys.readouterr()  # (datasets' progress bar)
    refuse_models(monkeypatch)
    fill = lambda s: s.format(dir=assets.dir)  # noqa: E731
    argv = [*base_args(assets, tmp_path / 'eval', '--checkpoint', str(assets.bare)),
            *map(fill, extra)]
    assert run_evaluate(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('evaluate.py: error: '), err
    assert fill(message) in err[0]
    assert not (tmp_path / 'eval').exists()  # nor an empty folder (reference_cache, images)


def test_checkpoints_that_sample_at_other_sizes_need_size(assets, tmp_path, monkeypatch,
                                                          capsys):
    big = tiny.save_ccld_checkpoint(tmp_path / 'big.ckpt', tiny.tiny_diffusion(),
                                    tiny.tiny_diffusion(), {'image_size': 128})
    refuse_models(monkeypatch)
    argv = base_args(assets, tmp_path / 'eval', '--checkpoint', str(assets.bare),
                     '--checkpoint', str(big))
    del argv[argv.index('--size'):argv.index('--size') + 2]
    assert run_evaluate(argv) == 2
    assert 'sample at different sizes (128, 256 px' in capsys.readouterr().err


def test_names_tell_files_apart_and_the_same_file_sampled_otherwise():
    specs = [cli.checkpoint_spec(text) for text in (
        'a/last.ckpt', 'b/last.ckpt', 'c/base.pth', 'c/base.pth', 'd/t.ckpt:steps=8',
        'd/t.ckpt:steps=16', 'e/t.ckpt:label=mine', 'f/x.ckpt')]
    settings = [Settings(checkpoint=spec.path, description='', autoencoder_scale=1.0, size=64,
                         method='plms', steps=spec.steps or 50, schedule='spliced', eta=0.0,
                         cond_scale=3.0, seed=0, n=1) for spec in specs]
    assert evaluation.names(specs, settings) == [
        'a/last.ckpt', 'b/last.ckpt', 'base.pth', 'base.pth (2)', 'd/t.ckpt (plms, 8 steps)',
        'd/t.ckpt (plms, 16 steps)', 'mine', 'x.ckpt']
    with pytest.raises(UserError, match='label=mine is given twice'):
        evaluation.names([cli.CheckpointSpec('a', label='mine'),
                          cli.CheckpointSpec('b', label='mine')], settings[:2])


def test_a_checkpoints_options_follow_its_last_colon_unless_the_whole_is_a_file(tmp_path):
    spec = cli.checkpoint_spec
    assert spec('runs:2/last.ckpt') == ('runs:2/last.ckpt', None, None, None)
    assert spec('C:/runs/last.ckpt:steps=8, method=plms,label=t 8') == \
        ('C:/runs/last.ckpt', 'plms', 8, 't 8')
    assert spec('C:/runs/last.ckpt:label=a=b') == ('C:/runs/last.ckpt', None, None, 'a=b')
    named = tmp_path / 'x.ckpt:steps=2'
    named.touch()
    assert spec(str(named)) == (str(named), None, None, None)


def test_the_prompt_set_that_ships_is_a_few_dozen_varied_prompts():
    from ccld.sample.prompts import read_prompts_file
    prompts = read_prompts_file(evaluation.DEFAULT_PROMPTS, 3.0)
    assert 30 <= len(prompts) <= 80
    assert len({text for _, text, _ in prompts}) == len(prompts)


def test_a_parquet_reference_set_matches_its_files_and_a_changed_file_is_recomputed(
        assets, tmp_path):
    """The reference set is read as --train-set is: a parquet file of the same images gives
    the same features; rewriting the file (new content) misses the cache."""
    from ccld.data.sources import Source
    args = evaluate.parser().parse_args(base_args(
        assets, tmp_path / 'eval', '--checkpoint', str(assets.bare), '--features', 'cloob',
        '--reference-set', str(assets.reference_list)))
    plan = evaluation.make_plan(args)
    network = evaluation.FrozenModels(args, torch.device('cpu')).feature_network(plan)
    cells = [Path(p).read_bytes() for p in assets.references]
    table = tiny.write_img2dataset_parquet(cells, tmp_path / 'parquet', per_file=len(cells))
    from_files = reference_set.reference_features(Source(assets.reference_list), network, SIZE,
                                                  tmp_path / 'cache', 4, 0)
    from_table = reference_set.reference_features(Source(table), network, SIZE,
                                                  tmp_path / 'cache', 4, 0)
    assert not from_table.cached and from_table.skipped == 0
    # (the same images in other batches: equal up to float rounding)
    np.testing.assert_allclose(from_table.features, from_files.features, rtol=1e-5, atol=1e-6)
    assert reference_set.reference_features(Source(table), network, SIZE,
                                            tmp_path / 'cache', 4, 0).cached
    tiny.write_img2dataset_parquet(cells[:3], tmp_path / 'parquet', per_file=len(cells))
    again = reference_set.reference_features(Source(table), network, SIZE, tmp_path / 'cache',
                                             4, 0)
    assert not again.cached and len(again.features) == 3


def test_the_sampling_flags_reach_every_column_as_they_reach_sample_py(assets, tmp_path,
                                                                       monkeypatch):
    """Flags away from their defaults (seed, guidance scale, schedule, eta with a batch size
    that then matters, autoencoder scale, device) give evaluate.py the images sample.py
    makes with them; and the reference set is read by --num-workers processes. The default
    device here is made one that cannot run: --device cpu must be what runs."""
    from ccld import cli
    monkeypatch.setattr(cli, 'default_device', lambda: torch.device('meta'))
    compute, asked = reference_set.compute, []

    def spy(source, network, size, batch_size, num_workers):
        asked.append(num_workers)
        return compute(source, network, size, batch_size, 0)
    monkeypatch.setattr(reference_set, 'compute', spy)
    (tmp_path / 'one.txt').write_text('a red fox\n')
    flags = ['--prompts-file', str(tmp_path / 'one.txt'), '--seed', '7', '--cond-scale', '1.5',
             '--schedule', 'karras', '--eta', '0.5', '--batch-size', '1',
             '--autoencoder-scale', '2.5', '--device', 'cpu']
    assert run_evaluate(sampling_args(assets, tmp_path / 'eval', '--checkpoint', str(assets.bare),
                                      '--reference-set', str(assets.reference_list),
                                      '--features', 'cloob', '--num-workers', '1', *flags)) == 0
    assert asked == [1]
    assert tiny.exit_code(sample.main, 'sample.py', [
        *sampling_args(assets, tmp_path / 'sample', '--checkpoint', str(assets.bare)),
        *flags, '--no-grid']) == 0
    report = json.loads((tmp_path / 'eval' / 'report.json').read_text())
    made = sorted((tmp_path / 'eval' / report['checkpoints'][0]['images']).glob('*.png'))
    expected = sorted((tmp_path / 'sample').glob('*.png'))
    assert len(made) == len(expected) == N
    for ours, theirs in zip(made, expected):
        assert np.array_equal(pixels(ours), pixels(theirs))
    default = tmp_path / 'default'
    assert tiny.exit_code(sample.main, 'sample.py', [
        *sampling_args(assets, default, '--checkpoint', str(assets.bare)), '--prompts-file',
        str(tmp_path / 'one.txt'), '--device', 'cpu', '--no-grid']) == 0
    assert not np.array_equal(pixels(made[0]), pixels(sorted(default.glob('*.png'))[0]))


def test_evaluate_asks_fabric_for_the_nodes_and_processes_of_its_flags(assets, tmp_path,
                                                                       monkeypatch):
    import lightning_fabric
    asked = {}

    class Asked(Exception):
        pass

    def fabric(**kwargs):
        asked.update(kwargs)
        raise Asked
    monkeypatch.setattr(lightning_fabric, 'Fabric', fabric)
    with pytest.raises(Asked):
        evaluate.main(base_args(assets, tmp_path / 'eval', '--checkpoint', str(assets.bare),
                                '--num-nodes', '2'))
    assert (asked['accelerator'], asked['devices'], asked['num_nodes']) == ('cpu', 1, 2)

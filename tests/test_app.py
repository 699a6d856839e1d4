"""app.py, the web page: one server (a real process, started as a user would, from a
training checkpoint alone) on a free 127.0.0.1 port, driven through gradio_client and a
real headless Chromium; its images compared with sample.py's, pixel for pixel."""

import http.client
import json
import os
import re
import socket
import struct
import subprocess
import sys
import time
import urllib.request
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import app
import sample
import tiny
from ccld import cli
from ccld.app import serve
from ccld.app.engine import Engine
from ccld.errors import UserError
from ccld.models import lora
from ccld.models.student import student_of
from ccld.sample.png_files import read_text
from ccld.train.distill_run import write_student

gradio_client = pytest.importorskip('gradio_client')
ROOT = Path(__file__).resolve().parent.parent
CHROMEDRIVER, CHROMIUM = Path('/usr/bin/chromedriver'), Path('/usr/bin/chromium')
# What the form starts with (the server's sampling flags), and what sample.py is given.
FORM = {'n': 1, 'seed': 7, 'steps': 2, 'method': 'ddim', 'size': '64'}
FIELDS = dict(prompt='', schedule='spliced', cond_scale=3.0, model='run.ckpt', lora='none',
              lora_strength=1.0, image_prompt=None, image_weight=3.0, init_image=None,
              strength=0.9, **FORM)


def huge_png(path, side=20000):
    """A PNG that says it is side x side pixels, in a few hundred bytes: a decompression
    bomb as its header shows it (the pixels are never reached)."""
    def chunk(kind, data):
        return struct.pack('>I', len(data)) + kind + data + \
            struct.pack('>I', zlib.crc32(kind + data))
    header = struct.pack('>IIBBBBB', side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header) +
                     chunk(b'IDAT', zlib.compress(b'\0' * 1000)) + chunk(b'IEND', b''))
    return path


def adapter_file(path, base, base_path, seed=0):
    """A LoRA adapter of `base` as export_model.py writes it, its B weights random (a
    fresh adapter's are zero and change nothing)."""
    adapter = lora.spec_of(4, 8.0, None, base_path, base.state_dict())
    model = lora.adapted_model(base.state_dict(), adapter)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if '.lora_B.' in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    adapter.state = lora.adapter_state(model.state_dict())
    lora.write(adapter, path)
    return path


@pytest.fixture(scope='module')
def assets(tmp_path_factory):
    """A training checkpoint and a student that record their frozen models and size, an
    adapter of the checkpoint, images to upload and uploads to refuse."""
    d = tmp_path_factory.mktemp('app')
    ema, trained = (tiny.tiny_diffusion(seed=s, autoencoder_scale=1.5) for s in (0, 1))
    autoencoder, cloob = tiny.tiny_autoencoder(d), tiny.tiny_cloob(d)
    record = {'autoencoder': str(Path(autoencoder).resolve()),
              'cloob_checkpoint': str(Path(cloob).resolve()), 'image_size': 64}
    ckpt = tiny.save_ccld_checkpoint(d / 'run.ckpt', trained, ema, record)
    student = d / 'student.ckpt'
    write_student(student, student_of(ema),
                  {'student_steps': 1, 'guidance_range': [1.0, 8.0], **record}, 0)
    (d / 'broken.png').write_bytes(b'not an image at all')
    (d / 'big.png').write_bytes(b'\x89PNG' + bytes(1_500_000))
    return SimpleNamespace(dir=d, ckpt=ckpt, student=student, autoencoder=autoencoder,
                           cloob=cloob, bare=tiny.save_bare(ema, d / 'bare.pth'),
                           adapter=adapter_file(d / 'adapter.safetensors', ema, ckpt),
                           images=tiny.make_images(d / 'images', n=2, size=80),
                           broken=d / 'broken.png', big=d / 'big.png',
                           huge=huge_png(d / 'huge.png'), share=d / 'share')


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='module')
def server(assets):
    """app.py serving the checkpoint (no --autoencoder or --cloob-checkpoint: its record
    names them), the student and the adapter; the form starts at FORM."""
    port = free_port()
    command = [sys.executable, str(ROOT / 'app.py'), '--checkpoint', str(assets.ckpt),
               '--checkpoint', str(assets.student), '--lora', str(assets.adapter),
               '--device', 'cpu', '--port', str(port), '--max-upload-mb', '1',
               '--max-size', '128', '--max-steps', '300', '--max-images', '3',
               '--share-dir', str(assets.share),
               '-n', '1', '--seed', '7', '--steps', '2', '--method', 'ddim']
    assets.share.mkdir()
    log = open(assets.dir / 'server.log', 'w+')
    process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f'http://127.0.0.1:{port}'
    deadline = time.monotonic() + 180
    while 'serving' not in Path(log.name).read_text():
        assert process.poll() is None and time.monotonic() < deadline, \
            Path(log.name).read_text()
        time.sleep(0.5)
    try:
        yield SimpleNamespace(url=url, port=port, process=process, log=Path(log.name),
                              client=gradio_client.Client(url, verbose=False))
    finally:
        process.terminate()
        process.wait(30)
        log.close()


def generate(server, **fields):
    """(PNG paths, status line) of one /generate request."""
    files = {k: gradio_client.handle_file(str(v)) if k in ('image_prompt', 'init_image') and v
             else v for k, v in {**FIELDS, **fields}.items()}
    images, status = server.client.predict(**files, api_name='/generate')
    return [Path(image['image']) for image in images], status


def sample_py(assets, tmp_path, *flags):
    """The PNGs sample.py writes for `flags` (the checkpoint's frozen models, by default)."""
    out = tmp_path / 'sample'
    argv = ['--device', 'cpu', '--output-dir', str(out), '--no-grid', *map(str, flags)]
    assert tiny.exit_code(sample.main, 'sample.py', argv) == 0
    return sorted(out.glob('out_*.png'))


def pixels(path):
    return np.asarray(Image.open(path).convert('RGB'))


def assert_same_pixels(page, cli):
    assert len(page) == len(cli) > 0
    for a, b in zip(page, cli):
        assert np.array_equal(pixels(a), pixels(b)), f'{a} differs from {b}'


def form_flags(**form):
    form = {**FORM, **form}
    return ['-n', form['n'], '--seed', form['seed'], '--steps', form['steps'], '--method',
            form['method'], '--size', form['size']]


def test_a_text_prompt_gives_sample_pys_images_and_metadata_plus_a1111_parameters(
        server, assets, tmp_path):
    page, status = generate(server, prompt='a red fox\na hen:2', n=2, method='plms')
    cli = sample_py(assets, tmp_path, 'a red fox', 'a hen:2', '--checkpoint', assets.ckpt,
                    *form_flags(n=2, method='plms'))
    assert_same_pixels(page, cli)
    assert status == 'seed 7'
    ours, theirs = read_text(page[1]), read_text(cli[1])
    parameters = ours.pop('parameters')
    assert ours == theirs
    assert parameters == ('a red fox:3\na hen:2\nSteps: 2, Sampler: plms, Schedule type: '
                          'spliced, CFG scale: 3, Seed: 7, Size: 64x64, Model: run')
    # --share-dir keeps every image, with its metadata.
    shared = assets.share / page[1].name
    assert read_text(shared) == {**theirs, 'parameters': parameters}


@pytest.mark.parametrize('case', ['image prompt', 'init and strength', 'lora at 0.5',
                                  'student', 'size WxH'])
def test_the_page_gives_sample_pys_images(server, assets, tmp_path, case):
    image = assets.images[0]
    fields, flags = {
        'image prompt': ({'image_prompt': image, 'image_weight': 2.0},
                         ['--images', f'{image}:2']),
        'init and strength': ({'prompt': 'a red fox', 'init_image': image, 'strength': 0.6,
                               'steps': 4},
                              ['a red fox', '--init', image, '--strength', '0.6']),
        'lora at 0.5': ({'prompt': 'a red fox', 'lora': 'adapter.safetensors',
                         'lora_strength': 0.5}, ['a red fox', '--lora', f'{assets.adapter}:0.5']),
        'student': ({'prompt': 'a red fox', 'model': 'student.ckpt', 'steps': 1}, ['a red fox']),
        'size WxH': ({'prompt': 'a red fox', 'size': '128x64'}, ['a red fox']),
    }[case]
    page, _ = generate(server, **fields)
    checkpoint = assets.student if case == 'student' else assets.ckpt
    form = {k: v for k, v in fields.items() if k in FORM}
    cli = sample_py(assets, tmp_path, *flags, '--checkpoint', checkpoint,
                    *form_flags(**form))
    assert_same_pixels(page, cli)
    if case == 'lora at 0.5':  # and the adapter at 0.5 is not the base
        base, _ = generate(server, prompt='a red fox')
        assert not np.array_equal(pixels(base[0]), pixels(page[0]))


def test_stop_ends_a_200_step_job_within_a_step_and_the_next_job_runs(server):
    job = server.client.submit(**{**FIELDS, 'prompt': 'a red fox', 'steps': 200},
                               api_name='/generate')
    deadline = time.monotonic() + 120
    while True:  # until the job has made a few steps
        progress = job.status().progress_data
        if progress and (progress[0].index or 0) >= 3:
            break
        assert time.monotonic() < deadline and not job.done(), job.status()
        time.sleep(0.05)
    server.client.predict(api_name='/stop')
    images, status = job.result(timeout=120)
    stopped = re.fullmatch(r'stopped at step (\d+) of 200 \(Stop was pressed at step (\d+)\); '
                           r'seed 7', status)
    assert stopped, status
    at, asked = map(int, stopped.groups())
    assert 3 <= asked <= at <= asked + 2 < 200
    assert images == []  # the one batch did not finish
    assert generate(server, prompt='a red fox')[1] == 'seed 7'


@pytest.mark.parametrize('fields, error', [
    ({'size': '256x64'}, r'256 pixels a side \(size 256x64\) is outside what this server '
                         r'allows \(1 to 128, its --max-size\)'),
    # (the sliders' own bounds: Gradio refuses these before the engine sees them)
    ({'n': 4}, r'Value 4 is greater than maximum value 3'),
    ({'steps': 1000}, r'Value 1000 is greater than maximum value 300'),
    ({'size': '72'}, r'size 72: each side must be a multiple of 64 .*nearest valid sizes: 64, '
                     r'128'),
    ({'prompt': 'a cat:1,5'}, r"the weight '1,5' is not a number"),
    ({'model': 'student.ckpt', 'method': 'plms'}, r'a student distilled for 1 step'),
    ({'lora': 'other.safetensors'}, r"LoRA 'other.safetensors' is not made for run.ckpt"),
    ({'image_prompt': 'broken'}, r'cannot read the image prompt \(UnidentifiedImageError'),
    ({'init_image': 'huge'}, r'cannot read the init image \(DecompressionBombError: Image '
                             r'size \(400000000 pixels\) exceeds limit'),
    ({'prompt': '<b>x</b>:inf'}, r'&lt;b&gt;x&lt;/b&gt;'),  # shown as text, not as HTML
])
def test_a_bad_request_is_one_line_on_the_page_and_the_server_keeps_serving(
        server, assets, fields, error):
    fields = {k: getattr(assets, v) if k.endswith('image') or k == 'image_prompt' else v
              for k, v in fields.items()}
    with pytest.raises(gradio_client.exceptions.AppError) as caught:
        generate(server, **fields)
    message = str(caught.value)
    assert re.search(error, message) and '\n' not in message and 'Traceback' not in message, \
        message
    assert generate(server, prompt='a red fox')[1] == 'seed 7'


def test_an_upload_over_max_upload_mb_is_refused(server, assets):
    with pytest.raises(Exception, match='(?i)file size|too large|413'):
        generate(server, image_prompt=assets.big)
    assert generate(server, prompt='a red fox')[1] == 'seed 7'


def get(server, path):
    """(status, body) of a GET of `path` as written (no '..' resolved on the way)."""
    connection = http.client.HTTPConnection('127.0.0.1', server.port, timeout=30)
    connection.request('GET', path)
    response = connection.getresponse()
    return response.status, response.read()


def test_no_server_file_but_the_pages_outputs_can_be_fetched(server, assets):
    page, _ = generate(server, prompt='a red fox')
    readme = str(ROOT / 'README.md')  # in the folder the server runs from
    for path in [str(assets.ckpt), str(assets.adapter), '/etc/passwd', readme,
                 '../../../../../../etc/passwd', '/tmp/../etc/passwd',
                 f'{assets.share}/../run.ckpt', '%2e%2e/%2e%2e/%2e%2e/etc/passwd']:
        for route in ('/gradio_api/file=', '/file='):
            status, body = get(server, route + path)
            assert status in (403, 404), (route, path, status, body[:200])
    # While what the page made is served (the gallery's own URL).
    for image in server.client.predict(**{**FIELDS, 'prompt': 'a hen'},
                                       api_name='/generate')[0]:
        assert image['image']


def test_the_page_needs_no_frozen_model_flags_for_a_training_checkpoint(server):
    """The server above was started with --checkpoint alone; its record named the rest.
    (Asked as the README's client example asks: the other fields take the form's values.)"""
    command = ' '.join(server.process.args)
    assert '--autoencoder' not in command and '--cloob-checkpoint' not in command
    images, status = server.client.predict(prompt='a red fox', api_name='/generate')
    assert len(images) == 1 and status == 'seed 7'


def test_the_sampling_flags_are_the_forms_defaults_and_a_job_samples_as_sample_py_with_them(
        assets, tmp_path, monkeypatch):
    """In this process: a released state dict (it records nothing), every sampling flag
    given; ddim with eta > 0 draws noise each step, so even --batch-size shows."""
    monkeypatch.setattr(cli, 'default_device', lambda: pytest.fail('--device was ignored'))
    flags = ['--autoencoder', str(assets.autoencoder), '--cloob-checkpoint', str(assets.cloob),
             '--autoencoder-scale', '2.5', '--eta', '0.5', '--method', 'ddim', '--steps', '3',
             '--schedule', 'karras', '--size', '64', '--cond-scale', '5', '-n', '2',
             '--seed', '9', '--batch-size', '1', '--device', 'cpu']
    engine = Engine(app.parser().parse_args(['--checkpoint', str(assets.bare), *flags,
                                             '--base-channels', '16',
                                             '--channel-multipliers', '4,4,4,4']))
    s = engine.defaults('bare.pth')
    assert (s.autoencoder, s.cloob, s.autoencoder_scale, s.eta, s.method, s.steps, s.schedule,
            s.size, s.cond_scale, s.n, s.seed) == (assets.autoencoder, str(assets.cloob), 2.5,
                                                   0.5, 'ddim', 3, 'karras', (64, 64), 5.0,
                                                   2, 9)
    result = engine.run(dict(prompt='a red fox', model='bare.pth', n=2, seed=9, steps=3,
                             method='ddim', schedule='karras', size='64', cond_scale=5))
    cli_images = sample_py(assets, tmp_path, 'a red fox', '--checkpoint', assets.bare, *flags)
    assert_same_pixels(result.paths, cli_images)
    wrong = ['--base-channels', '32', '--channel-multipliers', '4,4,8,8']  # (not the weights')
    with pytest.raises(UserError, match='do not give'):
        Engine(app.parser().parse_args(['--checkpoint', str(assets.bare), *flags, *wrong]))


@pytest.mark.parametrize('flags, host, auth', [
    ([], '127.0.0.1', None),
    (['--auth', 'ann:secret'], '127.0.0.1', [('ann', 'secret')]),
    (['--listen', '--auth', 'ann:secret'], '0.0.0.0', [('ann', 'secret')]),
    (['--listen', '--auth-file', 'AUTH'], '0.0.0.0', [('ann', 'secret'), ('bob', 'pw:2')]),
    (['--listen', '--insecure-no-auth'], '0.0.0.0', None),
])
def test_the_page_binds_127_0_0_1_and_all_interfaces_only_with_a_password_or_when_told(
        flags, host, auth, tmp_path):
    (tmp_path / 'auth.txt').write_text('ann:secret\n\nbob:pw:2\n')
    flags = [str(tmp_path / 'auth.txt') if f == 'AUTH' else f for f in flags]
    args = app.parser().parse_args(['--checkpoint', 'x.ckpt', *flags])
    assert serve.check_access(args) == (host, auth)


def test_port_is_the_one_given_or_the_first_free_one_from_7860():
    with socket.socket() as taken:
        taken.bind(('127.0.0.1', 0))
        port = taken.getsockname()[1]
        with pytest.raises(UserError, match=f'port {port} is taken'):
            serve.free_port('127.0.0.1', port)
    assert serve.free_port('127.0.0.1', port) == port
    assert 7860 <= serve.free_port('127.0.0.1', None) < 7960


def test_a_port_a_stopped_server_left_in_time_wait_is_free():
    # The server closes first, as a stopped app.py does: its port waits in TIME_WAIT, which
    # the server's own bind (uvicorn's, SO_REUSEADDR) accepts, so app.py restarted at once
    # takes it.
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(('127.0.0.1', 0))
        server.listen()
        port = server.getsockname()[1]
        client = socket.create_connection(('127.0.0.1', port))
        accepted, _ = server.accept()
        accepted.close()
    client.close()
    assert serve.free_port('127.0.0.1', port) == port


@pytest.mark.parametrize('flags', [['--listen'], ['--listen', '--auth-file', 'missing.txt']])
def test_listen_without_a_password_exits_2_in_one_line(flags, capsys):
    assert tiny.exit_code(app.main, 'app.py', ['--checkpoint', 'x.ckpt', *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('app.py: error: '), err


@pytest.mark.parametrize('port', ['0', '65536', '99999', 'http'])
def test_a_port_no_socket_takes_exits_2_in_one_line(port, capsys):
    assert tiny.exit_code(app.main, 'app.py', ['--checkpoint', 'x.ckpt', '--port', port]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('app.py: error: argument --port'), err


def chromium(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ('--headless', '--no-sandbox', '--disable-gpu',
                 '--disable-background-networking', '--disable-component-update',
                 '--disable-sync', '--no-first-run', '--window-size=1280,1100',
                 f'--user-data-dir={tmp_path / "chromium"}'):
        options.add_argument(flag)
    options.set_capability('goog:loggingPrefs', {'performance': 'ALL'})
    return webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))


@pytest.mark.skipif(not CHROMEDRIVER.exists(), reason='needs chromium and chromium-driver '
                    '(apt-get install chromium chromium-driver; .ci/run installs them)')
def test_in_a_real_browser_generate_gives_sample_pys_image_and_png_info_fills_the_form(
        server, assets, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait
    # A PNG of sample.py's, for the PNG info tab to read back into the form.
    written = sample_py(assets, tmp_path / 'other', 'a hen:2', '--checkpoint', assets.ckpt,
                        '--lora', f'{assets.adapter}:0.5', *form_flags(seed=11, steps=3))[0]
    browser = chromium(tmp_path)
    field = lambda css: browser.find_element(By.CSS_SELECTOR, css).get_attribute('value')
    try:
        browser.get(server.url)
        wait = WebDriverWait(browser, 120)
        wait.until(ready.element_to_be_clickable((By.CSS_SELECTOR, '#prompt textarea')))
        browser.find_element(By.CSS_SELECTOR, '#prompt textarea').send_keys(
            'a watercolor of a lighthouse')
        browser.find_element(By.CSS_SELECTOR, '#generate').click()
        image = wait.until(ready.visibility_of_element_located(
            (By.CSS_SELECTOR, '#gallery img')))
        wait.until(lambda _: 'seed 7' in browser.find_element(
            By.CSS_SELECTOR, '#status textarea').get_attribute('value'))
        shown = tmp_path / 'shown.png'
        with urllib.request.urlopen(image.get_attribute('src'), timeout=30) as response:
            shown.write_bytes(response.read())
        screenshot = tmp_path / 'screenshot.png'
        browser.save_screenshot(str(screenshot))
        browser.find_element(By.CSS_SELECTOR, '#use-as-init').click()  # (the only image)
        next(label for label in browser.find_elements(
            By.XPATH, "//*[contains(text(), 'Image to image')]") if label.is_displayed()).click()
        WebDriverWait(browser, 20).until(
            lambda _: browser.find_elements(By.CSS_SELECTOR, '#init img'))
        assert browser.find_element(By.CSS_SELECTOR, '#init img').get_attribute('src')
        next(tab for tab in browser.find_elements(By.XPATH, "//button[contains(., 'PNG info')]")
             if tab.is_displayed()).click()
        browser.find_element(By.CSS_SELECTOR, '#png input[type=file]').send_keys(str(written))
        wait.until(lambda _: field('#prompt textarea') == 'a hen:2')
        assert (field('#seed input'), field('#steps input[type=number]'),
                field('#lora_strength input[type=number]')) == ('11', '3', '0.5')
        requests = [json.loads(entry['message'])['message'] for entry in
                    browser.get_log('performance')]
    finally:
        browser.quit()
    cli = sample_py(assets, tmp_path, 'a watercolor of a lighthouse', '--checkpoint',
                    assets.ckpt, *form_flags())
    assert_same_pixels([shown], cli)
    # Nothing was fetched from elsewhere (fonts, scripts, analytics): the page works offline.
    urls = {m['params']['request']['url'] for m in requests
            if m['method'] == 'Network.requestWillBeSent'}
    web = [u for u in urls if u.startswith(('http:', 'https:', 'ws:', 'wss:'))]
    assert any(u.startswith(server.url) for u in web)
    outside = [u for u in web if not u.startswith(server.url)]
    assert not outside, outside
    # The README's screenshot, kept small; rewritten on request only, so that a test run
    # leaves the checkout as it found it: CCLD_SCREENSHOT=1 pytest tests/test_app.py -k browser
    if os.environ.get('CCLD_SCREENSHOT') == '1':
        Image.open(screenshot).convert('RGB').quantize(64).save(ROOT / 'docs' / 'app.png',
                                                                optimize=True)

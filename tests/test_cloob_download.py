import functools
import hashlib
import http.server
import json
import socket
import threading

import pytest

from ccld.errors import UserError
from cloob_training import pretrained

CONTENT = b'not really a CLOOB checkpoint\n' * 1000
NAME = f'cloob_test-{hashlib.sha256(CONTENT).hexdigest()}.pkl'


@pytest.fixture
def server(tmp_path):
    """A local HTTP server on 127.0.0.1 serving tmp_path/www; .requests counts GETs."""
    root = tmp_path / 'www'
    root.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            httpd.requests += 1
            super().do_GET()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(
        ('127.0.0.1', 0), functools.partial(Handler, directory=str(root)))
    httpd.requests = 0
    httpd.root = root
    httpd.url = f'http://127.0.0.1:{httpd.server_address[1]}'
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def test_download_verifies_and_caches(server, tmp_path):
    (server.root / NAME).write_bytes(CONTENT)
    config, cache = {'url': f'{server.url}/{NAME}'}, tmp_path / 'cache'
    path = pretrained.download_checkpoint(config, cache)
    assert path == cache / NAME and path.read_bytes() == CONTENT
    assert [p.name for p in cache.iterdir()] == [NAME]
    assert pretrained.download_checkpoint(config, cache) == path
    assert server.requests == 1


def test_default_cache_is_torch_hub(server, tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
    (server.root / NAME).write_bytes(CONTENT)
    path = pretrained.download_checkpoint({'url': f'{server.url}/{NAME}'})
    assert path == tmp_path / 'torch_home' / 'hub' / 'checkpoints' / NAME


def test_corrupt_cached_file_is_replaced(server, tmp_path):
    (server.root / NAME).write_bytes(CONTENT)
    cache = tmp_path / 'cache'
    cache.mkdir()
    (cache / NAME).write_bytes(CONTENT[:100])
    path = pretrained.download_checkpoint({'url': f'{server.url}/{NAME}'}, cache)
    assert path.read_bytes() == CONTENT and server.requests == 1


def test_bad_hash_leaves_nothing(server, tmp_path):
    (server.root / NAME).write_bytes(CONTENT + b'tampered')
    cache = tmp_path / 'cache'
    with pytest.raises(UserError, match='sha256'):
        pretrained.download_checkpoint({'url': f'{server.url}/{NAME}'}, cache)
    assert list(cache.iterdir()) == []


@pytest.mark.parametrize('reason', ['refused', 'not found'])
def test_network_failure_says_what_to_do(server, tmp_path, reason):
    if reason == 'refused':
        with socket.socket() as s:
            s.bind(('127.0.0.1', 0))
            url = f'http://127.0.0.1:{s.getsockname()[1]}/{NAME}'
    else:
        url = f'{server.url}/{NAME}'
    cache = tmp_path / 'cache'
    with pytest.raises(UserError) as info:
        pretrained.download_checkpoint({'url': url}, cache)
    message = str(info.value)
    assert url in message and '--cloob-checkpoint' in message and '\n' not in message
    assert list(cache.iterdir()) == []


def test_configs():
    names = pretrained.list_configs()
    assert names == ['cloob_laion_400m_vit_b_16_16_epochs', 'cloob_laion_400m_vit_b_16_32_epochs']
    config = pretrained.get_config(names[0])
    assert config['url'] == (
        'https://the-eye.eu/public/AI/models/cloob/cloob_laion_400m_vit_b_16_16_epochs-'
        '405a3c31572e0a38f8632fa0db704d0e4521ad663555479f86babd3d178b1892.pkl')
    assert config['image_encoder']['d_model'] == 768 and config['text_encoder']['n_heads'] == 8
    with pytest.raises(UserError, match=names[1]):
        pretrained.get_config('vit_b_16')


def test_resolve_pretrained_name_downloads(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(pretrained, 'download_checkpoint',
                        lambda config, cache_dir=None: calls.append(config) or tmp_path / 'x.pkl')
    name = 'cloob_laion_400m_vit_b_16_32_epochs'
    assert pretrained.resolve_checkpoint(name) == (pretrained.get_config(name), tmp_path / 'x.pkl')
    assert calls == [pretrained.get_config(name)]


def test_resolve_sibling_json(tmp_path):
    path = tmp_path / 'tiny.pkl'
    path.write_bytes(b'')
    path.with_suffix('.json').write_text(json.dumps({'d_embed': 8}))
    assert pretrained.resolve_checkpoint(str(path)) == ({'d_embed': 8}, path)


def test_resolve_released_file_name(tmp_path):
    name = 'cloob_laion_400m_vit_b_16_16_epochs'
    path = tmp_path / f'{name}-405a3c31572e0a38f8632fa0db704d0e4521ad663555479f86babd3d178b1892.pkl'
    path.write_bytes(b'')
    assert pretrained.resolve_checkpoint(str(path)) == (pretrained.get_config(name), path)


def test_resolve_missing_file(tmp_path):
    with pytest.raises(UserError, match='not found'):
        pretrained.resolve_checkpoint(str(tmp_path / 'nope.pkl'))


def test_resolve_pkl_without_config(tmp_path):
    path = tmp_path / 'mystery.pkl'
    path.write_bytes(b'')
    with pytest.raises(UserError, match='mystery.json'):
        pretrained.resolve_checkpoint(str(path))

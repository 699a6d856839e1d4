"""Captions: read from every input kind, chosen as training conditions with --text-prob,
kept in the latent cache with their CLOOB text embeddings, and the image/caption gap
report; on tiny models written through the real formats."""

import io
import json
import math
import shutil
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import learning
import precompute_latents
import tiny
import train_latent_diffusion
from ccld.data import captions, latent_cache
from ccld.data.images import image_transform, load_image, make_loader
from ccld.data.sources import Source
from ccld.errors import UserError
from ccld.models.cloob import load_cloob
from ccld.train.diffusion_module import latents_and_conditions, with_captions

SIZE = 64


@pytest.fixture(scope='module')
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp('captions')
    paths = [str(p) for p in tiny.make_images(d / 'images', n=6, size=SIZE)]
    (d / 'prompts.txt').write_text('red\nblue\n')
    return SimpleNamespace(dir=d, paths=paths, autoencoder=tiny.tiny_autoencoder(d),
                           cloob=str(tiny.tiny_cloob(d)), prompts=d / 'prompts.txt')


@pytest.fixture(scope='module')
def cloob(assets):
    return load_cloob(assets.cloob)


def texts_of(source):
    return {key: text for unit in range(len(source)) for key, _, text in source.items(unit)}


def loaded_texts(loader):
    return {key: text for batch in loader for key, text in zip(batch['keys'], batch['captions'])}


def test_a_path_list_gives_tab_captions_then_the_text_file_beside_the_image(assets, tmp_path):
    paths = [shutil.copy(p, tmp_path) for p in assets.paths[:4]]
    Path(paths[1]).with_suffix('.txt').write_text('  beside the image \n')
    Path(paths[3]).with_suffix('.txt').write_text('\n')  # blank: no caption
    listing = tmp_path / 'train.txt'
    listing.write_text(f'{paths[0]}\ta listed caption\n{paths[1]}\n{paths[2]}\n{paths[3]}\t \n')
    source = Source(str(listing))
    expected = {paths[0]: 'a listed caption', paths[1]: 'beside the image', paths[2]: None,
                paths[3]: None}
    assert texts_of(source) == expected
    loader = make_loader(source.paths, SIZE, 2, 0, shuffle=False, texts=source.texts)
    assert loaded_texts(loader) == expected


def write_shard(path, samples):
    with tarfile.open(path, 'w') as tar:
        for name, files in samples.items():
            for ext, data in files.items():
                info = tarfile.TarInfo(f'{name}.{ext}')
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_tar_shards_give_the_txt_or_the_json_caption(assets, tmp_path):
    jpg = Path(assets.paths[0]).read_bytes()  # (PNG bytes: the decoder goes by content)
    write_shard(tmp_path / '00000.tar', {
        'a': {'png': jpg, 'txt': b'from the txt', 'json': b'{"caption": "not this one"}'},
        'b': {'png': jpg, 'json': json.dumps({'caption': 'from the json'}).encode()},
        'c': {'png': jpg, 'json': b'{"key": "c"}'},
        'd': {'png': jpg, 'txt': b'  '}})
    source = Source(str(tmp_path))
    shard = tmp_path / '00000.tar'
    expected = {f'{shard}:a': 'from the txt', f'{shard}:b': 'from the json', f'{shard}:c': None,
                f'{shard}:d': None}
    assert texts_of(source) == expected
    loader = source.stream_loader(SIZE, 2, 0, seed=0, rank=0, world_size=1)
    assert loaded_texts(loader) == expected


def write_text_parquet(cells, texts, path, column='text'):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({'jpg': pa.array(cells, pa.binary()), column: texts,
                             'width': [SIZE] * len(cells)}), path, row_group_size=2)
    return path


def test_parquet_captions_come_from_caption_else_text_or_the_column_named(assets, tmp_path):
    cells = [Path(p).read_bytes() for p in assets.paths[:4]]
    img2dataset = tiny.write_img2dataset_parquet(cells, tmp_path / 'img2dataset', per_file=4)
    source = Source(str(img2dataset))
    assert source.caption_column == 'caption'
    assert list(texts_of(source).values()) == [f'caption {i}' for i in range(4)]
    table = write_text_parquet(cells, ['one', None, '', ' four '], tmp_path / 'text.parquet')
    source = Source(str(table))
    assert source.caption_column == 'text'
    assert list(texts_of(source).values()) == ['one', None, None, 'four']
    loader = source.stream_loader(SIZE, 4, 0, seed=0, rank=0, world_size=1)
    assert sorted(loaded_texts(loader).items()) == sorted(texts_of(source).items())
    named = write_text_parquet(cells, ['a', 'b', 'c', 'd'], tmp_path / 'alt.parquet', 'alt')
    assert Source(str(named)).caption_column is None  # not a name looked for
    assert list(texts_of(Source(str(named), caption_column='alt')).values()) == list('abcd')
    with pytest.raises(UserError, match="no column 'gone'.*--caption-column"):
        Source(str(named), caption_column='gone')
    with pytest.raises(UserError, match="'width'.*not text"):
        Source(str(named), caption_column='width')
    with pytest.raises(UserError, match='--caption-column alt names a column'):
        Source(str(tiny.write_path_list(assets.paths, tmp_path / 'l.txt')), caption_column='alt')


def test_a_saved_dataset_gives_its_text_column(assets, tmp_path):
    import datasets
    rows = {'image': [{'bytes': Path(p).read_bytes(), 'path': None} for p in assets.paths[:3]],
            'text': ['first', None, 'third']}
    features = datasets.Features({'image': datasets.Image(), 'text': datasets.Value('string')})
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(tmp_path / 'saved')
    source = Source(str(tmp_path / 'saved'))
    assert source.caption_column == 'text'
    assert list(texts_of(source).values()) == ['first', None, 'third']
    loader = source.stream_loader(SIZE, 3, 0, seed=0, rank=0, world_size=1)
    assert loaded_texts(loader) == texts_of(source)


def cached_batch(n, captioned):
    """A batch as the cache loader gives it, image and text embeddings all distinct."""
    g = torch.Generator().manual_seed(0)
    return {'mean': torch.zeros(n, 4, 2, 2), 'std': torch.zeros(n, 4, 2, 2),
            'embed': torch.randn(n, 512, generator=g).half(),
            'text_embed': torch.randn(n, 512, generator=g).half(), 'has_text': captioned}


def test_text_prob_conditions_that_share_of_the_captioned_examples_on_their_text():
    """From which embedding each example got: 0.5 of the 300 captioned ones within 3
    binomial standard deviations (0.087); the 100 without a caption never."""
    captioned = torch.arange(400) % 4 != 0
    batch = cached_batch(400, captioned)
    torch.manual_seed(0)
    _, cond = latents_and_conditions(batch, None, None, 1.0, text_prob=0.5)
    on_text = (cond == batch['text_embed'].float()).all(1)
    on_image = (cond == batch['embed'].float()).all(1)
    assert (on_text ^ on_image).all()
    assert not on_text[~captioned].any()
    share = on_text[captioned].float().mean().item()
    assert abs(share - 0.5) < 3 * math.sqrt(0.25 / 300), share
    # 0: every condition is the image's, and nothing more is drawn than from a cache
    # without captions: the run is bit for bit the captionless one.
    plain = {k: batch[k] for k in ('mean', 'std', 'embed')}
    results = []
    for b in (batch, plain):
        torch.manual_seed(1)
        x0, cond = latents_and_conditions(b, None, None, 1.0, text_prob=0.0)
        results.append((x0, cond, torch.rand(1)))
    assert all(torch.equal(a, b) for a, b in zip(*results))
    assert torch.equal(results[0][1], batch['embed'].float())


def test_a_batch_of_images_embeds_the_chosen_captions_here(cloob):
    images = torch.rand(4, 3, SIZE, SIZE)
    batch = {'images': images, 'captions': ['red', None, 'blue', 'green']}
    ae = SimpleNamespace(encode=lambda x: SimpleNamespace(mean=x[:, :4, ::8, ::8],
                                                          std=torch.zeros_like(x[:, :4, ::8, ::8])))
    with torch.no_grad():
        image_embeds = cloob.embed_images(images)
        text_embeds = cloob.embed_texts(['red', 'blue', 'green'])
    _, cond = latents_and_conditions(batch, ae, cloob, 1.0, text_prob=1.0)
    torch.testing.assert_close(cond[[0, 2, 3]], text_embeds)
    torch.testing.assert_close(cond[1], image_embeds[1])
    _, cond = latents_and_conditions(batch, ae, cloob, 1.0)
    torch.testing.assert_close(cond, image_embeds)

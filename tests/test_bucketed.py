"""Training a path list on aspect-ratio buckets (ccld/data/bucketed.py), through the loader
the run builds from its flags, and two real processes."""

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

import tiny
import train_latent_diffusion
from ccld.data import bucketed
from ccld.errors import UserError
from ccld.train import run as training_run

ROOT = Path(__file__).resolve().parent.parent
RED, BLUE, GREY = (255, 0, 0), (0, 0, 255), (128, 128, 128)


@pytest.fixture(scope='module')
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp('bucketed')
    (d / 'prompts.txt').write_text('a red circle\n')
    return SimpleNamespace(autoencoder=tiny.tiny_autoencoder(d), cloob=tiny.tiny_cloob(d),
                           prompts=d / 'prompts.txt')


def train_args(models, train_set, out, *extra):
    return ['--train-set', str(train_set), '--vqgan-model', models.autoencoder,
            '--autoencoder-scale', '1.5', '--cloob-checkpoint', str(models.cloob),
            '--demo-prompts', str(models.prompts), '--output-dir', str(out),
            '--accelerator', 'cpu', '--num-workers', '0', '--batch-size', '2',
            '--base-channels', '64', '--channel-multipliers', '1,1,1,1', '--image-size', '128',
            '--max-steps', '2', '--checkpoint-every', '100', '--demo-every', '1000',
            '--demo-steps', '2', '--seed', '0', '--aspect-buckets', *extra]


def loader(models, train_set, tmp_path, *extra):
    """The loader the run builds from these flags, on rank 0 of 1."""
    args = train_latent_diffusion.parser().parse_args(
        train_args(models, train_set, tmp_path / 'out', *extra))
    from ccld.data.sources import Source
    args.source, args.cache = Source(args.train_set), None
    args.buckets = training_run.check_buckets(args)
    trainer = SimpleNamespace(global_rank=0, world_size=1, current_epoch=0)
    return training_run.TrainData(args, seed=0)(trainer)


def edged(path, size, left=RED, right=BLUE, band=8):
    """A grey picture with a band of one colour at its left edge and another at its right."""
    image = Image.new('RGB', size, GREY)
    image.paste(left, (0, 0, band, size[1]))
    image.paste(right, (size[0] - band, 0, size[0], size[1]))
    image.save(path)
    return path


def test_a_wide_images_left_and_right_edges_both_reach_the_batch(models, tmp_path):
    """A 3:1 picture at --image-size 128 --max-aspect 3 goes to the 192x64 bucket and keeps
    both edges; the square centre crop (the default) cuts both away."""
    paths = [edged(tmp_path / f'{i}.png', (300, 100)) for i in range(2)]
    train_set = tiny.write_path_list(paths, tmp_path / 'list.txt')
    batch = next(iter(loader(models, train_set, tmp_path, '--max-aspect', '3')))
    images = batch['images']
    assert images.shape == (2, 3, 64, 192)
    assert torch.allclose(images[:, :, :, 0], torch.tensor([1., 0, 0])[:, None], atol=0.02)
    assert torch.allclose(images[:, :, :, -1], torch.tensor([0., 0, 1])[:, None], atol=0.02)
    square = next(iter(training_run.TrainData(SimpleNamespace(
        cache=None, buckets=None, source=SimpleNamespace(paths=paths, texts=[None, None]),
        image_size=128, batch_size=2, num_workers=0, prefetch_factor=2, random_flip=False),
        seed=0)(None)))['images']
    assert square.shape == (2, 3, 128, 128)
    assert (square[:, 0] - square[:, 2]).abs().max() < 0.02  # grey: no red, no blue left


def test_the_bucket_flags_choose_the_shapes_and_the_crop(models, tmp_path):
    """--max-aspect and --bucket-step choose the table; --bucket-crop center always cuts the
    same sliver, random a different one. A 2:1 picture with a top-to-bottom ramp: at 128
    px, --max-aspect 2 has the 128x128 bucket only (w=64 gives 64x256, beyond 2:1); at
    --max-aspect 4 it goes to 192x64 (3:1, nearer 2:1 in log aspect than 4:1): to cover it,
    resized to 192x96, it loses 32 rows."""
    ramp = Image.linear_gradient('L').resize((200, 100)).convert('RGB')
    ramp.save(tmp_path / 'ramp.png')
    train_set = tiny.write_path_list([tmp_path / 'ramp.png'] * 2, tmp_path / 'list.txt')
    assert next(iter(loader(models, train_set, tmp_path)))['images'].shape == (2, 3, 128, 128)
    wide = loader(models, train_set, tmp_path, '--max-aspect', '4', '--bucket-crop', 'center')
    images = torch.cat([b['images'] for _ in range(3) for b in wide])
    assert images.shape[1:] == (3, 64, 192)
    assert (images - images[0]).abs().max() == 0  # the same centre rows every time
    top = torch.cat([b['images'] for _ in range(8) for b in loader(
        models, train_set, tmp_path, '--max-aspect', '4')])[:, 0, :, 96]  # a column: the rows
    assert len({tuple(col.tolist()) for col in top}) > 1  # random crops: different rows
    # --bucket-step 128 at 128 px: only 128x128 fits within 4:1 (128 wide gives 128 high,
    # 64 would be a side of less than a step).
    assert next(iter(loader(models, train_set, tmp_path, '--max-aspect', '4', '--bucket-step',
                            '128')))['images'].shape == (2, 3, 128, 128)


def test_sizes_are_read_from_the_headers_once_and_cached_beside_the_list(tmp_path):
    paths = [edged(tmp_path / 'a.png', (300, 100)), edged(tmp_path / 'b.png', (50, 70))]
    list_path = tmp_path / 'list.txt'
    assert bucketed.image_sizes([str(p) for p in paths], list_path) == [(300, 100), (50, 70)]
    cache = Path(f'{list_path}.sizes.tsv')
    lines = cache.read_text().splitlines()
    cache.write_text('\n'.join(line.replace('\t50\t70', '\t7\t5') for line in lines))
    assert bucketed.image_sizes([str(p) for p in paths], list_path)[1] == (7, 5)  # cached
    os.utime(paths[1], ns=(1, 1))  # the file changed: read again
    assert bucketed.image_sizes([str(p) for p in paths], list_path)[1] == (50, 70)


@pytest.mark.parametrize('extra, message', [
    (['--batch-size', '2'], '1 images make fewer than one batch of 2 for each of 1 process'),
    (['--bucket-step', '96'], '--bucket-step 96 must be a multiple of 64'),
    (['--max-aspect', '0.5'], '--max-aspect 0.5 is the long side over the short'),
])
def test_bucket_flag_errors_and_too_few_images(models, tmp_path, extra, message):
    train_set = tiny.write_path_list([edged(tmp_path / 'a.png', (64, 64))], tmp_path / 'l.txt')
    with pytest.raises(UserError, match=message):
        loader(models, train_set, tmp_path, *extra)


EPOCHS_DRIVER = '''
import sys, torch
import ccld.train.diffusion_module
import train_latent_diffusion
from ccld.train import run as train
seen, training_step = [], ccld.train.diffusion_module.LightningDiffusion.training_step

def spy(self, batch, batch_idx):  # the keys and shape of each batch of this rank, by epoch
    shape = batch["images" if "images" in batch else "mean"].shape
    seen.append((self.current_epoch, list(batch["keys"]), tuple(shape)))
    return training_step(self, batch, batch_idx)

ccld.train.diffusion_module.LightningDiffusion.training_step = spy
args = train_latent_diffusion.parser().parse_args(sys.argv[3:])
trainer, module = train.run(train.validate(args))
torch.save(seen, f"{sys.argv[1]}/seen{trainer.global_rank}-{sys.argv[2]}.pt")
'''


def two_rank_run(argv, tmp_path, part=0):
    """Trains with `argv` on two CPU processes (gloo), from `tmp_path`; returns each rank's
    (epoch, keys, shape of the images or latents) of every batch, and the run's stderr.
    `part` numbers the runs of one test (a run and its resumption)."""
    driver = tmp_path / 'driver.py'
    driver.write_text(EPOCHS_DRIVER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [str(ROOT), str(ROOT / 'latent-diffusion'), os.environ.get('PYTHONPATH')])))
    result = subprocess.run([sys.executable, str(driver), str(tmp_path), str(part), *argv],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return [torch.load(tmp_path / f'seen{r}-{part}.pt') for r in (0, 1)], result.stderr


def train_two_ranks(models, train_set, tmp_path, *extra):
    """Trains on `train_set` in two processes (gloo) with train_args and `extra`; returns
    the run's stderr and, for each rank, (epoch, keys, images' shape) of each batch."""
    seen, stderr = two_rank_run(train_args(models, train_set, tmp_path / 'out', '--num-gpus',
                                           '2', *extra), tmp_path)
    assert (tmp_path / 'out' / 'checkpoints').is_dir()
    return stderr, seen


def test_two_ranks_train_on_buckets_with_equal_batches_and_each_image_once(models, tmp_path):
    """11 images in three buckets at 128 px, --max-aspect 3 (64x192, 128x128, 192x64): 5
    square, 3 tall, 3 wide. Batches of 2: 2 + 1 + 1 full, the leftovers (1 of each) make
    one catch-all batch and a single image; 5 batches, trimmed to 4 for 2 ranks, so 2
    each an epoch and 3 images left out (at most 2 x 2 - 1). Stopped after the first step
    (mid-epoch) and resumed to the end of the second epoch: 4 steps in all, the first
    epoch's split between the two runs."""
    sizes = [(100, 100)] * 5 + [(50, 150)] * 3 + [(150, 50)] * 3
    paths = [edged(tmp_path / f'{i}.png', s) for i, s in enumerate(sizes)]
    train_set = tiny.write_path_list(paths, tmp_path / 'list.txt')
    seen = [[], []]
    for part, extra in enumerate([('--max-steps', '1', '--checkpoint-every', '1'),
                                  ('--max-steps', '4', '--resume-from', 'auto')]):
        argv = train_args(models, train_set, tmp_path / 'out', '--num-gpus', '2',
                          '--max-aspect', '3', *extra)
        halves, stderr = two_rank_run(argv, tmp_path, part)
        assert stderr.count('--aspect-buckets: images a bucket: 64x192: 3, 128x128: 5, '
                            '192x64: 3') == 1  # (rank 0 alone says it)
        seen = [s + h for s, h in zip(seen, halves)]
    assert [len(s) for s in seen] == [4, 4]
    for epoch in (0, 1):
        assert [sum(e == epoch for e, _, _ in s) for s in seen] == [2, 2]
        keys = [k for s in seen for e, batch, _ in s if e == epoch for k in batch]
        assert len(keys) == len(set(keys)) == 8
    assert [batch for _, batch, _ in seen[0][:2]] != [batch for _, batch, _ in seen[0][2:]]
    shapes = {shape for s in seen for _, _, shape in s}
    assert shapes <= {(2, 3, 192, 64), (2, 3, 128, 128), (2, 3, 64, 192)} and len(shapes) > 1


def test_a_header_size_is_the_upright_pictures_as_load_image_turns_it(tmp_path):
    from ccld.data.images import load_image
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: shown turned a quarter
    Image.new('RGB', (300, 100), RED).save(tmp_path / 'turned.jpg', exif=exif)
    assert bucketed.header_size(tmp_path / 'turned.jpg') == (100, 300)
    assert load_image(tmp_path / 'turned.jpg').size == (100, 300)
    (tmp_path / 'bad.png').write_bytes(b'not an image')
    assert bucketed.header_size(tmp_path / 'bad.png') is None



def keys_of(batches):
    return [batch['keys'] for batch in batches]


def test_the_loader_saves_the_batches_it_handed_out_and_a_resume_goes_on_after_them(
        models, tmp_path):
    """Two workers reading ahead: after 2 of an epoch's 5 batches the loader's state (what
    Lightning saves in a checkpoint) says 2, and a new loader given it hands out the other
    3, so the two halves are one uninterrupted epoch: each of 10 images once. The next
    epoch, set as Lightning sets it, has a plan of its own, whole."""
    from lightning_fabric.utilities.data import _set_sampler_epoch
    sizes = [(100, 100)] * 5 + [(50, 150)] * 3 + [(150, 50)] * 3
    paths = [edged(tmp_path / f'{i}.png', s) for i, s in enumerate(sizes)]
    train_set = tiny.write_path_list(paths, tmp_path / 'list.txt')
    flags = '--max-aspect', '3', '--num-workers', '2'

    def interrupted_and_resumed():  # (no loader outlives it: their workers end with it)
        first = loader(models, train_set, tmp_path, *flags)
        batches = iter(first)
        taken = [next(batches)['keys'] for _ in range(2)]
        resumed = loader(models, train_set, tmp_path, *flags)
        resumed.load_state_dict(first.state_dict())
        rest = keys_of(resumed)
        _set_sampler_epoch(resumed, 1)
        return taken, rest, len(resumed), keys_of(resumed)

    whole = keys_of(loader(models, train_set, tmp_path, *flags))
    assert len(whole) == 5 and len({k for keys in whole for k in keys}) == 10
    taken, rest, length, epoch_1 = interrupted_and_resumed()
    assert taken + rest == whole
    assert length == 5  # (Lightning counts the 2 done before the resume)
    assert len(epoch_1) == 5 and len({k for keys in epoch_1 for k in keys}) == 10
    assert epoch_1 != whole

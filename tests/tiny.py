"""Tiny random models written through the real file formats, for tests on the CPU, a way
to run a CLI in-process, and to see what a training tool sets up from its flags.

Fixtures call these builders (usually once per module); nothing here is a fixture, so any
test module can share them.
"""

import json
from pathlib import Path
from types import SimpleNamespace

import torch

from ccld import cli
from ccld.train.quickstart import (make_images, make_tiny_autoencoder, make_tiny_cloob,
                                   write_path_list)
from ccld.models.unet import DiffusionModel

# The smallest widths with one attention head per level (heads = channels // 64).
BASE_CHANNELS, CHANNEL_MULTIPLIERS = 16, (4, 4, 4, 4)

__all__ = ['BASE_CHANNELS', 'CHANNEL_MULTIPLIERS', 'make_images', 'write_path_list',
           'tiny_autoencoder', 'tiny_cloob', 'tiny_diffusion', 'initialised_build', 'save_bare',
           'save_ccld_checkpoint', 'save_original_checkpoint', 'inception_weights', 'exit_code',
           'run_printed_sample_command', 'set_up_run', 'learning_rates', 'rank_shares',
           'write_img2dataset_parquet', 'write_datasets_parquet', 'stream_as_hub']


def tiny_autoencoder(directory, seed=0):
    """A random KL f=8 autoencoder written as DIR/tiny_ae.yaml + .ckpt; returns the NAME."""
    return make_tiny_autoencoder(Path(directory) / 'tiny_ae', seed)


def tiny_cloob(directory, seed=0):
    """A random CLOOB (512-d embeddings) written as DIR/tiny_cloob.pkl + .json; returns the .pkl."""
    return make_tiny_cloob(Path(directory) / 'tiny_cloob.pkl', seed)


def tiny_diffusion(seed=0, autoencoder_scale=1.0, base_channels=BASE_CHANNELS,
                   channel_multipliers=CHANNEL_MULTIPLIERS):
    """A randomly initialised DiffusionModel (~15M parameters at the default widths)."""
    torch.manual_seed(seed)
    return DiffusionModel(base_channels, channel_multipliers, autoencoder_scale).eval()


def initialised_build(state_dict, *args, **kwargs):
    """build_model as it was before models loaded in place: initialised on the CPU (its
    random draws made), then the weights copied in; for a test to run the old way."""
    from ccld.models.student import StudentModel, is_student
    from ccld.models.unet import infer_widths
    model = (StudentModel if is_student(state_dict) else DiffusionModel)(
        *infer_widths(state_dict))
    model.load_state_dict(state_dict)
    return model


def save_bare(model, path):
    """The released format: the model's state dict, autoencoder_scale buffer included."""
    torch.save(model.state_dict(), path)
    return Path(path)


def _prefixed(**models):
    return {f'{name}.{k}': v for name, model in models.items()
            for k, v in model.state_dict().items()}


def save_ccld_checkpoint(path, model, model_ema, record=None, global_step=0):
    """A checkpoint as our training script writes it: weights and EMA, plus a 'ccld' record."""
    record = {'autoencoder_scale': float(model_ema.autoencoder_scale), **(record or {})}
    torch.save({'state_dict': _prefixed(model=model, model_ema=model_ema), 'ccld': record,
                'global_step': global_step, 'pytorch-lightning_version': '2.1.0'}, path)
    return Path(path)


def save_original_checkpoint(path, model, model_ema, scale_factor):
    """A checkpoint of the original training script: model./model_ema. keys, scale_factor."""
    torch.save({'state_dict': _prefixed(model=model, model_ema=model_ema),
                'scale_factor': scale_factor, 'global_step': 0,
                'pytorch-lightning_version': '1.5.0'}, path)
    return Path(path)


def inception_weights(path, seed=0):
    """torch-fidelity's InceptionV3 with random weights, saved in the library's own format
    (the network's state dict, as its released weights file holds it). The convolutions
    are re-initialised for ReLU (He et al.), so the features neither vanish nor blow up
    through the network's depth as they do under PyTorch's default init."""
    from unittest import mock

    from torch_fidelity import feature_extractor_inceptionv3 as inception
    torch.manual_seed(seed)
    network = inception.FeatureExtractorInceptionV3
    with mock.patch.object(network, 'load_state_dict', lambda self, state: None), \
            mock.patch.object(inception, 'load_state_dict_from_url', lambda *a, **k: {}):
        net = network('inception-v3-compat', ['2048'])
    for module in net.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity='relu')
    torch.save(net.state_dict(), path)
    return Path(path)


def exit_code(main, prog, argv):
    """Runs a CLI's main(argv) as its script does (through `cli.run`); returns the exit code."""
    try:
        cli.run(lambda: main(argv), prog)
    except SystemExit as e:
        return e.code
    return 0


def run_printed_sample_command(output, cwd, *extra):
    """Runs the "Sample with:" command line in a tool's `output` as the user would, from
    folder `cwd` (sample.py in this process), the sampling flags `extra` added; returns its
    exit code."""
    import os
    import shlex

    import sample
    line = next(line for line in output.splitlines() if 'python3 ' in line)
    words = shlex.split(line[line.index('python3 '):])
    assert words[:2] == ['python3', str(Path(sample.__file__).resolve())], line
    before = os.getcwd()
    os.chdir(cwd)
    try:
        return exit_code(sample.main, 'sample.py', [*words[2:], *extra])
    finally:
        os.chdir(before)


class Asked(Exception):
    """Ends a run where it would start training."""


def set_up_run(main, argv, tf32=(False, True)):
    """What a tool's run sets up from `argv`, up to where it would train: the keyword
    arguments it asks pl.Trainer for (none is started), its module, its loader, the seed and
    the TF32 settings (from `tf32`, put back after)."""
    import pytest
    import pytorch_lightning as pl
    from ccld.train import runner
    seen = SimpleNamespace()

    def trainer(**kwargs):
        seen.trainer = kwargs
        return SimpleNamespace(global_rank=0, world_size=1, current_epoch=0)

    def fit(trainer, module, make_loader, ckpt_path, prog):
        seen.random_state = torch.get_rng_state()  # (what the run's draws go on from)
        seen.module, seen.loader, seen.seed = module, make_loader(trainer), torch.initial_seed()
        seen.tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        raise Asked
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pl, 'Trainer', trainer)
        patch.setattr(runner, 'fit', fit)
        patch.setenv('WANDB_MODE', 'offline')
        patch.delenv('PL_GLOBAL_SEED', raising=False)  # (no seed but --seed's)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        try:
            with pytest.raises(Asked):
                main(argv)
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
    seen.callbacks = {type(c).__name__: c for c in seen.trainer['callbacks']}
    return seen


def learning_rates(module, steps):
    """The LR the module's own set_learning_rate sets at each of `steps` (on a stand-in
    optimizer: its own needs a Trainer)."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0)
    lrs = []
    for step in steps:
        stand_in = SimpleNamespace(global_step=step, lr=module.lr, lr_schedule=module.lr_schedule,
                                   trainer=SimpleNamespace(optimizers=[optimizer]))
        type(module).set_learning_rate(stand_in)
        lrs.append(optimizer.param_groups[0]['lr'])
    return lrs


def rank_shares(source, size, world_size, epochs, batch_size=4, workers=2, seed=3):
    """{rank: [(epoch, keys, skipped) of each batch]} of each rank's loader of a
    data.sources.Source, run here one rank after the other."""
    seen = {}
    for rank in range(world_size):
        loader = source.stream_loader(size, batch_size, workers, seed=seed, rank=rank,
                                      world_size=world_size)
        seen[rank] = [(epoch, batch['keys'], batch['skipped'])
                      for epoch in range(epochs) for batch in loader]
    return seen


def write_img2dataset_parquet(cells, folder, per_file, row_group_size=1, sizes=None):
    """img2dataset's --output_format parquet, written here with pyarrow: NNNNN.parquet
    files of `per_file` rows with key, jpg (the image bytes, None for a failed download),
    caption, width and height (`sizes`, row by row, or 64 x 64). `cells` are the image
    bytes, row by row."""
    sizes = sizes or [(64, 64)] * len(cells)
    import pyarrow as pa
    import pyarrow.parquet as pq
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for shard, start in enumerate(range(0, len(cells), per_file)):
        rows = range(start, min(start + per_file, len(cells)))
        table = pa.table({'key': [f'{i:09}' for i in rows],
                          'jpg': pa.array([cells[i] for i in rows], pa.binary()),
                          'caption': [f'caption {i}' for i in rows],
                          'width': [sizes[i][0] for i in rows],
                          'height': [sizes[i][1] for i in rows]})
        pq.write_table(table, folder / f'{shard:05}.parquet', row_group_size=row_group_size)
    return folder


def write_datasets_parquet(cells, path, row_group_size=2):
    """A parquet file as the datasets library writes an image dataset: an `image` struct of
    bytes and path, a caption, and the features in the schema's metadata; no key column."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    features = {'image': {'_type': 'Image'}, 'caption': {'dtype': 'string', '_type': 'Value'}}
    image = pa.struct([('bytes', pa.binary()), ('path', pa.string())])
    schema = pa.schema([('image', image), ('caption', pa.string())],
                       metadata={'huggingface': json.dumps({'info': {'features': features}})})
    table = pa.table({'image': [{'bytes': c, 'path': None} for c in cells],
                      'caption': [f'caption {i}' for i in range(len(cells))]}, schema=schema)
    pq.write_table(table, path, row_group_size=row_group_size)
    return Path(path)


def stream_as_hub(monkeypatch, cells, folder, per_file, sizes=None):
    """Stands in for the hub: hf://someone/paintings (split train) streams `cells` from
    img2dataset parquet files of `per_file` rows in `folder` (a shard each; `sizes` as
    write_img2dataset_parquet takes them), as the datasets library streams the hub's
    parquet files. Returns the name."""
    import datasets
    folder = Path(folder)
    files = sorted(map(str, write_img2dataset_parquet(cells, folder, per_file,
                                                      sizes=sizes).glob('*.parquet')))
    original = datasets.load_dataset

    def load_dataset(name, split, streaming):
        assert (name, split, streaming) == ('someone/paintings', 'train', True)
        return original('parquet', data_files=files, split=split, streaming=True,
                        cache_dir=str(folder / 'cache'))
    monkeypatch.setattr(datasets, 'load_dataset', load_dataset)
    return 'hf://someone/paintings'

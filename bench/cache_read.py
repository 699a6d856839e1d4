"""Write and read throughput of the latent cache as training uses it (litdata, through
ccld.data.latent_cache), against the same records in webdataset tar shards and in plain .npy shards.

Why: the cache is stored with litdata because webdataset cannot hand out each sample
exactly once per epoch with the same number of batches on every rank, and cannot resume
mid-epoch; litdata does all three. This measures what that choice costs, or saves, in
speed. Records have the cache's real shape: posterior mean and std fp16 [4, 32, 32] and
the CLOOB embedding fp16 [512], plus a key. Every format is read one whole epoch in
shuffled order, batch 64, into the batch dict training gets; the files were just written,
so they sit in the page cache: this times decoding and loader overhead, not the disk.
The 'once' column checks that each key came exactly once in the epoch. Writing litdata
goes through latent_cache.write_part, which also fsyncs each part; the others do not fsync.

    .venv/bin/python bench/cache_read.py     (from the repository root)
"""

import argparse
import bisect
import os
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from time import perf_counter

import numpy as np
import torch
from torch.utils import data

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / 'latent-diffusion')]

from ccld.data import latent_cache  # noqa: E402

BATCH = 64
UNIT = 10_000  # records per cache part: precompute's default unit size
SHARD = 2_500  # records per tar or .npy shard
SHAPES = {'mean': (4, 32, 32), 'std': (4, 32, 32), 'embed': (512,)}
FIELDS = tuple(SHAPES)


def make_records(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(n, 4, 32, 32, generator=g).half()
    std = torch.rand(n, 4, 32, 32, generator=g).half()
    embed = torch.randn(n, 512, generator=g).half()
    return [{'key': f'{i:08d}', 'mean': mean[i].clone(), 'std': std[i].clone(),
             'embed': embed[i].clone()} for i in range(n)]


def stack(keys, samples):
    """The batch dict training gets from the cache loader."""
    batch = {f: torch.stack([torch.as_tensor(s[f]) for s in samples]) for f in FIELDS}
    return dict(batch, keys=list(keys), skipped=0)


# litdata, through the project's own writer and loader.

def write_litdata(records, root):
    parts = [records[i:i + UNIT] for i in range(0, len(records), UNIT)]
    stats = []
    for part in parts:  # what precompute sums as it encodes; not part of the writing
        s = latent_cache.PartStats()
        for r in part:
            total, total_sq = latent_cache.latent_sums(r['mean'][None], r['std'][None])
            s.add(r['mean'].numel(), total.item(), total_sq.item())
        stats.append(s)
    start = perf_counter()
    for unit, (part, s) in enumerate(zip(parts, stats)):
        rows = [dict(r, key=latent_cache.encode_key(r['key'])) for r in part]
        latent_cache.write_part(root, unit, rows, 0, s)
    latent_cache.finalize(root, len(parts), {'source': 'bench/cache_read.py'})
    return perf_counter() - start


def read_litdata(root, workers):
    return latent_cache.make_cache_loader(root, BATCH, workers, seed=0)


# webdataset tar shards, read as ccld.data.sources reads tar shards.

def write_tars(records, folder):
    import webdataset as wds
    folder.mkdir()
    start = perf_counter()
    for i in range(0, len(records), SHARD):
        with wds.TarWriter(str(folder / f'{i // SHARD:05d}.tar')) as sink:
            for r in records[i:i + SHARD]:
                sink.write({'__key__': r['key'],
                            **{f: r[f].numpy().tobytes() for f in FIELDS}})
    return perf_counter() - start


def collate_wds(samples):
    """Raw fp16 bytes -> tensors. The shapes are fixed, so there is no header to parse:
    this times the container (.npy fields through wds.decode() read 1.7x slower here)."""
    return stack([s['__key__'] for s in samples],
                 [{f: torch.frombuffer(bytearray(s[f]), dtype=torch.float16).view(SHAPES[f])
                   for f in FIELDS} for s in samples])


def read_tars(folder, workers):
    import webdataset as wds
    urls = sorted(str(p) for p in folder.glob('*.tar'))
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(urls),
        wds.detshuffle(bufsize=len(urls), seed=0),
        wds.split_by_worker,
        wds.tarfile_to_samples(),
        wds.shuffle(1000),  # a buffer: only an approximate shuffle within it
        wds.batched(BATCH, collation_fn=collate_wds, partial=True),
    )
    return data.DataLoader(pipeline, batch_size=None, num_workers=workers)


# plain .npy shards, memory-mapped, through a map-style Dataset.

def write_npy(records, folder):
    folder.mkdir()
    start = perf_counter()
    for i in range(0, len(records), SHARD):
        shard = records[i:i + SHARD]
        stem = folder / f'{i // SHARD:05d}'
        np.save(f'{stem}.key.npy', np.array([r['key'] for r in shard], dtype='S'))
        for f in FIELDS:
            np.save(f'{stem}.{f}.npy', torch.stack([r[f] for r in shard]).numpy())
    return perf_counter() - start


class NpyShards(data.Dataset):
    def __init__(self, folder):
        stems = sorted(str(p)[:-len('.key.npy')] for p in folder.glob('*.key.npy'))
        self.shards = [{f: np.load(f'{s}.{f}.npy', mmap_mode='r') for f in ('key', *FIELDS)}
                       for s in stems]
        self.starts = np.cumsum([0] + [len(s['key']) for s in self.shards]).tolist()

    def __len__(self):
        return self.starts[-1]

    def __getitem__(self, index):
        shard = bisect.bisect_right(self.starts, index) - 1
        rows = self.shards[shard]
        i = index - self.starts[shard]
        return {'key': rows['key'][i].decode(),
                **{f: torch.from_numpy(np.array(rows[f][i])) for f in FIELDS}}


def collate_npy(samples):
    return stack([s['key'] for s in samples], samples)


def read_npy(folder, workers):
    return data.DataLoader(NpyShards(folder), batch_size=BATCH, shuffle=True,
                           num_workers=workers, collate_fn=collate_npy,
                           generator=torch.Generator().manual_seed(0))


def read_epoch(loader):
    """(records/s over one epoch, from making the iterator to its end; exactly once?)"""
    start = perf_counter()
    keys = []
    for batch in loader:
        keys += batch['keys']
    seconds = perf_counter() - start
    return len(keys) / seconds, keys


def size_mb(path):
    return sum(p.stat().st_size for p in Path(path).rglob('*') if p.is_file()) / 1e6


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--records', type=int, default=20_000)
    p.add_argument('--workers', default='0,2', help='loader worker counts to read with')
    p.add_argument('--workdir', help='where to write the three copies (default: a temp dir)')
    args = p.parse_args(argv)
    workers = [int(w) for w in args.workers.split(',')]
    began = perf_counter()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    print(f'date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}; {cores} cores usable; '
          f'torch {torch.__version__}; load average {os.getloadavg()[0]:.2f}')
    records = make_records(args.records)
    expected = sorted(r['key'] for r in records)
    print(f'{len(records)} records (mean, std fp16 [4,32,32], embed fp16 [512], key); '
          f'batch {BATCH}; one shuffled epoch per reading\n', flush=True)

    formats = [('litdata (ccld.data.latent_cache)', write_litdata, read_litdata, 'litdata'),
               ('webdataset tar shards', write_tars, read_tars, 'tars'),
               ('.npy shards, map-style + shuffle', write_npy, read_npy, 'npy')]
    header = ' | '.join(f'read rec/s, {w} workers' for w in workers)
    print(f'| format | write rec/s | MB on disk | {header} | once |')
    print('|---|---|---|' + '---|' * len(workers) + '---|')
    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        for name, write, read, folder in formats:
            path = Path(work) / folder
            write_rate = len(records) / write(records, path)
            reads, once = [], True
            for w in workers:
                rate, keys = read_epoch(read(path, w))
                reads.append(f'{rate:,.0f}')
                once = once and sorted(keys) == expected
            print(f'| {name} | {write_rate:,.0f} | {size_mb(path):.0f} | {" | ".join(reads)} '
                  f'| {"yes" if once else "NO"} |', flush=True)
    print(f'\nfinished in {perf_counter() - began:.0f} s')


if __name__ == '__main__':
    main()

"""Aspect-ratio buckets (ccld/data/buckets.py): the table, the assignment and the epoch
plan, against values worked out by hand or checked from outside the plan."""

import collections
import random

import pytest

from ccld.data import buckets as B

TABLE_256 = [(192, 320), (256, 256), (320, 192)]  # by hand: 65536 // w, down to a multiple
# of 64, for w = 64, 128, ... (64x1024 and 128x512 are beyond 2:1, 384x128 and on too)
TABLE_512 = [(384, 640), (448, 576), (512, 512), (576, 448), (640, 384)]  # 320x768 is 2.4:1


def test_the_table_is_novelais():
    assert B.bucket_table(256) == TABLE_256
    assert B.bucket_table(512) == TABLE_512
    # 4:1 allowed: 384, 448 and 512 wide get 128 high (65536 // 384 = 170), and their
    # mirror images join; 64x1024 (16:1) does not.
    wide = [(384, 128), (448, 128), (512, 128)]
    assert B.bucket_table(256, max_aspect=4.0) == \
        [(h, w) for w, h in wide[::-1]] + TABLE_256 + wide
    for w, h in B.bucket_table(512, step=32, max_aspect=3.0):
        assert w % 32 == h % 32 == 0 and w * h <= 512 * 512 and max(w, h) <= 3 * min(w, h)
        assert w * (h + 32) > 512 * 512 or (w + 32) * h > 512 * 512  # one side is the most


@pytest.mark.parametrize('size, bucket', [
    ((500, 500), (256, 256)),   # square
    ((260, 250), (256, 256)),
    ((300, 400), (192, 320)),   # 3:4 portrait: ln(0.75/0.6) = 0.22 < ln(1/0.75) = 0.29
    ((400, 300), (320, 192)),   # 4:3 landscape
    ((129, 100), (256, 256)),   # the log-aspect midpoint of 1 and 5/3 is sqrt(5/3) = 1.291
    ((130, 100), (320, 192)),   # (a linear midpoint, 4/3, would put this one in the square)
    ((1000, 100), (320, 192)),  # 10:1, beyond --max-aspect: clamped to the widest bucket
    ((100, 1000), (192, 320)),
])
def test_each_image_goes_to_the_bucket_of_nearest_log_aspect(size, bucket):
    assert TABLE_256[B.assign(*size, TABLE_256)] == bucket


def plans(bucket_of, batch_size, world_size, seed=0, epoch=0):
    return [B.epoch_plan(bucket_of, batch_size, world_size, rank, seed, epoch)
            for rank in range(world_size)]


@pytest.mark.parametrize('world_size', [1, 2, 3])
@pytest.mark.parametrize('epoch', [0, 1])
def test_the_plan_gives_ranks_equal_single_bucket_batches_and_each_item_once(world_size, epoch):
    rng = random.Random(world_size)
    bucket_of = [rng.choice([0, 0, 0, 1, 2, 2, 4]) for _ in range(103)]  # nothing divides
    batch_size = 4
    ranks = plans(bucket_of, batch_size, world_size, seed=7, epoch=epoch)
    assert len({len(r) for r in ranks}) == 1 and len(ranks[0]) > 0
    seen = [item for r in ranks for batch in r for item, _ in batch]
    assert len(seen) == len(set(seen))
    assert len(bucket_of) - len(seen) < world_size * batch_size
    moved = 0
    for r in ranks:
        for batch in r:
            assert len(batch) == batch_size and len({b for _, b in batch}) == 1
            moved += sum(b != bucket_of[item] for item, b in batch)
    # Only leftovers (less than a batch per bucket) go to another bucket.
    assert moved < len(set(bucket_of)) * (batch_size - 1)


def test_the_plan_follows_from_seed_and_epoch_and_what_it_drops_changes():
    bucket_of = [i % 3 for i in range(50)]
    assert plans(bucket_of, 4, 2, seed=1, epoch=3) == plans(bucket_of, 4, 2, seed=1, epoch=3)
    assert plans(bucket_of, 4, 2, seed=1, epoch=3) != plans(bucket_of, 4, 2, seed=1, epoch=4)
    assert plans(bucket_of, 4, 2, seed=1, epoch=3) != plans(bucket_of, 4, 2, seed=2, epoch=3)
    ever = set()
    for epoch in range(10):
        ever |= {item for r in plans(bucket_of, 4, 2, 1, epoch) for b in r for item, _ in b}
    assert ever == set(range(50))


def test_buckets_are_drawn_in_proportion_to_what_they_hold():
    bucket_of = [0] * 400 + [1] * 100
    firsts = collections.Counter(B.epoch_plan(bucket_of, 10, 1, 0, 0, epoch)[0][0][1]
                                 for epoch in range(400))
    assert 0.7 < firsts[0] / 400 < 0.9  # 80 % of the batches are bucket 0's


def test_a_catch_all_batch_goes_to_the_bucket_that_holds_most_of_it():
    (batch,) = B.epoch_plan([0, 1, 1, 2, 2, 2], 6, 1, 0, seed=0, epoch=0)
    assert sorted(item for item, _ in batch) == list(range(6))
    assert {bucket for _, bucket in batch} == {2}


@pytest.mark.parametrize('world_size', [1, 2, 3])
def test_without_catch_all_a_buckets_leftovers_make_a_smaller_batch_of_their_own(world_size):
    """The latent cache's plan: no item changes bucket; per bucket, ceil(n / batch) batches,
    all but the last full; only the trimmed batches (fewer than world_size) are left out."""
    rng = random.Random(world_size)
    bucket_of = [rng.choice([0, 0, 0, 1, 2, 2, 4]) for _ in range(103)]
    counts = collections.Counter(bucket_of)
    made = sum(-(-n // 4) for n in counts.values())
    ranks = [B.epoch_plan(bucket_of, 4, world_size, rank, 7, 0, catch_all=False)
             for rank in range(world_size)]
    assert [len(r) for r in ranks] == [made // world_size] * world_size
    sizes = collections.defaultdict(list)
    for batch in (batch for r in ranks for batch in r):
        (bucket,) = {b for _, b in batch}
        assert all(bucket_of[item] == bucket for item, _ in batch)
        sizes[bucket].append(len(batch))
    for bucket, n in counts.items():
        kept = sorted(sizes[bucket], reverse=True)
        assert kept[:-1] == [4] * (len(kept) - 1) and 0 < sum(kept) <= n
    seen = [item for r in ranks for batch in r for item, _ in batch]
    assert len(seen) == len(set(seen)) and len(bucket_of) - len(seen) < world_size * 4


@pytest.mark.parametrize('seed', range(4))
@pytest.mark.parametrize('batch_size', [1, 3, 4])
def test_as_filled_releases_a_batch_as_its_last_item_comes_then_the_rest_in_aspect_order(
        seed, batch_size):
    """What a streamed source (tar shards, a hub dataset) relies on, against the batches
    worked out from the whole stream at once: each bucket's items in stream order cut into
    batches, each released as its last item is read (so at most batch_size - 1 items a
    bucket wait); then what is left, in catch-all batches chained in aspect order."""
    rng = random.Random(seed)
    bucket_of = [rng.choice([0, 0, 1, 2, 2, 4]) for _ in range(rng.randint(0, 40))]
    read = []

    def stream():
        for item, bucket in enumerate(bucket_of):
            read.append(item)
            yield item, bucket

    released, waiting, last_read = [], [], []
    for batch in B.as_filled(stream(), batch_size):
        released.append(batch)
        waiting.append(len(read) - sum(map(len, released)))
        last_read.append(read[-1] if read else None)

    by_bucket = collections.defaultdict(list)
    for item, bucket in enumerate(bucket_of):
        by_bucket[bucket].append(item)
    full, left = [], []
    for bucket, items in by_bucket.items():
        cut = len(items) // batch_size * batch_size
        full += [[(i, bucket) for i in items[k:k + batch_size]] for k in range(0, cut, batch_size)]
        left += items[cut:]
    full.sort(key=lambda batch: batch[-1][0])
    assert released[:len(full)] == full
    assert last_read[:len(full)] == [batch[-1][0] for batch in full]
    assert max(waiting[:len(full)], default=0) <= len(by_bucket) * (batch_size - 1)
    chained = [item for batch in released[len(full):] for item, _ in batch]
    assert sorted(chained) == sorted(left)
    assert [bucket_of[i] for i in chained] == sorted(bucket_of[i] for i in chained)

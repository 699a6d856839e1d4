"""Aspect-ratio buckets (NovelAI's scheme): instead of centre-cropping every image to a
square, which cuts a band off every picture that is not one, each image goes to the bucket
(width, height) of the nearest aspect ratio at about the same pixel area, is resized to
cover it (so at most a sliver is cropped), and every batch is drawn from one bucket (a
batch must be one tensor shape).

Pure functions over sizes and item indices: the datasets and samplers that use them live
with the readers.
"""

import math

import numpy as np


def bucket_table(image_size, step=64, max_aspect=2.0):
    """The buckets (width, height), sides multiples of `step`, of about image_size² pixels:
    for each width from `step` up, the largest height with width * height <= image_size²,
    and the same with the sides swapped; those no longer than `max_aspect` to one are
    kept. Sorted from the tallest to the widest."""
    area = image_size * image_size
    buckets = set()
    for width in range(step, area // step + 1, step):
        height = area // width // step * step
        if height < step:
            break
        if max(width, height) <= max_aspect * min(width, height):
            buckets.update({(width, height), (height, width)})
    return sorted(buckets, key=lambda b: b[0] / b[1])


def assign(width, height, buckets):
    """The index of the bucket whose aspect ratio is nearest (in log aspect, so 1:2 and 2:1
    are as far from a square) to a width x height image's. An image more extreme than
    the table's most extreme bucket goes to it (clamped), and loses more to the crop."""
    aspect = math.log(width / height)
    return min(range(len(buckets)),
               key=lambda i: abs(math.log(buckets[i][0] / buckets[i][1]) - aspect))


def epoch_plan(bucket_of_each_item, batch_size, world_size, rank, seed, epoch, catch_all=True):
    """One rank's batches for one epoch, each a list of (item, bucket): the bucket is the
    one its image is resized to cover, the same for the whole batch.

    Each bucket's items are shuffled and cut into full batches. What is left of each bucket
    (less than a batch) is chained in aspect order (buckets are indexed so), and cut into
    catch-all batches, each resized to the bucket that holds most of it: its neighbours
    differ little in aspect. The batches are shuffled together (so buckets are drawn in
    proportion to what they hold), and dealt to the ranks round robin after trimming to a
    multiple of `world_size`, so every rank runs the same number of batches (no rank waits
    in an all-reduce). An item is in at most one batch of one rank; the ones left out (the
    last partial catch-all batch and the trimmed batches: fewer than world_size *
    batch_size) differ from epoch to epoch. The plan follows from (seed, epoch) alone, the
    same on every rank.

    Without `catch_all` (a latent cache: its latents cannot be resized to a neighbour's
    shape as images are), each bucket's leftovers make a smaller batch of their own, and
    only the trimmed batches are left out.
    """
    rng = np.random.default_rng([seed, epoch])
    by_bucket = {}
    for item, bucket in enumerate(bucket_of_each_item):
        by_bucket.setdefault(bucket, []).append(item)
    batches, leftovers = [], []
    for bucket in sorted(by_bucket):
        items = [by_bucket[bucket][i] for i in rng.permutation(len(by_bucket[bucket]))]
        full = len(items) // batch_size * batch_size if catch_all else len(items)
        batches += [[(item, bucket) for item in items[i:i + batch_size]]
                    for i in range(0, full, batch_size)]
        leftovers += [(item, bucket) for item in items[full:]]
    usable = len(leftovers) // batch_size * batch_size
    batches += catch_all_batches(leftovers[:usable], batch_size)
    batches = [batches[i] for i in rng.permutation(len(batches))]
    batches = batches[:len(batches) // world_size * world_size]
    return batches[rank::world_size]


def catch_all_batches(leftovers, batch_size):
    """Leftover (item, bucket) pairs, in aspect order, cut into batches of batch_size (the
    last may be short), each resized to the bucket that holds most of it."""
    batches = []
    for i in range(0, len(leftovers), batch_size):
        chunk = leftovers[i:i + batch_size]
        buckets = [bucket for _, bucket in chunk]
        target = max(buckets, key=buckets.count)
        batches.append([(item, target) for item, _ in chunk])
    return batches


def as_filled(pairs, batch_size):
    """Batches of a stream of (item, bucket) pairs, in one pass with a buffer per bucket:
    a bucket's batch as soon as it holds batch_size items; at the end, what the buffers
    hold as catch-all batches, the last one short rather than left out. So n items make
    ceil(n / batch_size) batches, whatever their buckets: a reader that knows how many
    items it will read knows how many batches it will yield."""
    held = {}
    for item, bucket in pairs:
        buffer = held.setdefault(bucket, [])
        buffer.append((item, bucket))
        if len(buffer) == batch_size:
            yield held.pop(bucket)
    yield from catch_all_batches([pair for bucket in sorted(held) for pair in held[bucket]],
                                 batch_size)

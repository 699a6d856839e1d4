"""Captions, where a training set has them, and how far their CLOOB text embeddings sit
from the images' CLOOB image embeddings on that set.

Every input kind can carry one caption per image: a column of a table (img2dataset's
`caption`, a dataset's `text`), a `.txt` (or the `caption` of a `.json`) in a tar
sample, a TAB-separated caption after a path in a path list, or an IMAGE.txt file beside
the image (kohya's convention). A missing or blank caption is None: that image is
conditioned on its image embedding alone.
"""

import json
from pathlib import Path

import torch

CAPTION_COLUMNS = ('caption', 'text')  # looked for in this order when not named
REPORT_SAMPLE = 1000  # pairs per cache part that the similarity report keeps


def clean(text):
    """A caption as stored: stripped text, or None when there is none."""
    if isinstance(text, bytes):
        text = text.decode('utf-8', 'replace')
    if not isinstance(text, str):
        return None
    text = text.strip()
    return text or None


def split_line(line):
    """A path list's line -> (path, caption or None): `path<TAB>caption` or a bare path."""
    path, _, caption = line.partition('\t')
    return path, clean(caption)


def beside(path):
    """The caption in IMAGE.txt beside IMAGE.EXT, or None."""
    try:
        return clean(Path(path).with_suffix('.txt').read_text(encoding='utf-8', errors='replace'))
    except OSError:
        return None


def of_sample(sample):
    """A webdataset sample's caption: its .txt, else the `caption` of its .json."""
    if 'txt' in sample:
        return clean(sample['txt'])
    if 'json' in sample:
        try:
            return clean(json.loads(sample['json']).get('caption'))
        except (ValueError, AttributeError):
            return None
    return None


def choose_text(has_text, p):
    """Which examples are conditioned on their caption's text embedding: each one that has
    a caption, with probability p (drawn from torch's generator on has_text's device)."""
    return (torch.rand(has_text.shape[0], device=has_text.device) < p) & has_text


def similarities(image_embeds, text_embeds):
    """Cosine similarities of each image's embedding with its own caption's text embedding,
    and with another image's caption (image i, caption i + n//2 mod n: the baseline a
    caption's match must beat). Both [n]; the second empty when n < 2."""
    image = torch.nn.functional.normalize(image_embeds.float(), dim=1)
    text = torch.nn.functional.normalize(text_embeds.float(), dim=1)
    matched = (image * text).sum(1)
    n = len(image)
    mismatched = (image * text.roll(n // 2, 0)).sum(1) if n > 1 else matched[:0]
    return matched, mismatched


def summary(values):
    values = torch.as_tensor(values, dtype=torch.float64)
    if not len(values):
        return None
    q1, median, q3 = torch.quantile(values, torch.tensor([.25, .5, .75], dtype=torch.float64))
    return {'pairs': len(values), 'mean': values.mean().item(), 'q1': q1.item(),
            'median': median.item(), 'q3': q3.item()}


def gap_report(matched, mismatched):
    """The report of how far captions' text embeddings sit from their images' embeddings:
    mean and quartiles of the cosine similarity of matched pairs and of mismatched ones."""
    return {'matched': summary(matched), 'mismatched': summary(mismatched)}


@torch.no_grad()
def measure_gap(source, cloob, image_size, limit=2048, batch_size=64, device='cpu'):
    """The gap report on the first `limit` readable, captioned images of a Source, each
    batch's mismatched pairs drawn from within it (as a cache part's are); None when none
    of them has a caption."""
    from .sources import transformed
    matched, mismatched, pending = [], [], []

    def embed_pending():
        images = torch.stack([image for image, _ in pending]).to(device)
        pairs = similarities(cloob.embed_images(images),
                             cloob.embed_texts([text for _, text in pending]))
        for values, found in zip((matched, mismatched), pairs):
            values += found.tolist()
        pending.clear()
    for unit in range(len(source)):
        for _, image, text in transformed(source.items(unit), image_size):
            if image is not None and text is not None:
                pending.append((image, text))
                limit -= 1
            if len(pending) == batch_size or (pending and not limit):
                embed_pending()
            if not limit:
                break
        if not limit:
            break
    if pending:
        embed_pending()
    return gap_report(matched, mismatched) if matched else None


def describe_gap(report):
    """The report in lines a user reads."""
    def line(name, s):
        return (f'  {name}: mean {s["mean"]:.3f}, quartiles {s["q1"]:.3f} / {s["median"]:.3f} / '
                f'{s["q3"]:.3f} ({s["pairs"]} pairs)')
    lines = ['CLOOB cosine similarity of image and caption embeddings:',
             line('image and its caption', report['matched'])]
    if report['mismatched'] is not None:
        lines.append(line('image and another caption (baseline)', report['mismatched']))
    return '\n'.join(lines)

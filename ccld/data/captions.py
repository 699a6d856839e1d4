"""Captions, where a training set has them, and how training chooses between a caption's
CLOOB text embedding and its image's embedding (gap.py measures how far apart they are).

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

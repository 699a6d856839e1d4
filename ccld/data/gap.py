"""The image/caption gap report: how close CLOOB puts each image's embedding to its own
caption's text embedding on a training set, against another image's caption as the
baseline. precompute_latents.py keeps the pairs of each cache part and writes the report
to the manifest; compute_ae_scale.py --captions measures it on a sample (measure_gap).
"""

import torch

REPORT_SAMPLE = 1000  # pairs per cache part that the report keeps


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

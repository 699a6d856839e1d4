"""How closely images follow their prompts: the CLOOB similarity between each prompt's
text embedding and the image embedding of an image made for it.

Training never sees captions, so the loss says nothing about whether the text side is
being learned; this number does. Higher is better (cosine similarity, at most 1).
"""

import torch
from torch.nn import functional as F


@torch.no_grad()
def cloob_scores(cloob, images, text_embeds):
    """images [n, 3, H, W] in [0, 1] and one text embedding per image [n, d] -> [n]."""
    image_embeds = cloob.embed_images(images.to(text_embeds.device))
    return (F.normalize(image_embeds.float(), dim=-1) *
            F.normalize(text_embeds.float(), dim=-1)).sum(-1)


def prompt_embedding(text_embeds, weights):
    """One text embedding [d] for k weighted prompts [k, d]: the direction of their
    weighted mean (for positive weights; a negative weight points away from its prompt,
    as guidance pushes away from it)."""
    weights = torch.tensor(weights, dtype=torch.float32, device=text_embeds.device)
    mean = (weights[:, None] * F.normalize(text_embeds.float(), dim=-1)).sum(0)
    return F.normalize(mean, dim=0)


def scorer(cloob, text_embeds, weights, scores):
    """annotate() for generate.write_samples: each image's CLOOB score against the text
    prompts (their weighted mean embedding), kept in `scores` and given as cloob_score."""
    target = prompt_embedding(text_embeds, weights)

    def annotate(batch):
        new = cloob_scores(cloob, batch, target.expand(len(batch), -1)).tolist()
        scores.extend(new)
        return [{'cloob_score': score} for score in new]
    return annotate

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

"""Loading a frozen CLOOB and embedding images and prompts into its shared space."""

from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from cloob_training import model_pt, pretrained


class CLOOBEmbedder(nn.Module):
    """A frozen CLOOB: images in [0, 1] and prompts in, unit-norm embeddings out."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.image_size = model.config['image_encoder']['image_size']
        self.requires_grad_(False)
        self.eval()

    @property
    def embed_dim(self):
        return self.model.config['d_embed']

    def embed_images(self, images):
        images = F.interpolate(images, (self.image_size, self.image_size), mode='bicubic',
                               align_corners=False)
        return self.model.image_encoder(self.model.normalize(images)).float()

    def embed_texts(self, texts):
        device = next(self.parameters()).device
        return self.model.text_encoder(self.model.tokenize(texts).to(device)).float()


def describe(checkpoint):
    """What identifies a CLOOB checkpoint in records: its name and its file's sha256. A
    pretrained name's file is checked against the sha256 in its released file name."""
    if checkpoint in pretrained.list_configs():
        url = pretrained.get_config(checkpoint)['url']
        digest = Path(url.rsplit('/', 1)[-1]).stem.rpartition('-')[2]
    else:
        from ..files import sha256
        digest = sha256(checkpoint)
    return {'name': str(checkpoint), 'sha256': digest}


def load_cloob(checkpoint, device='cpu', init_weights=False):
    """A pretrained name or a .pkl path -> frozen CLOOBEmbedder on `device`.

    The model is built on the meta device and takes the tensors read from the file as its
    own; `init_weights` initialises it first all the same (see load_autoencoder). Raises
    UserError for unknown names, missing files and incomplete checkpoints.
    """
    config, path = pretrained.resolve_checkpoint(checkpoint)
    with nullcontext() if init_weights else torch.device('meta'):
        model = model_pt.get_pt_model(config)
    model.load_state_dict(model_pt.get_pt_params(config, path), strict=True, assign=True)
    return CLOOBEmbedder(model).to(device)

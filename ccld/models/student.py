"""A distilled student: the teacher's DiffusionModel plus an embedding of the guidance scale w.

Guidance distillation (Meng et al., "On Distillation of Guided Diffusion Models", 2023)
teaches one call of the student to give the teacher's guided v, uncond + w (cond -
uncond), for any w of a range; so the student needs w as an input. Here w goes through
fixed Fourier features and a small MLP into a vector added to the U-Net's conditioning
(what every Modulation layer reads). The MLP's last layer starts at zero, so a fresh
student is exactly its teacher, whatever w: every other state-dict key is the teacher's,
and the teacher's weights load into it unchanged.
"""

import torch
from torch import nn

from .unet import COND_DIM, DiffusionModel, FourierFeatures

PREFIX = 'guidance_embed.'
FOURIER_FEATURES = 256
# Frequencies of the Fourier features of w: periods of a few units over w in [0, 10].
FOURIER_STD = 0.25


class GuidanceEmbedding(nn.Module):
    """w [n] -> a [n, 1024] offset of the conditioning vector; zero until trained."""

    def __init__(self):
        super().__init__()
        self.fourier = FourierFeatures(1, FOURIER_FEATURES, std=FOURIER_STD)
        self.mlp = nn.Sequential(nn.Linear(FOURIER_FEATURES, COND_DIM), nn.ReLU(),
                                 nn.Linear(COND_DIM, COND_DIM))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, w):
        return self.mlp(self.fourier(w[:, None]))


class StudentModel(DiffusionModel):
    """A DiffusionModel whose forward also takes the guidance scale w ([n] or a number).

    model(x, t, embed, w) is the student's guided v in one call. Without w it is w = 1,
    the teacher's conditional v: so a student also runs wherever a DiffusionModel does.
    `guidance_range` (not a weight) is the w range it was distilled for, when known.
    """

    def __init__(self, base_channels, channel_multipliers, autoencoder_scale=1.0):
        super().__init__(base_channels, channel_multipliers, autoencoder_scale)
        self.guidance_embed = GuidanceEmbedding()
        self.guidance_range = None

    def forward(self, x, t, clip_embed, guidance_scale=1.0):
        w = torch.as_tensor(guidance_scale, dtype=t.dtype, device=t.device).expand(t.shape)
        cond = self.conditioning(t, clip_embed) + self.guidance_embed(w)
        return self.denoise(x, t, cond)


def is_student(state_dict):
    """Whether a state dict is a StudentModel's (it has the guidance embedding)."""
    return any(key.startswith(PREFIX) for key in state_dict)


def student_of(teacher):
    """A fresh StudentModel of a DiffusionModel teacher (or a copy of a student teacher,
    for the next round of progressive distillation), on the teacher's device."""
    base, mults = teacher.widths
    # The same fresh weights on every rank (its embedding's), whatever the random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        student = StudentModel(base, mults).to(teacher.autoencoder_scale.device)
    state = teacher.state_dict()
    missing, unexpected = student.load_state_dict(state, strict=is_student(state))
    assert not unexpected and all(key.startswith(PREFIX) for key in missing), (missing, unexpected)
    student.guidance_range = getattr(teacher, 'guidance_range', None)
    return student

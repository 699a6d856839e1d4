"""CompVis' KL-regularised autoencoder (kl-f4 ... kl-f32).

The encoder and decoder are taming-transformers' modules, so the parameter names
match released CompVis checkpoints exactly. The training loss (LPIPS plus a patch
discriminator, ldm.modules.losses) is never built here: encoding and decoding do not
need it, and its LPIPS needs VGG weights. train_autoencoder.py builds it beside the
model from the config kept on `lossconfig`.
"""

from __future__ import annotations

import contextlib
import io
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn
from taming.modules.diffusionmodules.model import Decoder, Encoder

from ccld.errors import UserError
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution

AUTOENCODER_PREFIXES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


class AutoencoderKL(nn.Module):
    """Maps images in [-1, 1] to a diagonal Gaussian over latents and back.

    `image_key` and `monitor` are accepted (and kept) so CompVis configs build
    unchanged; other unknown config parameters are ignored for the same reason.
    """

    def __init__(self, ddconfig: dict, lossconfig: dict, embed_dim: int,
                 ckpt_path: str | None = None, ignore_keys=(),
                 image_key: str = "image", monitor: str | None = None, **unused):
        super().__init__()
        if not ddconfig.get("double_z", True):
            raise ValueError("AutoencoderKL needs ddconfig.double_z: true "
                             "(the encoder must emit mean and log-variance)")
        # taming's Decoder prints the latent shape on construction.
        with contextlib.redirect_stdout(io.StringIO()):
            self.encoder = Encoder(**ddconfig)
            self.decoder = Decoder(**ddconfig)
        z_channels = ddconfig["z_channels"]
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)
        self.embed_dim = embed_dim
        self.lossconfig = lossconfig
        self.image_key = image_key
        self.monitor = monitor
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys=ignore_keys)

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor, sample_posterior: bool = True):
        posterior = self.encode(x)
        z = posterior.sample() if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def init_from_ckpt(self, path, ignore_keys=()) -> None:
        """Load autoencoder weights, refusing any checkpoint that does not fit.

        Keys outside the autoencoder (`loss.*`, and anything else not under
        encoder/decoder/quant_conv/post_quant_conv) are skipped. Keys starting
        with a prefix in `ignore_keys` are skipped and keep their initial values.
        Every other parameter must be present with the right shape: the
        original loaded with strict=False and so decoded garbage silently.
        """
        ignore_keys = tuple(ignore_keys)
        state = {k: v for k, v in read_state_dict(path).items()
                 if k.startswith(AUTOENCODER_PREFIXES) and not k.startswith(ignore_keys)}
        expected = {k: v for k, v in self.state_dict().items()
                    if not k.startswith(ignore_keys)}
        missing = [k for k in expected if k not in state]
        unexpected = [k for k in state if k not in expected]
        wrong_shape = [f"{k} is {list(v.shape)}, model has {list(expected[k].shape)}"
                       for k, v in state.items()
                       if k in expected and v.shape != expected[k].shape]
        problems = [_describe(names, what) for names, what in (
            (missing, "missing"), (unexpected, "unexpected"),
            (wrong_shape, "wrong-shaped")) if names]
        if problems:
            raise UserError(f"checkpoint {path} does not fit this autoencoder config: "
                            f"{'; '.join(problems)}; use the .yaml that came with "
                            "this checkpoint")
        # Everything was checked above; only ignored keys are left unloaded. The file's
        # tensors become the model's own (no copy; a model built on the meta device is
        # never initialised), in the model's dtype.
        self.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()},
                             strict=False, assign=True)


def read_state_dict(path) -> dict[str, torch.Tensor]:
    """Tensors of a CompVis .ckpt ({'state_dict': ...}), a bare state dict or a .safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found; check the path")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            obj = load_file(path, backend="pread")
        else:
            obj = _torch_load(path)
    except Exception as e:  # unreadable for any reason: tell the user which file
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot read checkpoint {path}: {reason}") from e
    state = obj.get("state_dict", obj) if isinstance(obj, Mapping) else None
    if not isinstance(state, Mapping) or not all(
            isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} is not a state dict nor a checkpoint with a "
                        "'state_dict' entry; pass a CompVis autoencoder checkpoint")
    return dict(state)


def _torch_load(path: Path):
    # Mapped, not read: the tensors are read from the file when used, and the loss's
    # weights (discriminator, LPIPS) that CompVis checkpoints carry are never read.
    mmap = zipfile.is_zipfile(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        # Lightning 1.x checkpoints (as some CompVis releases are) pickle callback
        # objects next to the weights, which the safe loader refuses. The user chose
        # this file, so fall back to full unpickling for it.
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)


def _describe(names: list[str], what: str, shown: int = 3) -> str:
    more = f", ... ({len(names) - shown} more)" if len(names) > shown else ""
    return f"{len(names)} {what} key{'s' if len(names) != 1 else ''} ({', '.join(names[:shown])}{more})"

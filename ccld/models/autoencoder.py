"""Find, validate and load CompVis KL autoencoders.

Follows the original CLI convention: an autoencoder NAME means NAME.yaml (the
CompVis config) next to NAME.ckpt (its weights). Every way this can go wrong is
reported as a one-line UserError that names the file and says what to do.
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path

import torch
from omegaconf import OmegaConf

from ..errors import UserError, reason as error_reason
from ldm.models.autoencoder import AutoencoderKL, read_state_dict

KL_TARGET = "ldm.models.autoencoder.AutoencoderKL"
DDCONFIG_KEYS = ("ch", "out_ch", "ch_mult", "num_res_blocks", "attn_resolutions",
                 "in_channels", "resolution", "z_channels")
KL_F8_CONFIG = "latent-diffusion/configs/autoencoder/autoencoder_kl_32x32x4.yaml"
KL_F8_WEIGHTS = "model.ckpt in ommer-lab.com/files/latent-diffusion/kl-f8.zip"
KL_F8_HINT = f"for kl-f8: {KL_F8_CONFIG} with {KL_F8_WEIGHTS}"
ENCODER_PREFIXES = ("encoder.", "quant_conv.")  # what makes the latents


def read_config(path) -> dict:
    """The config at `path` as a plain dict, checked to describe a KL autoencoder."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"autoencoder config {path} not found; pass the .yaml that "
                        f"belongs to the checkpoint ({KL_F8_HINT})")
    try:
        config = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as e:
        reason = error_reason(e)
        raise UserError(f"cannot parse autoencoder config {path}: {reason}") from e
    model = config.get("model") if isinstance(config, dict) else None
    params = model.get("params") if isinstance(model, dict) else None
    if not isinstance(params, dict) or not isinstance(params.get("ddconfig"), dict):
        raise UserError(f"{path} has no model.params.ddconfig, so it is not a CompVis "
                        f"autoencoder config; pass one ({KL_F8_HINT})")
    target = model.get("target", KL_TARGET)
    if target != KL_TARGET or "n_embed" in params:
        raise UserError(f"{path} describes {target}"
                        f"{' with a codebook (n_embed)' if 'n_embed' in params else ''}, not a "
                        f"KL autoencoder; only {KL_TARGET} configs are supported ({KL_F8_HINT})")
    if "embed_dim" not in params:
        raise UserError(f"{path} lacks model.params.embed_dim; use a complete CompVis "
                        "KL autoencoder config")
    ddconfig = params["ddconfig"]
    missing = [k for k in DDCONFIG_KEYS if k not in ddconfig]
    if missing:
        raise UserError(f"{path}: model.params.ddconfig lacks {', '.join(missing)}; "
                        "use a complete CompVis KL autoencoder config")
    if not ddconfig.get("double_z", True):
        raise UserError(f"{path}: ddconfig.double_z is false, but a KL autoencoder "
                        "needs double_z: true")
    return config


def build_autoencoder(config: dict) -> AutoencoderKL:
    """A randomly initialised autoencoder for a config from `read_config`."""
    # Weights come from the caller, not from a ckpt_path some configs carry; the
    # loss config is only recorded, so configs stripped of it still build.
    params = {k: v for k, v in config["model"]["params"].items() if k != "ckpt_path"}
    return AutoencoderKL(**{"lossconfig": None, **params})


@contextlib.contextmanager
def reading_weights(path, what="autoencoder checkpoint"):
    """ldm's weight readers report a file torch cannot read with all torch says (a
    paragraph, for a truncated zip); inside this block that is one short line naming the
    file and saying what to do."""
    try:
        yield
    except UserError as e:
        if e.__cause__ is None:  # one of ldm's own lines (a file that does not fit)
            raise
        raise UserError(f"cannot read {what} {path} "
                        f"({error_reason(e.__cause__)}): it is truncated, corrupt or not a "
                        "checkpoint; download or copy it again") from None


def read_weights(path, what="autoencoder checkpoint") -> dict:
    """The tensors of an autoencoder checkpoint, or another weights file (`what` names it),
    as ldm.models.autoencoder.read_state_dict reads them."""
    with reading_weights(path, what):
        return read_state_dict(path)


def weights_path(name) -> Path:
    """NAME.ckpt, or NAME.safetensors when only that exists."""
    safetensors = Path(f"{name}.safetensors")
    if safetensors.is_file() and not Path(f"{name}.ckpt").is_file():
        return safetensors
    return Path(f"{name}.ckpt")


def encoder_digest(state) -> str:
    """sha256 of the tensors that make latents (encoder.*, quant_conv.*), by name, shape
    and float32 value: what latent caches, the autoencoder scale and U-Nets depend on. A
    decoder-only finetune keeps it, as does storing the same weights at a precision that
    holds them exactly."""
    digest = hashlib.sha256()
    for key in sorted(k for k in state if k.startswith(ENCODER_PREFIXES)):
        tensor = state[key].detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{key}:{list(tensor.shape)};".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def describe(name) -> dict:
    """What identifies an autoencoder NAME in records: its files, its weights' sha256, the
    digest of its encoder, and the files (by sha256) whose encoder NAME.yaml says it has
    (a decoder-only finetune names the autoencoders it came from), when the claim holds."""
    from ..files import sha256
    weights = weights_path(name)
    encoder = encoder_digest(read_weights(weights))
    lineage = read_lineage(f"{name}.yaml")
    same_encoder_as = lineage.get("same_encoder_as", []) \
        if lineage.get("encoder_sha256") == encoder else []
    return {"name": str(name), "config": str(Path(f"{name}.yaml").resolve()),
            "checkpoint": str(weights.resolve()), "sha256": sha256(weights),
            "encoder_sha256": encoder, "same_encoder_as": list(same_encoder_as)}


def read_lineage(config_path) -> dict:
    """The `ccld` section a finetune wrote into its config ({} for other configs)."""
    try:
        section = OmegaConf.to_container(OmegaConf.load(config_path)).get("ccld")
    except Exception:  # noqa: BLE001 - read_config reports a bad config where it matters
        return {}
    return section if isinstance(section, dict) else {}


def same_encoder(recorded: dict, given: dict) -> bool:
    """Whether the autoencoder a record describes makes the latents `given` (a `describe`)
    makes: the same file, the same encoder digest, or, for records written before encoder
    digests (which have the file's sha256 only), a file `given` was finetuned from with
    its encoder left as it was."""
    if recorded.get("sha256") == given["sha256"]:
        return True
    if recorded.get("encoder_sha256"):
        return recorded["encoder_sha256"] == given["encoder_sha256"]
    return recorded.get("sha256") in given.get("same_encoder_as", ())


def load_autoencoder(name=None, *, config=None, checkpoint=None,
                     device="cpu", init_weights=False) -> AutoencoderKL:
    """A frozen autoencoder in eval mode from NAME (NAME.yaml + NAME.ckpt) or explicit paths.

    NAME.safetensors is used when NAME.ckpt does not exist. Explicit `config` or
    `checkpoint` paths take precedence over those derived from `name`.
    The model is built on the meta device and takes the file's tensors as its own;
    `init_weights` initialises it first all the same, for a seeded training run, whose
    later random draws (its U-Net's init) must stay those it has always made.
    """
    if name is not None:
        config = config if config is not None else f"{name}.yaml"
        checkpoint = checkpoint if checkpoint is not None else weights_path(name)
    if config is None or checkpoint is None:
        raise UserError("no autoencoder given; pass NAME (for NAME.yaml + NAME.ckpt) "
                        "or both a config and a checkpoint path")
    cfg = read_config(config)
    if not Path(checkpoint).is_file():
        raise UserError(f"autoencoder checkpoint {checkpoint} not found; pass the weights "
                        f"that belong to {config} (for kl-f8: {KL_F8_WEIGHTS}; with NAME, "
                        "NAME.safetensors is also accepted)")
    with contextlib.nullcontext() if init_weights else torch.device("meta"):
        model = build_autoencoder(cfg)
    with reading_weights(checkpoint):
        model.init_from_ckpt(checkpoint)
    return model.eval().requires_grad_(False).to(device)


def save_autoencoder(model: AutoencoderKL, config: dict, name,
                     extra_state=None) -> tuple[Path, Path]:
    """Write NAME.yaml and a CompVis-format NAME.ckpt that `load_autoencoder(NAME)` reads,
    each whole or not at all; `extra_state` joins the weights (CompVis checkpoints carry
    their loss's, `loss.*`, which loading skips)."""
    from ..files import atomic_write
    yaml_path, ckpt_path = Path(f"{name}.yaml"), Path(f"{name}.ckpt")
    yaml_path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    state.update({k: v.detach().cpu().contiguous() for k, v in (extra_state or {}).items()})
    with atomic_write(ckpt_path) as f:
        torch.save({"state_dict": state}, f)
    with atomic_write(yaml_path, "w") as f:
        f.write(OmegaConf.to_yaml(OmegaConf.create(config)))
    return yaml_path, ckpt_path

"""Load and save the frozen base: VAE, U-Net, scheduler (and its text encoder) from a diffusers-style folder.

The toy base (``toyworld/pretrained/base``) and a real Stable Diffusion 1.x/2.x folder load the same way::

    FOLDER/unet/{config.json, diffusion_pytorch_model.safetensors}
    FOLDER/vae/{config.json, diffusion_pytorch_model.safetensors}
    FOLDER/scheduler/scheduler_config.json
    FOLDER/text_encoder/ + FOLDER/tokenizer/   (HF CLIPTextModel, or an open_clip model: see text_encoders)

SDXL folders add ``text_encoder_2/`` + ``tokenizer_2/``; their U-Net takes SDXL's added conditioning (`sdxl`).

Only safetensors are loaded: a folder whose weights are pickled (``.bin``, ``.ckpt``, ``.pt``) is refused,
and a missing or corrupt weight file raises `BackboneLoadError` naming the file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

from diffusion_backbone.sampling import make_scheduler
from diffusion_backbone.sdxl import image_size, uses_text_time
from safeio import InputError, atomic_dir

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")


class BackboneLoadError(InputError):
    """A model folder that cannot be loaded (missing, pickled, corrupt); names the path."""


def check_weights_folder(folder: Path, what: str) -> Path:
    """The safetensors file of a component folder; refuses pickled weights and missing files."""
    if not folder.is_dir():
        raise BackboneLoadError(f"{what}: folder {folder} does not exist")
    if not (folder / "config.json").is_file() and not (folder / "open_clip_config.json").is_file():
        raise BackboneLoadError(f"{what}: {folder} has no config.json")
    safes = sorted(folder.glob("*.safetensors"))
    pickled = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if not safes:
        if pickled:
            raise BackboneLoadError(
                f"{what}: {folder} holds only pickled weights ({', '.join(p.name for p in pickled)}); plan2img loads "
                "safetensors only (pickle can run code). Convert them, e.g. with diffusers' save_pretrained("
                "safe_serialization=True)."
            )
        raise BackboneLoadError(f"{what}: {folder} has no .safetensors weight file")
    for path in safes:
        _check_safetensors(path, what)
    return safes[0]


def _check_safetensors(path: Path, what: str) -> None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            keys = list(fh.keys())
            if keys:
                fh.get_slice(keys[-1])  # touches the header's last offset: a truncated file fails here
        size = path.stat().st_size
        if size < 8:
            raise OSError("file too small")
    except Exception as err:  # safetensors raises its own error types
        raise BackboneLoadError(f"{what}: weight file {path} is corrupt or truncated ({err})") from None


def _load(cls, folder: Path, what: str, dtype: torch.dtype):
    check_weights_folder(folder, what)
    try:
        return cls.from_pretrained(str(folder), torch_dtype=dtype, use_safetensors=True, local_files_only=True)
    except Exception as err:
        raise BackboneLoadError(f"{what}: could not load {folder}: {err}") from None


@dataclass
class Backbone:
    """The frozen base: U-Net, VAE, the scheduler config it was trained with, and (optionally) its text encoder."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    scheduler_config: dict
    text_encoder: object | None = None  # a diffusion_backbone.text_encoders.TextEncoder
    path: Path | None = None
    extra: dict = field(default_factory=dict)

    def scheduler(self, name: str = "ddim"):
        """A fresh sampler of kind ``name`` with this model's noise schedule."""
        return make_scheduler(name, self.scheduler_config)

    def training_scheduler(self) -> DDPMScheduler:
        return DDPMScheduler.from_config(self.scheduler_config)

    @property
    def device(self) -> torch.device:
        return self.unet.device

    def to(self, device=None, dtype=None) -> Backbone:
        for module in (self.unet, self.vae):
            if (device is not None and torch.device(device) != module.device) or (
                dtype is not None and dtype != module.dtype
            ):
                module.to(device=device, dtype=dtype)
        if self.text_encoder is not None:
            self.text_encoder.to(device=device, dtype=dtype)
        return self

    def freeze(self) -> Backbone:
        for module in (self.unet, self.vae):
            module.requires_grad_(False).eval()
        if self.text_encoder is not None:
            self.text_encoder.freeze()
        return self


def load_backbone(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    text_encoder: bool = True,
) -> Backbone:
    """Load a diffusers-style folder (toy base or Stable Diffusion) from local files only."""
    root = Path(path)
    if not root.is_dir():
        raise BackboneLoadError(f"model folder {root} does not exist")
    unet = _load(UNet2DConditionModel, root / "unet", "U-Net", dtype)
    vae = _load(AutoencoderKL, root / "vae", "VAE", dtype)
    sched_file = root / "scheduler" / "scheduler_config.json"
    if not sched_file.is_file():
        raise BackboneLoadError(f"scheduler: {sched_file} does not exist")
    try:
        scheduler_config = dict(DDPMScheduler.load_config(str(root / "scheduler")))
    except Exception as err:
        raise BackboneLoadError(f"scheduler: could not read {sched_file}: {err}") from None
    encoder = None
    if text_encoder and (root / "text_encoder").is_dir():
        from diffusion_backbone.text_encoders import load_text_encoder

        encoder = load_text_encoder(root, dtype=dtype)
        if uses_text_time(unet):  # SDXL: the encoder's time_ids follow the U-Net's sample size
            encoder.image_size = image_size(unet, vae)
    backbone = Backbone(unet, vae, scheduler_config, encoder, root)
    return backbone.to(device).freeze()


def save_backbone(backbone: Backbone, path: str | Path, *, dtype: torch.dtype | None = None) -> Path:
    """Write the backbone as a diffusers-style folder (safetensors), atomically (temp folder + rename)."""
    with atomic_dir(path) as tmp:
        for name, module in (("unet", backbone.unet), ("vae", backbone.vae)):
            to_save = module if dtype is None else _cast_copy(module, dtype)
            to_save.save_pretrained(str(tmp / name), safe_serialization=True)
        DDPMScheduler.from_config(backbone.scheduler_config).save_pretrained(str(tmp / "scheduler"))
        if backbone.text_encoder is not None:
            backbone.text_encoder.save(tmp, dtype=dtype)
    return Path(path)


def _cast_copy(module, dtype):
    import copy

    return copy.deepcopy(module).to(dtype)

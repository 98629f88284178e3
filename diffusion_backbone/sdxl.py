"""SDXL's added conditioning: the pooled ``text_embeds`` and the six ``time_ids`` of its micro-conditioning.

An SDXL U-Net (``addition_embed_type="text_time"``) adds to its time embedding a projection of the pooled text
vector and of Fourier features of (original height, original width, crop top, crop left, target height,
target width). A `Conditioning` carries them as ``pooled`` and ``time_ids``; `added_cond_kwargs` turns them
into what the U-Net's forward takes.
"""

from __future__ import annotations

import torch

from diffusion_backbone.conditioning import Conditioning


def uses_text_time(unet) -> bool:
    """True for U-Nets with SDXL's added conditioning (pooled text embeddings + size/crop time ids)."""
    return getattr(unet.config, "addition_embed_type", None) == "text_time"


def text_embeds_dim(unet) -> int:
    """Width of the pooled ``text_embeds`` an SDXL U-Net expects (its add-embedding input minus the time ids)."""
    if not uses_text_time(unet):
        raise ValueError("this U-Net has no SDXL added conditioning (addition_embed_type is not 'text_time')")
    c = unet.config
    return int(c.projection_class_embeddings_input_dim) - 6 * int(c.addition_time_embed_dim)


def image_size(unet, vae) -> tuple[int, int]:
    """The pixel size the U-Net samples at by default: latent size times the VAE's downsampling."""
    size = unet.config.sample_size
    h, w = (size, size) if isinstance(size, int) else size
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    return int(h) * f, int(w) * f


def default_time_ids(size: tuple[int, int], crop: tuple[int, int] = (0, 0)) -> list[int]:
    """SDXL's micro-conditioning for an uncropped image generated at its own size, as its pipeline builds it:
    original size, crop top-left, target size."""
    return [int(size[0]), int(size[1]), int(crop[0]), int(crop[1]), int(size[0]), int(size[1])]


def with_time_ids(cond: Conditioning, time_ids: list[int] | torch.Tensor) -> Conditioning:
    """``cond`` with the same ``time_ids`` on every row."""
    t = torch.as_tensor(time_ids, dtype=cond.tokens.dtype, device=cond.tokens.device).reshape(1, -1)
    return Conditioning(
        cond.tokens, cond.mask, cond.pooled, cond.per_depth, cond.regions, t.expand(cond.batch_size, -1)
    )


def added_cond_kwargs(unet, cond: Conditioning) -> dict | None:
    """The ``added_cond_kwargs`` an SDXL U-Net's forward needs, from ``cond``; None for other U-Nets."""
    if not uses_text_time(unet):
        return None
    if cond.pooled is None or cond.time_ids is None:
        raise ValueError(
            "this is an SDXL U-Net: its conditioning needs a pooled text vector and time_ids "
            f"(got pooled={'yes' if cond.pooled is not None else 'no'}, "
            f"time_ids={'yes' if cond.time_ids is not None else 'no'})"
        )
    expected = text_embeds_dim(unet)
    if cond.pooled.shape[1] != expected:
        raise ValueError(
            f"the pooled text vector has width {cond.pooled.shape[1]}; this SDXL U-Net expects {expected}"
        )
    return {"text_embeds": cond.pooled, "time_ids": cond.time_ids}

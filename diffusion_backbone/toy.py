"""Configurations of the toy base models: the real diffusers / open_clip classes at small size.

The toy world's images are 64x64; the VAE maps them to 16x16x4 latents (f=4: see docs/results.md for
why not f=8), the U-Net denoises those, conditioned on the toy CLIP's text token states.
"""

from __future__ import annotations

import json
from pathlib import Path

from diffusers import AutoencoderKL, UNet2DConditionModel

IMAGE_SIZE = 64


def toy_vae(block_out_channels: tuple[int, ...] = (32, 64, 64), latent_channels: int = 4) -> AutoencoderKL:
    """A small `AutoencoderKL`: downsampling factor 2 ** (len(block_out_channels) - 1); no mid attention."""
    n = len(block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=block_out_channels,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=16,
        sample_size=IMAGE_SIZE,
        mid_block_add_attention=False,
        scaling_factor=1.0,  # replaced by 1 / std of the training latents after training
    )


def toy_unet(
    cross_attention_dim: int,
    sample_size: int = 16,
    block_out_channels: tuple[int, ...] = (64, 128, 192),
    attention_head_dim: int = 32,
) -> UNet2DConditionModel:
    """A small `UNet2DConditionModel`: attention (self + cross) below the full latent resolution.

    Attention at the full 16x16 resolution tripled the CPU cost of a training step (1.4 s -> 4.2 s at batch
    64) for a world whose layout is a 3x3 grid, which the 8x8 and 4x4 attention layers resolve.
    """
    n = len(block_out_channels)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        block_out_channels=block_out_channels,
        layers_per_block=1,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=attention_head_dim,
        norm_num_groups=32,
    )


def toy_clip_config() -> dict:
    """The registered open_clip config ``plan2img-toy-clip`` (see configs/plan2img-toy-clip.json)."""
    return json.loads((Path(__file__).parent / "configs" / "plan2img-toy-clip.json").read_text())

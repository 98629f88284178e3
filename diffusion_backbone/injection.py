"""Conditioning injection into a diffusers U-Net beyond plain cross-attention.

- **Time-embedding modulation** (the "how" stream): a module mapping a pooled vector to the time-embedding
  width is installed as the U-Net's ``class_embedding`` (diffusers adds it to the time embedding when
  ``class_labels`` are given). Zero-initialised, it leaves the U-Net's output unchanged until trained.
- **Hierarchical injection**: cross-attention layers are grouped by depth (``outer``: highest resolution,
  ``middle``, ``inner``: lowest resolution and the mid block). A `Conditioning` with ``per_depth`` groups
  gives each group its own tokens/mask through `RoutedAttnProcessor`; layers of groups it does not name
  read the main tokens.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import AttnProcessor2_0

GROUPS = ("outer", "middle", "inner")


def _depth(name: str, n_blocks: int) -> int:
    parts = name.split(".")
    if parts[0] == "mid_block":
        return n_blocks
    index = int(parts[1])
    return index if parts[0] == "down_blocks" else n_blocks - 1 - index


def block_group(name: str, n_blocks: int, attn_depths: list[int] | None = None) -> str:
    """Depth group of an attention layer from its module name (``down_blocks.1...``, ``mid_block...``).

    The mid block is ``inner``; the shallowest depth that has attention is ``outer``; the depths between are
    ``middle`` (the deepest non-mid depth joins ``middle`` too, so each group has layers when the U-Net has
    attention at two or more resolutions besides the mid block).
    """
    depth = _depth(name, n_blocks)
    if depth == n_blocks:
        return "inner"
    depths = sorted(set(attn_depths)) if attn_depths else list(range(n_blocks))
    depths = [d for d in depths if d < n_blocks]
    return "outer" if depth == depths[0] else "middle"


class RoutedAttnProcessor:
    """Wraps the default processor; on cross-attention layers it swaps in its depth group's tokens and mask."""

    def __init__(self, group: str | None):
        self.group = group  # None on self-attention layers
        self.base = AttnProcessor2_0()

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, per_depth=None, **kwargs
    ):
        if self.group is not None and per_depth is not None and self.group in per_depth:
            tokens, mask = per_depth[self.group]
            encoder_hidden_states = tokens
            attention_mask = None
            if mask is not None:  # the U-Net's own convention: 0 keep, -10000 discard, shape (B, 1, M)
                attention_mask = (1.0 - mask.to(hidden_states.dtype))[:, None, :] * -10000.0
        return self.base(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def install_routing(unet) -> dict[str, str]:
    """Put `RoutedAttnProcessor` on every attention layer; returns cross-attention layer -> depth group."""
    n_blocks = len(unet.config.block_out_channels)
    cross = [name for name in unet.attn_processors if ".attn2." in name]
    depths = [_depth(name, n_blocks) for name in cross]
    processors, groups = {}, {}
    for name in unet.attn_processors:
        if ".attn2." in name:
            groups[name] = block_group(name, n_blocks, depths)
            processors[name] = RoutedAttnProcessor(groups[name])
        else:
            processors[name] = RoutedAttnProcessor(None)
    unet.set_attn_processor(processors)
    return groups


def has_routing(unet) -> bool:
    return any(isinstance(p, RoutedAttnProcessor) for p in unet.attn_processors.values())


def time_embedding_dim(unet) -> int:
    return unet.time_embedding.linear_2.out_features


class TimeModulation(torch.nn.Module):
    """pooled (B, d_g) -> (B, time_embedding_dim), zero-initialised: added to the U-Net's time embedding."""

    def __init__(self, d_pooled: int, d_time: int):
        super().__init__()
        self.proj = torch.nn.Sequential(torch.nn.SiLU(), torch.nn.Linear(d_pooled, d_time))
        torch.nn.init.zeros_(self.proj[1].weight)
        torch.nn.init.zeros_(self.proj[1].bias)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.proj(pooled)


def install_time_modulation(unet, module: torch.nn.Module) -> None:
    """Make ``module`` the U-Net's class embedding (diffusers adds it to the time embedding)."""
    if unet.config.class_embed_type not in (None, "projection") or getattr(
        unet.config, "class_embeddings_concat", False
    ):
        raise ValueError(
            f"this U-Net already uses class embeddings ({unet.config.class_embed_type}); "
            "time modulation would clash with them"
        )
    unet.class_embedding = module


def remove_time_modulation(unet) -> None:
    unet.class_embedding = None

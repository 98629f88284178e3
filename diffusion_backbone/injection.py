"""Conditioning injection into a diffusers U-Net beyond plain cross-attention.

- **Time-embedding modulation** (the "how" stream): a module mapping a pooled vector to the time-embedding
  width is installed as the U-Net's ``class_embedding`` (diffusers adds it to the time embedding when
  ``class_labels`` are given). Zero-initialised, it leaves the U-Net's output unchanged until trained.
- **Hierarchical injection**: cross-attention layers are grouped by depth (``outer``: highest resolution,
  ``middle``, ``inner``: lowest resolution and the mid block). A `Conditioning` with ``per_depth`` groups
  gives each group its own tokens/mask through `RoutedAttnProcessor`; layers of groups it does not name
  read the main tokens.
- **Spatial injection** (plan-grounded regions): a `Conditioning` with ``regions`` confines groups of tokens
  to soft region masks; `RoutedAttnProcessor` turns them into an additive attention bias on the
  cross-attention layers whose resolution is selected (`region_bias`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
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


NEG = -10000.0  # the U-Net's own "discard" logit: exp(-10000) is exactly 0 in fp32 and fp16 softmax


def map_level(num_queries: int, mask_hw: tuple[int, int]) -> int:
    """Level of an attention map with ``num_queries`` positions: its side is the mask's side / 2**level."""
    ratio = mask_hw[0] * mask_hw[1] / num_queries
    level = round(math.log2(ratio) / 2) if ratio >= 1 else -1
    if level < 0 or 4**level * num_queries != mask_hw[0] * mask_hw[1]:
        raise ValueError(
            f"an attention map of {num_queries} positions is not the region masks' {mask_hw} size divided by a "
            "power of 2: give masks at the latent resolution"
        )
    return level


def region_bias(token_region: torch.Tensor, masks: torch.Tensor, strength: float, level: int) -> torch.Tensor:
    """Additive cross-attention logits (B, N, M) confining region tokens to their masks at map ``level``.

    ``masks`` (B, K, H, W) are area-pooled by ``2**level``; a token of region k at position p gets
    ``log(1 - strength + strength * mask_k(p))`` (``NEG`` where that is 0), a global token gets 0.
    """
    b, k, h, w = masks.shape
    f = 2**level
    pooled = F.avg_pool2d(masks.float(), f) if f > 1 else masks.float()  # (B, K, h/f, w/f)
    pooled = pooled.flatten(2).transpose(1, 2)  # (B, N, K)
    weight = 1.0 - strength + strength * pooled
    logits = torch.where(weight > 0, weight.clamp_min(1e-30).log(), torch.full_like(weight, NEG)).clamp_min(NEG)
    logits = torch.cat([torch.zeros_like(logits[..., :1]), logits], dim=-1)  # region 0: global, no bias
    index = token_region.clamp(0, k)[:, None, :].expand(-1, logits.shape[1], -1)  # (B, N, M)
    return torch.gather(logits, 2, index)


class RoutedAttnProcessor:
    """Wraps the default processor. On cross-attention layers it swaps in its depth group's tokens and mask
    (``per_depth``), or adds the region bias of ``regions`` (token_region, masks, strength, levels)."""

    def __init__(self, group: str | None):
        self.group = group  # None on self-attention layers
        self.base = AttnProcessor2_0()

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        temb=None,
        per_depth=None,
        regions=None,
        **kwargs,
    ):
        if self.group is not None and per_depth is not None and self.group in per_depth:
            tokens, mask = per_depth[self.group]
            encoder_hidden_states = tokens
            attention_mask = None
            if mask is not None:  # the U-Net's own convention: 0 keep, -10000 discard, shape (B, 1, M)
                attention_mask = (1.0 - mask.to(hidden_states.dtype))[:, None, :] * NEG
        elif self.group is not None and regions is not None:
            attention_mask = self._with_regions(hidden_states, encoder_hidden_states, attention_mask, regions)
        return self.base(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    @staticmethod
    def _with_regions(hidden_states, encoder_hidden_states, attention_mask, regions):
        token_region, masks, strength, levels = regions
        if encoder_hidden_states is None or token_region.shape != encoder_hidden_states.shape[:2]:
            raise ValueError("region token ids do not match the cross-attention tokens")
        n = hidden_states.shape[1] if hidden_states.ndim == 3 else hidden_states.shape[2] * hidden_states.shape[3]
        level = map_level(n, tuple(masks.shape[-2:]))
        if levels is not None and level not in levels:
            return attention_mask
        bias = region_bias(token_region, masks, strength, level).to(hidden_states.dtype)  # (B, N, M)
        return bias if attention_mask is None else attention_mask + bias


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

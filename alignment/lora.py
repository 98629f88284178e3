"""LoRA layers (peft) as the plain low-rank deltas our model folders store: ``NAME::lora_down`` [r, in] and
``NAME::lora_up`` [out, r] with the scaling folded into ``up``, applied (merged) by `llm_bridge.bridge.apply_delta`.
One exporter for every trainer that trains LoRA (the bridge's LLM / U-Net stages, DPO)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from llm_bridge.bridge import LOW_RANK_DOWN, LOW_RANK_UP


@torch.no_grad()
def lora_factors(model: torch.nn.Module, keep: Callable[[str], bool] = lambda name: True) -> dict[str, torch.Tensor]:
    """The low-rank factors of every active adapter of ``model``'s peft layers whose plain weight name (without
    peft's ``.base_layer``) passes ``keep``; several adapters on one layer are stacked along the rank."""
    delta: dict[str, torch.Tensor] = {}
    for name, m in model.named_modules():
        plain = name.replace(".base_layer", "") + ".weight"
        if not isinstance(m, BaseTunerLayer) or not keep(plain):
            continue
        for adapter in m.active_adapters:
            down = m.lora_A[adapter].weight.detach().float()
            up = m.lora_B[adapter].weight.detach().float() * m.scaling[adapter]
            if plain + LOW_RANK_DOWN in delta:
                down = torch.cat([delta[plain + LOW_RANK_DOWN], down])
                up = torch.cat([delta[plain + LOW_RANK_UP], up], dim=1)
            delta[plain + LOW_RANK_DOWN], delta[plain + LOW_RANK_UP] = down.contiguous(), up.contiguous()
    return delta

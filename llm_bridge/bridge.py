"""`LLMBridge`: connector + learned null conditioning, attached to a frozen U-Net; saved like a diffusers model.

A bridge folder holds ``config.json`` (the `ConnectorConfig`, including the LLM layer selection and the LLM
dtype it was trained with) and ``model.safetensors``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from diffusion_backbone.conditioning import Conditioning
from diffusion_backbone.injection import (
    GROUPS,
    has_routing,
    install_routing,
    install_time_modulation,
    time_embedding_dim,
)
from diffusion_backbone.sdxl import text_embeds_dim, uses_text_time
from llm_bridge.connector import Connector, ConnectorConfig, NullConditioning
from llm_bridge.encoder import PlanStates
from safeio import InputError, atomic_dir

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
LLM_DELTA_NAME = "llm_delta.safetensors"  # fine-tuned LLM blocks (strategy B), replacing the planner's
UNET_DELTA_NAME = "unet_delta.safetensors"  # fine-tuned U-Net cross-attention K/V (strategy C)


class BridgeLoadError(InputError):
    """A bridge folder that is missing, corrupt, or does not fit the U-Net; names the path."""


class LLMBridge(nn.Module):
    def __init__(self, config: ConnectorConfig, null_tokens: torch.Tensor, null_mask: torch.Tensor | None):
        super().__init__()
        self.config = config
        self.connector = Connector(config)
        groups = GROUPS if config.hierarchical != "off" else ()
        d_null_pooled = config.d_text_embeds or (config.d_pooled if config.d_time else None)
        self.null = NullConditioning(null_tokens, null_mask, d_null_pooled, groups, config.time_ids)
        self.llm_delta: dict[str, torch.Tensor] = {}  # parameter name -> weights (applied to the planner LLM)
        self.unet_delta: dict[str, torch.Tensor] = {}  # parameter name -> weights (applied to the U-Net)

    # ----------------------------------------------------------------------------------- conditioning
    def conditioning(
        self,
        plan: PlanStates,
        native: Conditioning | None = None,
        timestep: torch.Tensor | None = None,
        region_masks: torch.Tensor | None = None,
    ) -> Conditioning:
        """Connector output; in ``concat`` mode the native text tokens come first (global: they act everywhere).
        ``region_masks`` (B, K, H, W) from the plan's layout add object token groups when ``spatial`` is on."""
        cond = self.connector(plan, timestep, region_masks)
        if self.config.mode == "concat":
            if native is None:
                raise ValueError("a concat-mode bridge needs the native text encoder's conditioning")
            cond = native.concat_tokens(cond)
        return cond

    def null_conditioning(self, batch_size: int, native_null: Conditioning | None = None) -> Conditioning:
        null = self.null(batch_size)
        if self.config.mode == "concat":
            if native_null is None:
                raise ValueError("a concat-mode bridge needs the native unconditional conditioning")
            null = native_null.repeat(batch_size) if native_null.batch_size == 1 else native_null
            return null.concat_tokens(self.null(batch_size))
        return null

    def drop(self, cond: Conditioning, null: Conditioning, drop: torch.Tensor) -> Conditioning:
        """CFG dropout: rows where ``drop`` is True get the null conditioning."""
        rows = [null.index(slice(i, i + 1)) if d else cond.index(slice(i, i + 1)) for i, d in enumerate(drop.tolist())]
        return Conditioning.cat(rows)

    def set_spatial(self, **settings) -> None:
        """Change the spatial-injection settings (``spatial``, ``object_tokens``, ``object_queries``,
        ``region_strength``, ``region_levels``) in place, e.g. to use regions training-free on a bridge trained
        without them. Call `attach` again (or `install_routing`) on the U-Net afterwards."""
        allowed = {"spatial", "object_tokens", "object_queries", "region_strength", "region_levels"}
        unknown = sorted(set(settings) - allowed)
        if unknown:
            raise ValueError(f"unknown spatial setting(s) {unknown}; known: {sorted(allowed)}")
        new = dataclasses.replace(self.config, **settings)  # validates
        for name in settings:
            setattr(self.config, name, getattr(new, name))

    # ----------------------------------------------------------------------------------- U-Net
    def check_unet(self, unet) -> None:
        c = self.config
        if c.d_ctx != unet.config.cross_attention_dim:
            raise BridgeLoadError(
                f"the connector outputs width {c.d_ctx} but the U-Net's cross-attention "
                f"expects {unet.config.cross_attention_dim}"
            )
        if uses_text_time(unet):
            self._check_sdxl(unet)
        elif c.d_text_embeds or c.time_ids is not None:
            raise BridgeLoadError(
                "this connector was built for an SDXL U-Net (text_embeds, time_ids); this U-Net is not SDXL"
            )
        if c.d_time and c.d_time != time_embedding_dim(unet):
            raise BridgeLoadError(
                f"the connector's time modulation has width {c.d_time} but the U-Net's time "
                f"embedding has {time_embedding_dim(unet)}"
            )

    def _check_sdxl(self, unet) -> None:
        c = self.config
        if c.d_time:
            raise BridgeLoadError("an SDXL U-Net takes the pooled vector as text_embeds: the connector must not "
                                  "have a time modulation (d_time)")  # fmt: skip
        if c.mode == "replace" and (c.d_text_embeds != text_embeds_dim(unet) or c.time_ids is None):
            raise BridgeLoadError(
                f"a replace-mode connector for this SDXL U-Net must emit text_embeds of width {text_embeds_dim(unet)} "
                f"and time_ids (it has d_text_embeds={c.d_text_embeds}, time_ids={c.time_ids})"
            )

    def attach(self, unet) -> None:
        """Check dimensions, install the time modulation and (hierarchical, spatial) the routed attention
        processors."""
        self.check_unet(unet)
        apply_delta(unet, self.unet_delta, "U-Net")
        if self.connector.time_modulation is not None:
            install_time_modulation(unet, self.connector.time_modulation)
        if (self.config.hierarchical != "off" or self.config.spatial) and not has_routing(unet):
            install_routing(unet)

    # ----------------------------------------------------------------------------------- files
    def save_pretrained(self, path: str | Path) -> Path:
        with atomic_dir(path) as tmp:
            (tmp / CONFIG_NAME).write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
            state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
            save_file(state, str(tmp / WEIGHTS_NAME))
            for name, delta in ((LLM_DELTA_NAME, self.llm_delta), (UNET_DELTA_NAME, self.unet_delta)):
                if delta:
                    save_file({k: v.detach().contiguous() for k, v in delta.items()}, str(tmp / name))
        return Path(path)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> LLMBridge:
        path = Path(path)
        if not (path / CONFIG_NAME).is_file():
            raise BridgeLoadError(f"bridge folder {path} has no {CONFIG_NAME}")
        pickled = [p.name for p in path.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]
        if not (path / WEIGHTS_NAME).is_file():
            raise BridgeLoadError(
                f"bridge folder {path} has no {WEIGHTS_NAME}"
                + (f" (pickled files {pickled} are not loaded)" if pickled else "")
            )
        try:
            config = ConnectorConfig(**json.loads((path / CONFIG_NAME).read_text()))
            state = load_file(str(path / WEIGHTS_NAME))
        except Exception as err:
            raise BridgeLoadError(f"bridge folder {path} is corrupt: {err}") from None
        bridge = cls(config, state["null.tokens"][0], state.get("null.mask", None))
        try:
            for name, attr in ((LLM_DELTA_NAME, "llm_delta"), (UNET_DELTA_NAME, "unet_delta")):
                if (path / name).is_file():
                    setattr(bridge, attr, load_file(str(path / name)))
        except Exception as err:
            raise BridgeLoadError(f"bridge folder {path} has a corrupt delta file: {err}") from None
        missing, unexpected = bridge.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise BridgeLoadError(
                f"{path / WEIGHTS_NAME} does not match its config: missing {missing[:4]}, unexpected {unexpected[:4]}"
            )
        return bridge


LOW_RANK_DOWN, LOW_RANK_UP = "::lora_down", "::lora_up"  # key suffixes of a low-rank update W += up @ down


@torch.no_grad()
def apply_delta(module: nn.Module, delta: dict[str, torch.Tensor], what: str) -> None:
    """Apply fine-tuned weights to ``module`` (by parameter name): a plain entry replaces the parameter; a pair
    ``NAME::lora_down`` [r, in] / ``NAME::lora_up`` [out, r] adds the low-rank update ``up @ down`` (a LoRA,
    scaling folded into ``up``). Applying the same delta twice to one module is a no-op."""
    if not delta:
        return
    applied = module.__dict__.setdefault("_plan2img_applied_deltas", [])  # the dicts themselves: ids get reused
    if any(d is delta for d in applied):
        return
    params = dict(module.named_parameters())
    names = {k.split("::")[0] for k in delta}
    unknown = [k for k in names if k not in params]
    if unknown:
        raise BridgeLoadError(f"the bridge's {what} weights name parameters this {what} lacks: {unknown[:4]}")
    for k, v in delta.items():
        if "::" in k:
            continue
        if params[k].shape != v.shape:
            raise BridgeLoadError(
                f"{what} parameter {k} has shape {tuple(params[k].shape)}, the bridge's {tuple(v.shape)}"
            )
        params[k].copy_(v.to(device=params[k].device, dtype=params[k].dtype))
    for k in sorted(n for n in names if n + LOW_RANK_DOWN in delta or n + LOW_RANK_UP in delta):
        down, up = delta.get(k + LOW_RANK_DOWN), delta.get(k + LOW_RANK_UP)
        if down is None or up is None or up.shape[1] != down.shape[0]:
            raise BridgeLoadError(f"the bridge's {what} low-rank update of {k} is incomplete or malformed")
        if (up.shape[0], down.shape[1]) != tuple(params[k].shape):
            raise BridgeLoadError(
                f"{what} parameter {k} has shape {tuple(params[k].shape)}, the bridge's low-rank update "
                f"{(up.shape[0], down.shape[1])}"
            )
        # the update is made where the weights are (a model loaded on a GPU adds it there, not from the CPU)
        update = up.to(params[k].device, torch.float32) @ down.to(params[k].device, torch.float32)
        params[k].add_(update.to(params[k].dtype))
    applied.append(delta)

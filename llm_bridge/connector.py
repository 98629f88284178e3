"""Connectors: LLM plan states (B, T, d_llm) -> U-Net conditioning (tokens (B, M, d_ctx) + pooled vector).

Presets by name (`CONNECTOR_PRESETS`): ``linear``; ``mlp`` (GELU); ``resampler-64q`` (64 learned queries
cross-attending to the plan states, ELLA-style); ``resampler-64q-t`` (the same, timestep-aware: AdaLN
modulated by the diffusion timestep, so the conditioning is recomputed each denoising step). Every
connector normalises its input (LayerNorm) and initialises its output projection with a small variance, so
training starts from conditioning that barely moves the frozen U-Net.

Two streams: ``tokens`` for cross-attention ("what"), and ``pooled`` for a zero-initialised modulation of
the U-Net's time embedding ("how"). On SDXL (``d_text_embeds``) the pooled stream is instead the U-Net's own
``text_embeds`` (zero at initialisation, as SDXL's empty negative prompt), and every conditioning carries the
configured ``time_ids``.

Spatial injection (``spatial=True``, given region masks from the plan's layout, `llm_bridge.layout`): besides
the global tokens (the whole plan, acting everywhere), each OBJECT entry gets its own token group, confined to
its region in the U-Net's cross-attention. For the resampler a group is the first ``object_queries`` queries
run over that entry's span of the plan (``object_tokens="span"``) or over the whole plan (``"shared"``, the
ablation: same content in every region); for linear/MLP connectors the entry's own plan tokens are its group.
No new parameters: the same weights make global and object tokens, so a trained bridge can use regions
training-free. Rows whose plan places no object keep exactly today's conditioning.

Hierarchical injection routes plan fields to U-Net depths (``outer``/``middle``/``inner``): ``fixed`` masks
each depth group to its fields; ``learned`` learns a gate per (group, field), starting from the fixed routing.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from diffusion_backbone.conditioning import Conditioning, Regions
from diffusion_backbone.injection import GROUPS, TimeModulation
from diffusion_backbone.sdxl import with_time_ids
from llm_bridge.encoder import FIELD_INDEX, PlanStates

CONNECTOR_PRESETS: dict[str, dict] = {
    "linear": {"kind": "linear"},
    "mlp": {"kind": "mlp"},
    "resampler-64q": {"kind": "resampler", "num_queries": 64},
    "resampler-64q-t": {"kind": "resampler", "num_queries": 64, "timestep_aware": True},
    "resampler-32q": {"kind": "resampler", "num_queries": 32},
}
# Fixed hierarchical routing (seed doc: STYLE early/outer, OBJECT middle, COLOR late/inner).
FIXED_ROUTING: dict[str, tuple[str, ...]] = {
    "outer": ("STYLE", "LIGHTING", "CAMERA"),
    "middle": ("LAYOUT", "OBJECT"),
    "inner": ("COLOR", "MATERIAL", "OBJECT"),
}


@dataclass
class ConnectorConfig:
    d_llm: int  # LLM hidden size
    d_ctx: int  # U-Net cross-attention width
    d_time: int | None = None  # U-Net time-embedding width: enables the pooled stream (None: tokens only)
    kind: str = "resampler"  # linear | mlp | resampler
    layers: str | list[int] = "mean"  # the encoder's layer selection (learned: weights live here)
    num_llm_layers: int | None = None  # needed for learned layer weights
    num_queries: int = 64  # resampler: output tokens
    width: int = 256  # resampler / mlp hidden width
    depth: int = 2  # resampler blocks
    heads: int = 4
    timestep_aware: bool = False  # resampler only: AdaLN on the diffusion timestep (ELLA's TSC)
    d_pooled: int = 256  # width of the pooled vector before the time modulation
    d_text_embeds: int | None = None  # SDXL: width of the pooled text_embeds the U-Net's added conditioning takes
    time_ids: list[int] | None = None  # SDXL: the six micro-conditioning values (original size, crop, target size)
    hierarchical: str = "off"  # off | fixed | learned
    mode: str = "replace"  # replace | concat (native text tokens first, then the connector's)
    init_std: float = 0.02  # std of the output projection (small: start near the base model)
    llm_dtype: str = "float32"  # the LLM precision the connector was trained with
    spatial: bool = False  # per-object token groups confined to the plan's regions (needs region masks)
    object_tokens: str = "span"  # span: a group reads its OBJECT entry only | shared: the whole plan (ablation)
    object_queries: int = 16  # resampler: queries per object group (the first N of the learned queries; 0: all)
    region_strength: float = 1.0  # 1: object tokens get no attention outside their region; 0: no confinement
    region_levels: list[int] | None = None  # U-Net maps (latent side / 2**level) with regions; None: every layer
    preset: str | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in ("linear", "mlp", "resampler"):
            raise ValueError(f"unknown connector kind {self.kind!r}; presets: {list(CONNECTOR_PRESETS)}")
        if self.hierarchical not in ("off", "fixed", "learned"):
            raise ValueError(f"hierarchical must be off, fixed or learned, got {self.hierarchical!r}")
        if self.mode not in ("replace", "concat"):
            raise ValueError(f"mode must be replace or concat, got {self.mode!r}")
        if self.layers == "learned" and not self.num_llm_layers:
            raise ValueError("learned layer weights need num_llm_layers")
        if self.timestep_aware and self.kind != "resampler":
            raise ValueError("only the resampler connector can be timestep-aware")
        if self.object_tokens not in ("span", "shared"):
            raise ValueError(f"object_tokens must be span or shared, got {self.object_tokens!r}")
        if self.object_tokens == "shared" and self.kind != "resampler":
            raise ValueError("object_tokens='shared' needs the resampler connector")
        if not 0 <= self.object_queries <= self.num_queries:
            raise ValueError(f"object_queries must be in 0..{self.num_queries}, got {self.object_queries}")
        if not 0.0 <= self.region_strength <= 1.0:
            raise ValueError(f"region_strength must be in [0, 1], got {self.region_strength}")
        if self.spatial and self.hierarchical != "off":
            raise ValueError("spatial injection and hierarchical injection cannot be combined")
        if self.d_text_embeds and self.d_time:
            raise ValueError("SDXL text_embeds (d_text_embeds) and a time modulation (d_time) cannot be combined")
        if self.time_ids is not None and len(self.time_ids) != 6:
            raise ValueError(f"time_ids must be six values, got {self.time_ids}")

    @classmethod
    def from_preset(cls, name: str, **kwargs) -> ConnectorConfig:
        if name not in CONNECTOR_PRESETS:
            raise ValueError(f"unknown connector preset {name!r}; known: {list(CONNECTOR_PRESETS)}")
        return cls(**{**CONNECTOR_PRESETS[name], "preset": name, **kwargs})

    def to_dict(self) -> dict:
        return asdict(self)


class LayerSelector(nn.Module):
    """Learned softmax weights over LLM layers (each layer LayerNorm-ed first): (B, L, T, d) -> (B, T, d)."""

    def __init__(self, num_layers: int):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(num_layers))  # starts as the normalised mean

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        w = torch.softmax(self.logits, 0).to(states.dtype)
        normed = F.layer_norm(states, states.shape[-1:])
        return torch.einsum("l,bltd->btd", w, normed)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of diffusion timesteps (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class AdaLayerNorm(nn.Module):
    """LayerNorm whose scale and shift come from the timestep (zero-initialised: plain LayerNorm at start)."""

    def __init__(self, width: int, t_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.mod = nn.Linear(t_dim, 2 * width)
        nn.init.zeros_(self.mod.weight)
        nn.init.zeros_(self.mod.bias)

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor | None) -> torch.Tensor:
        x = self.norm(x)
        if t_emb is None:
            return x
        scale, shift = self.mod(t_emb)[:, None].chunk(2, dim=-1)
        return x * (1 + scale) + shift


class ResamplerBlock(nn.Module):
    def __init__(self, width: int, heads: int, t_dim: int | None):
        super().__init__()
        self.norm_q = AdaLayerNorm(width, t_dim) if t_dim else nn.LayerNorm(width)
        self.norm_kv = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm_ff = AdaLayerNorm(width, t_dim) if t_dim else nn.LayerNorm(width)
        self.ff = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def _norm(self, norm, x, t_emb):
        return norm(x, t_emb) if isinstance(norm, AdaLayerNorm) else norm(x)

    def forward(self, q, kv, kv_mask, t_emb=None):
        qn = self._norm(self.norm_q, q, t_emb)
        kvn = self.norm_kv(kv)
        keys = torch.cat([qn, kvn], dim=1)  # queries also attend to themselves (Perceiver/ELLA style)
        pad = torch.cat([torch.zeros_like(kv_mask[:, :1]).expand(-1, q.shape[1]), ~kv_mask], dim=1)
        q = q + self.attn(qn, keys, keys, key_padding_mask=pad, need_weights=False)[0]
        return q + self.ff(self._norm(self.norm_ff, q, t_emb))


class Connector(nn.Module):
    """Plan states -> `Conditioning`. See the module docstring."""

    def __init__(self, config: ConnectorConfig):
        super().__init__()
        c = self.config = config
        self.selector = LayerSelector(c.num_llm_layers) if c.layers == "learned" else None
        self.in_norm = nn.LayerNorm(c.d_llm)
        if c.kind == "linear":
            self.proj = nn.Linear(c.d_llm, c.d_ctx)
            out = self.proj
        elif c.kind == "mlp":
            self.proj = nn.Sequential(nn.Linear(c.d_llm, c.width), nn.GELU(), nn.Linear(c.width, c.d_ctx))
            out = self.proj[2]
        else:
            t_dim = c.width if c.timestep_aware else None
            self.t_mlp = (
                nn.Sequential(nn.Linear(c.width, c.width), nn.SiLU(), nn.Linear(c.width, c.width))
                if c.timestep_aware
                else None
            )
            self.queries = nn.Parameter(torch.randn(c.num_queries, c.width) * c.width**-0.5)
            self.in_proj = nn.Linear(c.d_llm, c.width)
            self.blocks = nn.ModuleList([ResamplerBlock(c.width, c.heads, t_dim) for _ in range(c.depth)])
            self.out_norm = nn.LayerNorm(c.width)
            self.proj = nn.Linear(c.width, c.d_ctx)
            out = self.proj
        nn.init.normal_(out.weight, std=c.init_std)
        nn.init.zeros_(out.bias)
        if c.d_time:
            self.pool = nn.Sequential(nn.Linear(c.d_llm, c.d_pooled), nn.GELU(), nn.Linear(c.d_pooled, c.d_pooled))
            self.time_modulation = TimeModulation(c.d_pooled, c.d_time)  # zero-init: U-Net unchanged at start
        elif c.d_text_embeds:
            self.pool = nn.Sequential(
                nn.Linear(c.d_llm, c.d_pooled), nn.GELU(), nn.Linear(c.d_pooled, c.d_text_embeds)
            )
            nn.init.zeros_(self.pool[2].weight)  # zero text_embeds at the start: SDXL's own empty negative prompt
            nn.init.zeros_(self.pool[2].bias)
            self.time_modulation = None
        else:
            self.pool, self.time_modulation = None, None
        if c.hierarchical != "off":
            fixed = torch.full((len(GROUPS), len(FIELD_INDEX) + 1), -4.0)
            for g, group in enumerate(GROUPS):
                fixed[g, 0] = 4.0  # the begin/end markers go everywhere
                for name in FIXED_ROUTING[group]:
                    fixed[g, FIELD_INDEX[name]] = 4.0
            if c.hierarchical == "learned":
                self.routing = nn.Parameter(fixed)
            else:
                self.register_buffer("routing", fixed, persistent=False)
        else:
            self.routing = None

    @property
    def timestep_aware(self) -> bool:
        return self.config.timestep_aware

    def select(self, states: torch.Tensor) -> torch.Tensor:
        if self.selector is not None:
            if states.ndim != 4:
                raise ValueError("learned layer weights need all layers: encode with layers='learned'")
            return self.selector(states)
        if states.ndim != 3:
            raise ValueError(f"expected plan states (B, T, d), got {tuple(states.shape)}")
        return states

    def _tokens(
        self, h: torch.Tensor, mask: torch.Tensor, t_emb: torch.Tensor | None, num_queries: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, d) normalised states -> (tokens (B, M, d_ctx), token mask (B, M)); the resampler uses its first
        ``num_queries`` queries (all by default)."""
        c = self.config
        if c.kind in ("linear", "mlp"):
            return self.proj(h), mask
        q = self.queries[None, :num_queries].expand(h.shape[0], -1, -1)
        kv = self.in_proj(h)
        safe = mask.clone()
        safe[~mask.any(1), 0] = True  # a row with nothing to attend to attends to one zero state
        for block in self.blocks:
            q = block(q, kv, safe, t_emb)
        tokens = self.proj(self.out_norm(q))
        return tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)

    def forward(
        self, plan: PlanStates, timestep: torch.Tensor | None = None, region_masks: torch.Tensor | None = None
    ) -> Conditioning:
        """Plan states -> conditioning; with ``spatial`` and ``region_masks`` (B, K, H, W) from the plan's layout,
        object token groups confined to their regions are added (see the module docstring)."""
        cond = self._conditioning(plan, timestep, region_masks)
        return cond if self.config.time_ids is None else with_time_ids(cond, self.config.time_ids)

    def _conditioning(self, plan: PlanStates, timestep, region_masks) -> Conditioning:
        c = self.config
        if plan.states.shape[-1] != c.d_llm:
            raise ValueError(f"plan states have width {plan.states.shape[-1]}, the connector expects {c.d_llm}")
        h = self.in_norm(self.select(plan.states))  # (B, T, d_llm)
        mask = plan.mask
        t_emb = None
        if c.timestep_aware:
            if timestep is None:
                raise ValueError("a timestep-aware connector needs the diffusion timestep")
            t = torch.as_tensor(timestep, device=h.device).reshape(-1).expand(h.shape[0])
            t_emb = self.t_mlp(timestep_embedding(t, c.width).to(h.dtype))
        tokens, tmask = self._tokens(h, mask, t_emb)
        pooled = None
        if self.pool is not None:
            m = mask[..., None].to(h.dtype)
            pooled = self.pool((h * m).sum(1) / m.sum(1).clamp_min(1.0))
        per_depth = None
        if self.routing is not None:
            per_depth = {}
            for g, group in enumerate(GROUPS):
                gate = torch.sigmoid(self.routing[g])[plan.field_ids]  # (B, T)
                if c.kind == "resampler":  # route on the input side: each group resamples its own fields
                    gmask = mask & (gate > 0.5) if c.hierarchical == "fixed" else mask
                    gh = h * gate[..., None] if c.hierarchical == "learned" else h
                    gt, gm = self._tokens(gh, gmask, t_emb)
                elif c.hierarchical == "fixed":
                    gt, gm = tokens, tmask & (gate > 0.5)
                else:
                    gt, gm = tokens * gate[..., None], tmask
                per_depth[group] = Conditioning(gt, gm)
        if c.spatial and region_masks is not None:
            return self._with_objects(plan, h, t_emb, tokens, tmask, pooled, region_masks)
        return Conditioning(tokens, tmask, pooled, per_depth)

    def _with_objects(self, plan, h, t_emb, tokens, tmask, pooled, region_masks) -> Conditioning:
        """Global tokens followed by one token group per OBJECT entry, each confined to its region mask."""
        c = self.config
        if plan.object_ids is None:
            raise ValueError("spatial injection needs PlanStates.object_ids (encode with PlanEncoder)")
        b, t = plan.mask.shape
        if region_masks.ndim != 4 or region_masks.shape[0] != b:
            raise ValueError(f"region masks must be (B={b}, K, H, W), got {tuple(region_masks.shape)}")
        k = region_masks.shape[1]
        entry = torch.arange(1, k + 1, device=h.device)
        in_span = plan.mask[:, None, :] & (plan.object_ids[:, None, :] == entry[None, :, None])  # (B, K, T)
        placed = (region_masks.flatten(2).amax(-1) > 0).to(h.device) & in_span.any(-1)  # (B, K)
        if not placed.any():
            return Conditioning(tokens, tmask, pooled)
        if c.kind in ("linear", "mlp"):  # the entry's own plan tokens are its group
            obj = plan.object_ids.clamp(0, k)
            ok = torch.cat([torch.zeros_like(placed[:, :1]), placed], 1).gather(1, obj)
            token_region = torch.where(ok, obj, torch.zeros_like(obj))
            return Conditioning(tokens, tmask, pooled, regions=self._regions(token_region, region_masks))
        n = c.object_queries or c.num_queries
        kv_mask = in_span if c.object_tokens == "span" else plan.mask[:, None, :].expand(b, k, t)
        hk = h[:, None].expand(b, k, *h.shape[1:]).reshape(b * k, *h.shape[1:])  # (B*K, T, d)
        tk = None if t_emb is None else t_emb.repeat_interleave(k, dim=0)
        obj_tokens, _ = self._tokens(hk, kv_mask.reshape(b * k, t), tk, n)  # (B*K, n, d_ctx)
        obj_tokens = obj_tokens.reshape(b, k * n, -1)
        obj_mask = placed.repeat_interleave(n, dim=1)  # unplaced entries' groups are masked out
        token_region = torch.cat(
            [torch.zeros_like(tmask, dtype=torch.long), entry.repeat_interleave(n)[None].expand(b, -1)], dim=1
        )
        return Conditioning(
            torch.cat([tokens, obj_tokens], 1),
            torch.cat([tmask, obj_mask], 1),
            pooled,
            regions=self._regions(token_region, region_masks),
        )

    def _regions(self, token_region: torch.Tensor, masks: torch.Tensor) -> Regions:
        c = self.config
        levels = None if c.region_levels is None else tuple(c.region_levels)
        return Regions(token_region, masks.to(token_region.device), c.region_strength, levels)


class NullConditioning(nn.Module):
    """The learned unconditional conditioning: fed by CFG dropout in training and as CFG's negative branch.

    Initialised from the base model's own unconditional states (its text encoder on ""), so classifier-free
    guidance starts exactly as the base model's.
    """

    def __init__(
        self,
        tokens: torch.Tensor,
        mask: torch.Tensor | None,
        d_pooled: int | None,
        groups: tuple[str, ...] = (),
        time_ids: list[int] | None = None,
    ):
        super().__init__()
        self.tokens = nn.Parameter(tokens.detach().clone().float().reshape(1, *tokens.shape[-2:]))
        m = mask if mask is not None else torch.ones(tokens.shape[-2], dtype=torch.bool)
        self.register_buffer("mask", m.reshape(1, -1).bool().clone())
        self.pooled = nn.Parameter(torch.zeros(1, d_pooled)) if d_pooled else None
        self.groups = groups
        self.time_ids = time_ids

    def forward(self, batch_size: int) -> Conditioning:
        tokens = self.tokens.expand(batch_size, -1, -1)
        mask = self.mask.expand(batch_size, -1)
        pooled = None if self.pooled is None else self.pooled.expand(batch_size, -1)
        per_depth = {g: Conditioning(tokens, mask) for g in self.groups} if self.groups else None
        cond = Conditioning(tokens, mask, pooled, per_depth)
        return cond if self.time_ids is None else with_time_ids(cond, self.time_ids)

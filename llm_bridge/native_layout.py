"""Native text conditioning plus the plan's layout: the LMD-like control for plan-grounded spatial injection.

The planner LLM writes the plan as usual, but the hidden-state bridge is not used: the U-Net reads the native
text encoder's tokens of the whole prompt (global, acting everywhere) plus, for each OBJECT entry, the native
tokens of a short sub-prompt for that entry ("two small blue squares"), confined to the entry's region by the
same region masks and attention bias the bridge's spatial injection uses. Comparing it with the bridge shows
what the LLM's hidden states add beyond the layout itself. With ``caption`` the global tokens say the plan's
caption instead of the prompt (the planner as a prompt rewriter); with ``regions=False`` there are no
sub-prompts, so ``caption`` + ``regions=False`` is native CLIP text on the planner's rewrite.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from diffusion_backbone.conditioning import Conditioning, Regions
from diffusion_backbone.injection import has_routing, install_routing
from diffusion_backbone.models import Backbone
from diffusion_backbone.pipeline import GenerationOutput, generate_from_conditioning
from diffusion_backbone.sampling import latent_shape
from llm_bridge.layout import RegionGrid, batch_region_masks
from planner.planner import Planner
from planner.schema import Plan, PlanError

NUMBER_WORDS = {1: "a", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine"}


def object_subprompt(text: str) -> str:
    """An OBJECT entry as a short caption: ``2 small blue square at top, bottom`` -> ``two small blue squares``.

    Entries that do not start with a count are used as they are (without their ``at ...`` part)."""
    head = text.partition(" at ")[0].strip()
    words = head.split()
    if len(words) < 2 or not words[0].isdigit():
        return head
    count = int(words[0])
    rest = words[1:]
    if count > 1 and not rest[-1].endswith("s"):
        rest[-1] += "s"
    return " ".join([NUMBER_WORDS.get(count, str(count)), *rest])


def _caption_or_prompt(caption: Callable[[str], str], plan: str, prompt: str) -> str:
    try:
        return caption(plan)
    except PlanError:  # a plan the caption function cannot say: the user's words
        return prompt


def _full_mask(c: Conditioning) -> torch.Tensor:
    return c.mask if c.mask is not None else torch.ones(c.tokens.shape[:2], dtype=torch.bool)


class NativeLayoutPipeline:
    """prompt -> plan (planner LLM) -> native tokens of the prompt + per-object sub-prompts in their regions."""

    def __init__(
        self,
        planner: Planner | None,
        backbone: Backbone,
        *,
        grid: RegionGrid | None = None,
        strength: float = 1.0,
        levels: tuple[int, ...] | None = None,
        regions: bool = True,
        caption: Callable[[str], str] | None = None,
    ):
        if backbone.text_encoder is None:
            raise ValueError("native + layout needs the backbone's text encoder (load it with text_encoder=True)")
        self.planner, self.backbone = planner, backbone
        self.grid = grid or RegionGrid()
        self.strength, self.levels = strength, levels
        self.regions = regions  # False: the global tokens only (with ``caption``: native CLIP on the plan's caption)
        self.caption = caption  # plan text -> the text the global tokens say (None: the user's prompt)
        if not has_routing(backbone.unet):
            install_routing(backbone.unet)
        self._uncond: Conditioning | None = None

    def conditioning(self, prompts: list[str], plans: list[str]) -> Conditioning:
        """Global native tokens of each prompt, then each OBJECT entry's sub-prompt tokens in its region."""
        enc = self.backbone.text_encoder
        if self.caption is not None:
            prompts = [_caption_or_prompt(self.caption, plan, prompt) for prompt, plan in zip(prompts, plans)]
        cond = enc.encode(prompts)
        masks = batch_region_masks(plans, latent_shape(self.backbone.unet, 1)[2:], self.grid) if self.regions else None
        if masks is None:
            return cond
        b, k = masks.shape[:2]
        objects = [Plan.parse(p).objects for p in plans]
        texts = [object_subprompt(o[j]) if j < len(o) else "" for o in objects for j in range(k)]
        sub = enc.encode(texts)  # (B*K, S, d)
        s = sub.tokens.shape[1]
        placed = masks.flatten(2).amax(-1) > 0  # (B, K)
        sub_mask = _full_mask(sub).reshape(b, k, s) & placed[:, :, None]
        region = torch.arange(1, k + 1).repeat_interleave(s)[None].expand(b, -1)
        return Conditioning(
            torch.cat([cond.tokens, sub.tokens.reshape(b, k * s, -1)], 1),
            torch.cat([_full_mask(cond), sub_mask.reshape(b, k * s)], 1),
            cond.pooled,
            regions=Regions(
                torch.cat([torch.zeros(cond.tokens.shape[:2], dtype=torch.long), region], 1),
                masks,
                self.strength,
                self.levels,
            ),
        )

    def to(self, device: str | torch.device) -> NativeLayoutPipeline:
        """Move the planner LLM (if any), U-Net, VAE and text encoder to ``device``."""
        if self.planner is not None:
            self.planner.to(device)
        self.backbone.to(device)
        self._uncond = None
        return self

    def unconditional(self) -> Conditioning:
        if self._uncond is None:
            self._uncond = self.backbone.text_encoder.encode_negative([""])
        return self._uncond

    def plans_for(self, prompts: list[str]) -> list[str]:
        if self.planner is None:
            raise ValueError("no planner given: pass plans= explicitly")
        results = self.planner.plan(list(prompts))
        bad = [i for i, r in enumerate(results) if r.plan is None]
        if bad:
            raise PlanError(f"the planner produced no valid plan: {results[bad[0]].error}").with_context(
                f"prompt #{bad[0]}"
            )
        return [r.plan.to_text() for r in results]

    @torch.no_grad()
    def __call__(
        self,
        prompts: list[str],
        seeds: list[int],
        *,
        plans: list[str] | None = None,
        sampler: str = "ddim",
        steps: int = 25,
        guidance_scale: float = 5.0,
    ) -> GenerationOutput:
        plans = self.plans_for(prompts) if plans is None else list(plans)
        if len(plans) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(plans)} plans")
        cond = self.conditioning(list(prompts), plans)
        return generate_from_conditioning(
            self.backbone,
            cond,
            self.unconditional(),
            seeds,
            sampler=sampler,
            steps=steps,
            guidance_scale=guidance_scale,
        )

    def as_generator(
        self, *, plan_source: str = "planner", sampler: str = "ddim", steps: int = 25, guidance_scale: float = 5.0
    ):
        """An image generator for ShapesEval (``plan_source``: ``planner`` or ``oracle``)."""
        if plan_source not in ("planner", "oracle"):
            raise ValueError(
                f"native + layout needs plans: plan_source must be planner or oracle, got {plan_source!r}"
            )

        def generate(prompts: list[str], entries: list[dict], seeds: list[int]) -> np.ndarray:
            plans = [e["plan"] for e in entries] if plan_source == "oracle" else None
            return self(
                prompts, seeds, plans=plans, sampler=sampler, steps=steps, guidance_scale=guidance_scale
            ).images

        return generate

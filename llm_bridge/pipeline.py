"""`Plan2ImgPipeline`: prompt -> plan (planner LLM) -> plan hidden states -> connector -> frozen U-Net -> image.

    pipe = Plan2ImgPipeline.from_pretrained(planner="...", bridge="...", base="...")
    out = pipe(["two blue squares above a red star"], seeds=[0])
    out.images[0], out.plans[0].plan.to_text(), out.timings

The conditioning of a prompt is computed once and cached (the LLM forward and the connector run once per
prompt, not per denoising step; a timestep-aware connector re-runs only the small connector per step). A
plan can be given directly instead of a prompt (``plans=``), and ``use_planner=False`` conditions on the
LLM's states of the raw prompt (the no-planner ablation). A separate ``writer`` planner may write the plans
while the bridge's own LLM reads them (e.g. a planner fine-tuned on wider English after the bridge was
trained). With spatial injection on (the bridge's config, or
`set_spatial` for training-free use), each plan's OBJECT positions become region masks (`llm_bridge.layout`).

What the bridge reads (`read_texts`): by default the user's prompt followed by the plan. ``normalize_plan``
rewrites each plan canonically first (the toy world: OBJECT entries in reading order, `toyworld.grammar.
reading_order_plan`), and ``caption`` replaces the prompt by the plan said as a caption (`toyworld.grammar.
plan_caption`) both in the LLM's context and, in ``concat`` mode, for the native text encoder: the conditioning
then depends on the plan alone, so what the planner understood is all that reaches the U-Net, and the user's
own wording (which the base model's text encoder may misread, e.g. an unseen sentence frame) does not.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from diffusion_backbone.conditioning import Conditioning
from diffusion_backbone.injection import has_routing, install_routing
from diffusion_backbone.models import Backbone, load_backbone
from diffusion_backbone.pipeline import seeded_generators
from diffusion_backbone.sampling import decode_latents, latent_shape, sample
from llm_bridge.bridge import LLMBridge, apply_delta
from llm_bridge.encoder import PlanEncoder, PlanStates
from llm_bridge.layout import RegionGrid, batch_region_masks
from planner.planner import Planner, PlanResult
from planner.schema import Plan, PlanError
from safeio import InputError


@dataclass
class Plan2ImgOutput:
    images: np.ndarray  # (B, H, W, 3) uint8
    plans: list[PlanResult | None]  # the planner's result per image (None when conditioning on raw prompts)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage, summed over the call
    plan_texts: list[str] | None = None  # the plans the bridge read (after ``normalize_plan``), None without plans
    read: list[str] | None = None  # the text before each plan that the LLM (and, in concat, the native encoder) read


class Plan2ImgPipeline:
    def __init__(
        self,
        planner: Planner,
        bridge: LLMBridge,
        backbone: Backbone,
        *,
        cache_size: int = 1024,
        grid: RegionGrid | None = None,
        writer: Planner | None = None,
        caption: Callable[[str], str] | None = None,
        normalize_plan: Callable[[str], str] | None = None,
    ):
        self.planner = planner
        self.writer = writer or planner  # writes the plans; ``planner``'s LLM always reads them (hidden states)
        self.grid = grid or RegionGrid()
        self.caption = caption  # plan text -> the text the LLM and the native encoder read (None: the prompt)
        self.normalize_plan = normalize_plan  # plan text -> the same plan, canonical (e.g. objects in reading order)
        self.bridge = bridge.eval()
        self.backbone = backbone
        self.encoder = PlanEncoder(planner.model, planner.tokenizer, bridge.config.layers)
        if bridge.config.d_llm != self.encoder.hidden_size:
            raise InputError(
                f"the bridge expects LLM width {bridge.config.d_llm}, the planner LLM has {self.encoder.hidden_size}"
            )
        bridge.attach(backbone.unet)
        apply_delta(planner.model, bridge.llm_delta, "planner LLM")
        self.cache: OrderedDict[tuple, tuple[PlanStates, Conditioning | None]] = OrderedDict()
        self.cache_size = cache_size
        self._native_null: Conditioning | None = None

    @classmethod
    def from_pretrained(
        cls,
        planner: str | Path,
        bridge: str | Path,
        base: str | Path,
        *,
        spec=None,
        llm_dtype: torch.dtype | None = None,
        load_in_8bit: bool = False,
    ) -> Plan2ImgPipeline:
        p = Planner.from_pretrained(planner, spec=spec, dtype=llm_dtype, load_in_8bit=load_in_8bit)
        return cls(p, LLMBridge.from_pretrained(bridge), load_backbone(base))

    def to(self, device: str | torch.device) -> Plan2ImgPipeline:
        """Move every model (the reading and writing LLMs, the bridge, U-Net, VAE and text encoder) to ``device``, as
        diffusers' ``pipe.to("cuda")``; cached LLM states are dropped. An 8/4-bit LLM stays where it was loaded. The
        starting noise is drawn on the CPU from the seeds, so a seed gives the same noise on any device."""
        for planner in {id(p): p for p in (self.planner, self.writer)}.values():
            planner.to(device)
        self.bridge.to(device)
        self.backbone.to(device)
        self.cache.clear()
        self._native_null = None
        return self

    def set_spatial(self, **settings) -> None:
        """Turn plan-grounded spatial injection on/off or change its settings (see `LLMBridge.set_spatial`)."""
        self.bridge.set_spatial(**settings)
        if self.bridge.config.spatial and not has_routing(self.backbone.unet):
            install_routing(self.backbone.unet)

    def region_masks(self, plan_texts: list[str] | None) -> torch.Tensor | None:
        """(B, K, h, w) region masks at the latent resolution, or None (spatial off, no plans, nothing placed)."""
        if not self.bridge.config.spatial or plan_texts is None:
            return None
        return batch_region_masks(plan_texts, latent_shape(self.backbone.unet, 1)[2:], self.grid)

    # ----------------------------------------------------------------------------------- conditioning
    def native(self, prompts: list[str]) -> Conditioning | None:
        if self.bridge.config.mode != "concat":
            return None
        return self.backbone.text_encoder.encode(prompts)

    def read_texts(self, prompts: list[str], plan_texts: list[str] | None) -> tuple[list[str], list[str] | None]:
        """What the bridge reads for each image: (text before the plan, plan). With ``normalize_plan`` the plan is
        rewritten first; with ``caption`` the text is the plan's caption instead of the user's prompt, so the
        conditioning depends on the plan alone (a plan the caption function cannot say keeps the prompt)."""
        if plan_texts is None:
            return list(prompts), None
        if self.normalize_plan is not None:
            plan_texts = [_or_same(self.normalize_plan, p) for p in plan_texts]
        if self.caption is None:
            return list(prompts), plan_texts
        return [_or(self.caption, plan, prompt) for prompt, plan in zip(prompts, plan_texts)], plan_texts

    def native_null(self) -> Conditioning | None:
        if self.bridge.config.mode != "concat":
            return None
        if self._native_null is None:
            self._native_null = self.backbone.text_encoder.encode_negative([""])
        return self._native_null

    @torch.no_grad()
    def plan_states(self, prompts: list[str], plans: list[str] | None) -> tuple[PlanStates, Conditioning | None]:
        """LLM states of each (prompt, plan), cached by (prompt, plan); native tokens for concat mode."""
        keys = [(p, None if plans is None else plans[i]) for i, p in enumerate(prompts)]
        todo = [i for i, k in enumerate(keys) if k not in self.cache]
        if todo:
            states = self.encoder.encode(
                [prompts[i] for i in todo], None if plans is None else [plans[i] for i in todo]
            )
            native = self.native([prompts[i] for i in todo])
            states = states.to(dtype=torch.float32)
            for j, i in enumerate(todo):
                self.cache[keys[i]] = (
                    states.index(slice(j, j + 1)),
                    None if native is None else native.index(slice(j, j + 1)),
                )
                while len(self.cache) > self.cache_size:
                    self.cache.popitem(last=False)
        items = [self.cache[k] for k in keys]
        states = PlanStates.cat([s for s, _ in items])
        native = None if items[0][1] is None else Conditioning.cat([n for _, n in items])
        return states, native

    # ----------------------------------------------------------------------------------- generation
    @torch.no_grad()
    def __call__(
        self,
        prompts: list[str] | str,
        seeds: list[int] | None = None,
        *,
        plans: list[str] | None = None,
        use_planner: bool = True,
        sampler: str = "ddim",
        steps: int = 25,
        guidance_scale: float = 5.0,
        batch_size: int = 16,
        progress: bool = False,
    ) -> Plan2ImgOutput:
        if isinstance(prompts, str):
            prompts = [prompts]
        seeds = list(range(len(prompts))) if seeds is None else list(seeds)
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        timings = dict.fromkeys(("planning", "llm_forward", "connector", "denoise", "decode"), 0.0)
        results: list[PlanResult | None] = [None] * len(prompts)
        plan_texts: list[str] | None = None
        if plans is not None:
            if len(plans) != len(prompts):
                raise ValueError(f"{len(prompts)} prompts but {len(plans)} plans")
            plan_texts = []
            for i, text in enumerate(plans):
                try:
                    plan = Plan.parse(text, self.planner.plan_spec)
                except PlanError as err:
                    raise err.with_context(f"prompt #{i}") from None
                plan_texts.append(plan.to_text())
        elif use_planner:
            t0 = time.perf_counter()
            unique = list(dict.fromkeys(prompts))
            by_prompt = dict(zip(unique, self.writer.plan(unique, batch_size=batch_size)))
            timings["planning"] += time.perf_counter() - t0
            results = [by_prompt[p] for p in prompts]
            bad = [i for i, r in enumerate(results) if r.plan is None]
            if bad:
                raise PlanError(f"the planner produced no valid plan: {results[bad[0]].error}").with_context(
                    f"prompt #{bad[0]}"
                )
            plan_texts = [r.plan.to_text() for r in results]
        read, plan_texts = self.read_texts(prompts, plan_texts)
        images = []
        for start in range(0, len(prompts), batch_size):
            sl = slice(start, start + batch_size)
            t0 = time.perf_counter()
            states, native = self.plan_states(read[sl], None if plan_texts is None else plan_texts[sl])
            t1 = time.perf_counter()
            cond, null = self._conditioning(states, native, None if plan_texts is None else plan_texts[sl])
            t2 = time.perf_counter()
            latents = sample(
                self.backbone.unet,
                self.backbone.scheduler(sampler),
                cond,
                null,
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                generator=seeded_generators(seeds[sl]),
                progress=progress,
            )
            t3 = time.perf_counter()
            images.append(decode_latents(self.backbone.vae, latents))
            t4 = time.perf_counter()
            timings["llm_forward"] += t1 - t0
            timings["connector"] += t2 - t1
            timings["denoise"] += t3 - t2
            timings["decode"] += t4 - t3
        return Plan2ImgOutput(np.concatenate(images), results, timings, plan_texts, read)

    def _conditioning(self, states: PlanStates, native: Conditioning | None, plan_texts: list[str] | None):
        """(conditioning or a function of the timestep, null conditioning) of a batch of plan states."""
        null = self.bridge.null_conditioning(len(states.mask), self.native_null())
        masks = self.region_masks(plan_texts)
        if self.bridge.connector.timestep_aware:

            def cond(t, states=states, native=native, masks=masks):
                return self.bridge.conditioning(states, native, t, masks)

            return cond, null
        return self.bridge.conditioning(states, native, region_masks=masks), null

    @torch.no_grad()
    def conditioning_for(self, prompts: list[str], plan_texts: list[str]):
        """(conditioning, null conditioning) of prompts with their plans, as `__call__` builds them (what the bridge
        reads, cached LLM states, region masks): for callers that run the sampler themselves (the refine loop)."""
        read, plan_texts = self.read_texts(prompts, plan_texts)
        states, native = self.plan_states(read, plan_texts)
        return self._conditioning(states, native, plan_texts)

    def as_generator(
        self, *, plan_source: str = "planner", sampler: str = "ddim", steps: int = 25, guidance_scale: float = 5.0
    ):
        """An image generator for ShapesEval: (prompts, metadata entries, seeds) -> (B, H, W, 3) uint8.

        ``plan_source``: ``planner`` (the LLM plans), ``oracle`` (the entry's canonical plan), ``none`` (the
        LLM's states of the raw prompt, no plan).
        """
        if plan_source not in ("planner", "oracle", "none"):
            raise ValueError(f"plan_source must be planner, oracle or none, got {plan_source!r}")

        def generate(prompts: list[str], entries: list[dict], seeds: list[int]) -> np.ndarray:
            plans = [e["plan"] for e in entries] if plan_source == "oracle" else None
            out = self(
                prompts,
                seeds,
                plans=plans,
                use_planner=plan_source == "planner",
                sampler=sampler,
                steps=steps,
                guidance_scale=guidance_scale,
                batch_size=len(prompts),
            )
            return out.images

        return generate


def _or(fn: Callable[[str], str], plan: str, fallback: str) -> str:
    try:
        return fn(plan)
    except PlanError:  # e.g. a free-text plan the function cannot read: keep the fallback
        return fallback


def _or_same(fn: Callable[[str], str], plan: str) -> str:
    return _or(fn, plan, plan)

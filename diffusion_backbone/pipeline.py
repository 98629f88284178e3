"""Native text-to-image: prompt -> text encoder -> frozen U-Net (sampler + CFG) -> VAE -> images.

This is the baseline the LLM bridge must beat, and the reference for how a `Conditioning` drives the base.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from diffusion_backbone.conditioning import Conditioning
from diffusion_backbone.models import Backbone
from diffusion_backbone.sampling import decode_latents, sample


@dataclass
class GenerationOutput:
    images: np.ndarray  # (B, H, W, 3) uint8
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage


def seeded_generators(seeds: list[int]) -> list[torch.Generator]:
    """One CPU generator per image: image i depends only on seed i, not on the batch it is in."""
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def generate_from_conditioning(
    backbone: Backbone,
    cond: Conditioning,
    uncond: Conditioning | None,
    seeds: list[int],
    *,
    sampler: str = "ddim",
    steps: int = 25,
    guidance_scale: float = 5.0,
    progress: bool = False,
    unet_kwargs: dict | None = None,
) -> GenerationOutput:
    """Sample one image per conditioning row with the given seeds and decode it."""
    if len(seeds) != cond.batch_size:
        raise ValueError(f"{len(seeds)} seeds for {cond.batch_size} conditionings")
    t0 = time.perf_counter()
    latents = sample(
        backbone.unet,
        backbone.scheduler(sampler),
        cond,
        uncond,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        generator=seeded_generators(seeds),
        progress=progress,
        unet_kwargs=unet_kwargs,
    )
    t1 = time.perf_counter()
    images = decode_latents(backbone.vae, latents)
    t2 = time.perf_counter()
    return GenerationOutput(images, {"denoise": t1 - t0, "decode": t2 - t1})


class TextToImagePipeline:
    """The native baseline: the backbone's own text encoder conditions the U-Net."""

    def __init__(self, backbone: Backbone):
        if backbone.text_encoder is None:
            raise ValueError("this backbone has no text encoder (load it with text_encoder=True)")
        self.backbone = backbone
        self._uncond: Conditioning | None = None

    def to(self, device: str | torch.device) -> TextToImagePipeline:
        """Move the U-Net, VAE and text encoder to ``device`` (the noise is still drawn on the CPU from the seeds)."""
        self.backbone.to(device)
        self._uncond = None
        return self

    def unconditional(self) -> Conditioning:
        if self._uncond is None:
            self._uncond = self.backbone.text_encoder.encode_negative([""])
        return self._uncond

    @torch.no_grad()
    def __call__(
        self,
        prompts: list[str],
        seeds: list[int],
        *,
        sampler: str = "ddim",
        steps: int = 25,
        guidance_scale: float = 5.0,
        batch_size: int = 16,
        progress: bool = False,
    ) -> GenerationOutput:
        if isinstance(prompts, str):
            prompts = [prompts]
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        images, timings = [], {"text_encoder": 0.0, "denoise": 0.0, "decode": 0.0}
        for start in range(0, len(prompts), batch_size):
            t0 = time.perf_counter()
            cond = self.backbone.text_encoder.encode(prompts[start : start + batch_size])
            timings["text_encoder"] += time.perf_counter() - t0
            out = generate_from_conditioning(
                self.backbone,
                cond,
                self.unconditional(),
                seeds[start : start + batch_size],
                sampler=sampler,
                steps=steps,
                guidance_scale=guidance_scale,
                progress=progress,
            )
            images.append(out.images)
            for k, v in out.timings.items():
                timings[k] += v
        return GenerationOutput(np.concatenate(images), timings)

    def as_generator(self, *, sampler: str = "ddim", steps: int = 25, guidance_scale: float = 5.0):
        """An image generator for ShapesEval: (prompts, metadata entries, seeds) -> (B, H, W, 3) uint8."""

        def generate(prompts: list[str], entries: list[dict], seeds: list[int]) -> np.ndarray:
            return self(
                prompts, seeds, sampler=sampler, steps=steps, guidance_scale=guidance_scale, batch_size=len(prompts)
            ).images

        return generate

"""Sampling, written out as a loop (diffusers style): schedulers, the one CFG function, VAE in and out.

``sample(unet, scheduler, cond, uncond, ...)`` is the whole denoising loop; classifier-free guidance is
applied in exactly one place, `classifier_free_guidance`. Randomness comes only from the explicit
``generator`` (one per image for batch-size-independent results).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from diffusion_backbone.conditioning import Conditioning
from diffusion_backbone.injection import has_routing
from diffusion_backbone.sdxl import added_cond_kwargs
from safeio import InputError

SAMPLERS: dict[str, tuple[type, dict]] = {
    "ddim": (DDIMScheduler, {}),
    "euler-a": (EulerAncestralDiscreteScheduler, {}),
    "dpm++2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
}

Generator = torch.Generator | list[torch.Generator] | None
# A conditioning that depends on the timestep: (B,) timesteps -> Conditioning.
ConditioningFn = Callable[[torch.Tensor], Conditioning]
# Called after each step with (step index, timestep, latents); return nothing.
StepCallback = Callable[[int, int, torch.Tensor], None]


def make_scheduler(name: str, config: dict):
    """A fresh scheduler of kind ``name`` (``ddim``, ``euler-a``, ``dpm++2m``) built from a training config."""
    if name not in SAMPLERS:
        raise InputError(f"unknown sampler {name!r}; known: {list(SAMPLERS)}")
    cls, overrides = SAMPLERS[name]
    return cls.from_config(dict(config), **overrides)


def classifier_free_guidance(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Ho & Salimans (2022): eps = eps_uncond + s * (eps_cond - eps_uncond). The only place CFG happens."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


def unet_forward(unet, latents: torch.Tensor, t, cond: Conditioning, **unet_kwargs) -> torch.Tensor:
    """One U-Net call on a `Conditioning`: tokens as encoder states, mask as encoder attention mask, the pooled
    vector as ``class_labels`` when a time modulation is installed (or, on SDXL, as ``text_embeds`` with the
    ``time_ids``), per-depth groups and regions to routed processors."""
    kwargs = dict(unet_kwargs)
    added = added_cond_kwargs(unet, cond)
    if added is not None:
        kwargs["added_cond_kwargs"] = added
    elif getattr(unet, "class_embedding", None) is not None:
        if cond.pooled is None:
            raise ValueError("this U-Net has a time modulation installed but the conditioning has no pooled vector")
        kwargs["class_labels"] = cond.pooled
    if cond.per_depth is not None:
        cak = dict(kwargs.pop("cross_attention_kwargs", None) or {})
        cak["per_depth"] = {k: (v.tokens, v.mask) for k, v in cond.per_depth.items()}
        kwargs["cross_attention_kwargs"] = cak
    if cond.regions is not None:
        if not has_routing(unet):
            raise ValueError(
                "the conditioning has regions but the U-Net has no routed attention: install_routing(unet)"
            )
        r = cond.regions
        cak = dict(kwargs.pop("cross_attention_kwargs", None) or {})
        cak["regions"] = (r.token_region, r.masks, r.strength, r.levels)
        kwargs["cross_attention_kwargs"] = cak
    return unet(
        latents,
        t,
        encoder_hidden_states=cond.tokens,
        encoder_attention_mask=cond.attention_bias(),
        return_dict=False,
        **kwargs,
    )[0]


def predict_noise(
    unet,
    latents: torch.Tensor,
    t,
    cond: Conditioning | ConditioningFn,
    uncond: Conditioning | None,
    guidance_scale: float,
    **unet_kwargs,
) -> torch.Tensor:
    """The model output at ``t`` with CFG; guidance 1 (or no ``uncond``) is the conditional prediction alone.

    ``cond`` may be a function of the timestep (a timestep-aware connector)."""
    if callable(cond) and not isinstance(cond, Conditioning):
        cond = cond(torch.as_tensor(t).expand(latents.shape[0]))
    if uncond is None or guidance_scale == 1.0:
        return unet_forward(unet, latents, t, cond, **unet_kwargs)
    both = Conditioning.cat([uncond, cond])  # same order as diffusers pipelines: [uncond, cond]
    out = unet_forward(unet, torch.cat([latents, latents]), t, both, **unet_kwargs)
    eps_uncond, eps_cond = out.chunk(2)
    return classifier_free_guidance(eps_cond, eps_uncond, guidance_scale)


def check_conditioning(unet, cond: Conditioning, what: str = "conditioning") -> None:
    expected = unet.config.cross_attention_dim
    if cond.dim != expected:
        raise ValueError(f"{what} has width {cond.dim} but the U-Net's cross-attention expects {expected}")
    if not torch.isfinite(cond.tokens).all():
        raise ValueError(f"{what} tokens contain NaN or inf")


def latent_shape(unet, batch_size: int) -> tuple[int, int, int, int]:
    size = unet.config.sample_size
    h, w = (size, size) if isinstance(size, int) else size
    return (batch_size, unet.config.in_channels, h, w)


@torch.no_grad()
def sample(
    unet,
    scheduler,
    cond: Conditioning | ConditioningFn,
    uncond: Conditioning | None = None,
    *,
    num_inference_steps: int = 25,
    guidance_scale: float = 5.0,
    generator: Generator = None,
    latents: torch.Tensor | None = None,
    eta: float = 0.0,
    progress: bool = True,
    callback: StepCallback | None = None,
    unet_kwargs: dict | None = None,
    init_latents: torch.Tensor | None = None,
    strength: float = 1.0,
    keep_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Denoise from noise to clean latents (B, C, H, W), one image per conditioning row.

    ``cond`` is a `Conditioning` (computed once) or a function of the timestep (a timestep-aware connector,
    re-run each step). ``uncond`` has batch size 1 (broadcast) or B. ``latents`` may be given as the initial
    noise (before scaling by the scheduler's ``init_noise_sigma``); otherwise it is drawn from ``generator``.

    SDEdit (as diffusers' img2img): with ``init_latents`` (clean, scaled latents) and ``strength`` < 1, the last
    ``round(steps * strength)`` steps run from ``init_latents`` noised to the first of them (the noise drawn from
    ``generator``). ``keep_mask`` (B, 1, H, W) in [0, 1] keeps the init where it is 1: after every step those
    latents are reset to the init noised to the next timestep (blended diffusion), so only the rest is redrawn.
    """
    if num_inference_steps < 1:
        raise InputError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    scheduler.set_timesteps(num_inference_steps, device=unet.device)
    static = isinstance(cond, Conditioning)
    probe = cond if static else cond(scheduler.timesteps[:1].expand(1))
    b = probe.batch_size
    check_conditioning(unet, probe)
    if uncond is not None:
        check_conditioning(unet, uncond, "unconditional conditioning")
        if uncond.batch_size == 1 and b > 1:
            uncond = uncond.repeat(b)
        if uncond.batch_size != b:
            raise ValueError(f"uncond has batch {uncond.batch_size}, cond has {b}")
    if isinstance(generator, list) and len(generator) != b:
        raise ValueError(f"got {len(generator)} generators for a batch of {b}")
    shape = latent_shape(unet, b)
    device, dtype = unet.device, unet.dtype
    if latents is None:
        latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
    else:
        latents = _checked_latents(latents, shape, "latents").to(device=device, dtype=dtype)
    if static:
        cond = cond.to(device, dtype)
    uncond = None if uncond is None else uncond.to(device, dtype)
    timesteps = scheduler.timesteps
    if init_latents is None:
        if strength != 1.0 or keep_mask is not None:
            raise ValueError("strength < 1 and keep_mask need init_latents (the image to edit)")
        latents = latents * scheduler.init_noise_sigma
        init = noise = None
    else:
        timesteps, latents, init, noise = _sdedit_start(scheduler, init_latents, latents, strength, shape)
    step_kwargs = _step_kwargs(scheduler, generator, eta)
    for i, t in enumerate(tqdm(timesteps, desc="denoising", disable=not progress, leave=False)):
        model_in = scheduler.scale_model_input(latents, t)
        eps = predict_noise(unet, model_in, t, cond, uncond, guidance_scale, **(unet_kwargs or {}))
        latents = scheduler.step(eps, t, latents, **step_kwargs, return_dict=False)[0]
        if keep_mask is not None:
            kept = init if i + 1 == len(timesteps) else scheduler.add_noise(init, noise, timesteps[i + 1 : i + 2])
            m = keep_mask.to(device=device, dtype=dtype)
            latents = m * kept + (1 - m) * latents
        if callback is not None:
            callback(i, int(t), latents)
    if not torch.isfinite(latents).all():
        raise FloatingPointError("sampling produced NaN or inf latents")
    return latents


def _checked_latents(latents: torch.Tensor, shape: tuple, what: str) -> torch.Tensor:
    if tuple(latents.shape) != shape:
        raise ValueError(f"{what} have shape {tuple(latents.shape)}, the U-Net expects {shape}")
    if not torch.isfinite(latents).all():
        raise ValueError(f"{what} contain NaN or inf")
    return latents


def _sdedit_start(scheduler, init_latents, noise, strength: float, shape: tuple):
    """diffusers' img2img start: the last ``round(steps * strength)`` timesteps, and ``init_latents`` noised with
    ``noise`` to the first of them. Returns (timesteps, start latents, init, noise)."""
    if not 0.0 < strength <= 1.0:
        raise InputError(f"strength must be in (0, 1], got {strength}")
    init = _checked_latents(init_latents, shape, "init_latents").to(device=noise.device, dtype=noise.dtype)
    steps = len(scheduler.timesteps) // scheduler.order
    n = min(max(int(steps * strength), 1), steps)
    start = (steps - n) * scheduler.order
    timesteps = scheduler.timesteps[start:]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    return timesteps, scheduler.add_noise(init, noise, timesteps[:1]), init, noise


def _step_kwargs(scheduler, generator: Generator, eta: float) -> dict:
    import inspect

    params = set(inspect.signature(scheduler.step).parameters)
    kwargs = {}
    if "eta" in params:
        kwargs["eta"] = eta
    if "generator" in params:
        kwargs["generator"] = generator
    return kwargs


# --------------------------------------------------------------------------------------------------- VAE
def images_to_tensor(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float in [-1, 1]."""
    if not isinstance(images, torch.Tensor):
        arr = np.asarray(images)
        images = torch.from_numpy(arr if arr.flags.writeable else arr.copy())
    x = images
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"images must be (B, H, W, 3), got {tuple(x.shape)}")
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def tensor_to_images(x: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) float in [-1, 1] -> (B, H, W, 3) uint8."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def encode_images(
    vae, images: np.ndarray | torch.Tensor, generator: torch.Generator | None = None, sample_posterior: bool = False
) -> torch.Tensor:
    """Images (B, H, W, 3) uint8 -> scaled latents (the U-Net's input space): (z - shift) * scaling_factor."""
    x = images_to_tensor(images).to(vae.device, vae.dtype)
    dist = vae.encode(x).latent_dist
    z = dist.sample(generator) if sample_posterior else dist.mode()
    shift = vae.config.shift_factor or 0.0
    return (z - shift) * vae.config.scaling_factor


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> np.ndarray:
    """Scaled latents -> images (B, H, W, 3) uint8."""
    if not torch.isfinite(latents).all():
        raise ValueError("latents to decode contain NaN or inf")
    shift = vae.config.shift_factor or 0.0
    z = latents.to(vae.device, vae.dtype) / vae.config.scaling_factor + shift
    return tensor_to_images(vae.decode(z, return_dict=False)[0])

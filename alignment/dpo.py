"""Diffusion-DPO on image pairs (Wallace et al. 2023): the pieces a DPO step is made of.

- `add_unet_lora`: LoRA on the U-Net's attention projections through peft (B = 0 at the start, so the policy
  starts equal to the reference and the loss at log 2);
- `adapters_disabled`: the reference is the same U-Net with its LoRA switched off, so no second U-Net is held in
  memory (diffusers' DPO example and TRL's peft path do the same);
- `pair_errors`: the per-pair squared errors of winner and loser latents under one noise draw and one timestep,
  in one U-Net call of batch 2B;
- `dpo_step_losses`: policy errors (with gradients) and reference errors (without) into `diffusion_dpo_loss`.

The loss itself is `alignment.losses.diffusion_dpo_loss`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer

from alignment.losses import DPOLoss, diffusion_dpo_loss, diffusion_target
from diffusion_backbone.conditioning import Conditioning
from diffusion_backbone.sampling import unet_forward

UNET_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # self- and cross-attention, as diffusers' DPO example
DPO_ADAPTER = "dpo"


def add_unet_lora(unet: torch.nn.Module, rank: int = 8, alpha: float | None = None) -> list[torch.nn.Parameter]:
    """Inject a LoRA adapter named ``dpo`` into the U-Net's attention projections (peft; B initialised to 0) and
    freeze everything else. Returns the trainable LoRA parameters."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    unet.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=list(UNET_LORA_TARGETS))
    inject_adapter_in_model(config, unet, adapter_name=DPO_ADAPTER)
    params = [p for n, p in unet.named_parameters() if f".{DPO_ADAPTER}." in n and "lora_" in n]
    if not params:
        raise ValueError(f"no attention projections {UNET_LORA_TARGETS} found for LoRA in {type(unet).__name__}")
    for p in params:
        p.requires_grad_(True)
    return params


@contextmanager
def adapters_disabled(model: torch.nn.Module) -> Iterator[None]:
    """Every peft adapter layer of ``model`` off inside the block (the DPO reference), back on after, with each
    parameter's ``requires_grad`` as it was (peft's switch would otherwise change it)."""
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    flags = {p: p.requires_grad for m in layers for p in m.parameters()}
    try:
        for m in layers:
            m.enable_adapters(False)
        yield
    finally:
        for m in layers:
            m.enable_adapters(True)
        for p, flag in flags.items():
            p.requires_grad_(flag)


def pair_errors(unet, scheduler, cond: Conditioning, latents_w: torch.Tensor, latents_l: torch.Tensor,
                noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Per-pair mean squared error of the U-Net's prediction for the winner and the loser latents (B, C, h, w),
    both noised with the same ``noise`` at the same ``t`` (B,), under the pair's conditioning (batch B).
    Returns two (B,) tensors."""
    if latents_w.shape != latents_l.shape or noise.shape != latents_w.shape:
        raise ValueError(f"winner {tuple(latents_w.shape)}, loser {tuple(latents_l.shape)} and noise "
                         f"{tuple(noise.shape)} latents must have one shape")  # fmt: skip
    z0 = torch.cat([latents_w, latents_l])  # (2B, C, h, w)
    eps = torch.cat([noise, noise])
    tt = torch.cat([t, t])
    noisy = scheduler.add_noise(z0, eps, tt)
    pred = unet_forward(unet, noisy, tt, Conditioning.cat([cond, cond]))
    err = ((pred.float() - diffusion_target(scheduler, z0, eps, tt).float()) ** 2).mean(dim=(1, 2, 3))  # (2B,)
    return err.chunk(2)


def dpo_step_losses(
    unet,
    scheduler,
    cond: Conditioning,
    latents_w: torch.Tensor,
    latents_l: torch.Tensor,
    beta: float,
    generator: torch.Generator,
    sft_weight: float = 0.0,
) -> dict[str, torch.Tensor]:
    """One DPO micro-batch: a shared noise draw and timestep per pair (from ``generator``), the reference errors
    with the adapters disabled (no gradient), the policy errors with them. Returns the loss (key ``loss``), the
    mean implicit accuracy and reward margin, and the policy's mean diffusion loss on winners and losers."""
    b = latents_w.shape[0]
    device = latents_w.device
    noise = torch.randn(latents_w.shape, generator=generator, device=generator.device).to(device, latents_w.dtype)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=generator, device=generator.device)
    t = t.to(device)
    with torch.no_grad(), adapters_disabled(unet):
        ref_w, ref_l = pair_errors(unet, scheduler, cond, latents_w, latents_l, noise, t)
    pol_w, pol_l = pair_errors(unet, scheduler, cond, latents_w, latents_l, noise, t)
    out: DPOLoss = diffusion_dpo_loss(pol_w, pol_l, ref_w, ref_l, beta, sft_weight)
    return {
        "loss": out.loss,
        "implicit_acc": out.implicit_acc.mean(),
        "reward_margin": out.reward_margin.mean(),
        "diffusion_loss_w": pol_w.detach().mean(),
        "diffusion_loss_l": pol_l.detach().mean(),
    }
